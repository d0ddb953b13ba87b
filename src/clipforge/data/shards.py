"""Writing WebDataset shards: img2dataset's training layout and CLIP_benchmark's evaluation layout.

Training shards follow img2dataset: ``00000.tar`` … each holding ``KEY.jpg``, ``KEY.txt`` and
``KEY.json`` (keys are 9 digits: shard number then index in shard), plus ``sizes.json`` (samples
per shard, read by the loader to size an epoch). Evaluation sets follow CLIP_benchmark's
``build_wds_dataset``: ``test/{0..n-1}.tar`` + ``test/nshards.txt``, with ``classnames.txt`` and
``zeroshot_classification_templates.txt`` for classification (``KEY.jpg`` + ``KEY.cls``) or
``dataset_type.txt`` = ``retrieval`` (``KEY.jpg`` + ``KEY.txt`` with one caption per line). The
classification sets also get a ``train/`` split (for linear probes) drawn from the same distribution.

Beside them, the held-out dense sets of grounded scenes (``clipforge.data.scenes``): ``eval/segmentation`` in
ADE20K-style folders (``classnames.txt``, ``images/{train,test}/NAME.jpg``, ``annotations/{train,test}/NAME.png``
with the class of each pixel) and ``eval/referring`` in RefCOCO-style flat JSON (``images/NAME.jpg``,
``refs_test.json``: expression, box and every object's box as candidates). With ``scenes`` (``--scenes 0.5``) that
share of training samples are grounded scenes of 2–4 objects, and every training sample carries
``KEY.regions.json`` (boxes, names, region captions) and ``KEY.mask.png`` (the class mask); the other samples keep
the images, captions and keys of a run without it.

Shards are written under a temporary name and renamed, so an interrupted run never leaves a
truncated ``.tar`` behind, and a re-run with the same settings skips the shards that are already complete: each
training shard is marked by its ``NNNNN_stats.json`` with the settings, as ``prep table`` marks its shards
(``clipforge.data.prep_output``: other settings, or files prep did not write, are refused).

With ``noise`` (``--noise 0.3``) that share of training captions is replaced by another sample's caption, the same
images and keys otherwise, and ``train/noisy_keys.tsv`` lists which: the ground truth of curation benchmarks.

Entry point: ``clipforge prep synthetic --out data/synth --num-samples 20000``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from clipforge.data import scenes, synthetic
from clipforge.data.prep_output import (
    announce_shard,
    check_output_folder,
    claim_output,
    finish_shard,
    refuse_foreign,
    survey,
    write_json,
)

# Tar member mtime: fixed so the same seed writes byte-identical shards. An int: tarfile gives a float mtime a pax
# header of its own, 1 KiB more per member (a third of a 64 px synthetic sample) and a second header to read.
FIXED_MTIME = 1_700_000_000


@dataclass(frozen=True)
class SyntheticSpec:
    """What ``clipforge prep synthetic`` writes."""

    out: str
    num_samples: int = 20_000
    samples_per_shard: int = 1_000
    image_size: int = 64
    seed: int = 0
    num_eval_samples: int = 1_000
    num_retrieval_samples: int = 500
    captions_per_image: int = 5
    num_eval_train_samples: int = 1_000  # train split of each classification set (linear probe); 0 = none
    num_workers: int = 2
    noise: float = 0.0  # share of training captions replaced by another sample's (curation benchmarks)
    scenes: float = 0.0  # share of training samples that are grounded scenes; > 0: all carry regions and a mask
    num_dense_samples: int = 300  # images in each dense set (segmentation train and test, referring); 0 = none


# The noise decisions draw from their own stream, so a noisy set shows the clean set's images, captions and keys;
# so do the scene decisions, so the samples they leave alone are those of a run without scenes.
NOISE_STREAM = 100
SCENE_STREAM = 101
# The dense sets' objects are held-out (shape, colour) pairs this often, as half the classification sets' images are.
DENSE_HELDOUT_SHARE = 0.5


def _key(spec: SyntheticSpec, index: int) -> str:
    return f"{index // spec.samples_per_shard:05d}{index % spec.samples_per_shard:04d}"


def caption_source(spec: SyntheticSpec, index: int) -> int:
    """The sample whose caption sample ``index`` carries: itself, or (with probability ``spec.noise``) another."""
    if spec.noise <= 0 or spec.num_samples < 2:
        return index
    rng = np.random.default_rng([spec.seed, NOISE_STREAM, index])
    if rng.random() >= spec.noise:
        return index
    other = int(rng.integers(spec.num_samples - 1))
    return other + (other >= index)


def is_grounded_scene(spec: SyntheticSpec, index: int) -> bool:
    """Whether training sample ``index`` is a grounded scene of 2–4 objects (with probability ``spec.scenes``)."""
    if not 0 < spec.scenes < 1:  # none or all: nothing to draw
        return spec.scenes >= 1
    return bool(np.random.default_rng([spec.seed, SCENE_STREAM, index]).random() < spec.scenes)


def _train_scene(spec: SyntheticSpec, index: int) -> tuple[synthetic.Scene, np.random.Generator, str]:
    """Training sample ``index``'s scene, its caption, and the generator that goes on to render it."""
    if is_grounded_scene(spec, index):
        rng = synthetic.sample_rng(spec.seed, "scenes", index)
        scene = scenes.sample_grounded_scene(rng)
        return scene, rng, scenes.scene_caption(scene, rng)
    rng = synthetic.sample_rng(spec.seed, "train", index)
    scene = synthetic.sample_scene(rng, heldout="exclude")
    return scene, rng, synthetic.caption(scene, rng)


def _caption_of(spec: SyntheticSpec, index: int) -> str:
    return _train_scene(spec, index)[2]


def write_noisy_keys(spec: SyntheticSpec, path: Path) -> int:
    """``path``: the keys whose caption was replaced (tab-separated: key, the key whose caption it carries)."""
    lines = ["key\tcaption_from"]
    for index in range(spec.num_samples):
        source = caption_source(spec, index)
        if source != index:
            lines.append(f"{_key(spec, index)}\t{_key(spec, source)}")
    path.write_text("\n".join(lines) + "\n")
    return len(lines) - 1


def write_tar(path: Path, samples: Iterator[dict]) -> int:
    """Write samples to ``path`` atomically (temp name, fsync, rename); returns the count."""
    import webdataset as wds  # imports torch: here, so that prep inspect, which imports data.prep, needs none

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(temporary, "wb") as stream:
            writer = wds.TarWriter(stream, mtime=FIXED_MTIME)
            try:
                for sample in samples:
                    writer.write(sample)
                    count += 1
            finally:
                writer.close()
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)  # an interrupted shard leaves nothing behind
        raise
    os.replace(temporary, path)
    return count


def _train_samples(spec: SyntheticSpec, shard: int) -> Iterator[dict]:
    start = shard * spec.samples_per_shard
    for index in range(start, min(start + spec.samples_per_shard, spec.num_samples)):
        scene, rng, text = _train_scene(spec, index)
        image = synthetic.render(scene, rng, spec.image_size)
        source = caption_source(spec, index)
        if source != index:
            text = _caption_of(spec, source)
        key = f"{shard:05d}{index - start:04d}"
        meta = {
            "key": key,
            "caption": text,
            "width": image.width,
            "height": image.height,
            "status": "success",
            "scene": synthetic.describe(scene),
        }
        sample = {"__key__": key, "jpg": synthetic.encode_jpeg(image), "txt": text, "json": json.dumps(meta)}
        if spec.scenes > 0:  # regions describe the image, whichever caption it carries
            grounded = scenes.ground(scene, image, rng)
            sample["regions.json"] = json.dumps(scenes.regions_json(grounded.regions)).encode()
            sample["mask.png"] = scenes.encode_png(grounded.mask)
        yield sample


def train_settings(spec: SyntheticSpec) -> dict:
    """What must match for training shards already in ``OUT/train`` to count as this run's (``prep_output``)."""
    return {
        "source": "synthetic",
        "seed": spec.seed,
        "num_samples": spec.num_samples,
        "samples_per_shard": spec.samples_per_shard,
        "image_size": spec.image_size,
        "noise": spec.noise,
        **({"scenes": spec.scenes} if spec.scenes > 0 else {}),  # absent when 0: shards written before it still match
    }


def _write_train_shard(spec: SyntheticSpec, shard: int) -> tuple[str, int]:
    train, name = Path(spec.out) / "train", f"{shard:05d}"
    announce_shard(train, name, train_settings(spec))
    count = write_tar(train / f"{name}.tar", _train_samples(spec, shard))
    finish_shard(train, name, train_settings(spec), {"count": count, "successes": count})
    return f"{name}.tar", count


def _claim(spec: SyntheticSpec, names: list[str], overwrite: bool) -> dict[str, dict]:
    """The complete training shards of an equivalent earlier run in ``spec.out`` (``prep_output.claim_output``); the
    folder itself may hold only ``train/`` and, once training shards are there, ``eval/``."""
    out = check_output_folder(spec.out)
    if out.is_dir():
        expected = {"train"} | ({"eval"} if survey(out / "train")[0] else set())
        refuse_foreign(
            out,
            [
                p
                for p in sorted(out.iterdir())
                if not p.name.startswith(".") and not (p.name in expected and p.is_dir())
            ],
        )
    if not overwrite:  # claim_output compares the keys this run's settings have, and scenes 0 leaves its key out
        earlier = {stats["settings"].get("scenes", 0.0) for stats in survey(out / "train")[0].values()} - {spec.scenes}
        if earlier:
            raise ValueError(
                f"{out / 'train'} holds shards written with other settings: scenes {min(earlier)!r} (this run: "
                f"{spec.scenes!r}); write to another --out, repeat the earlier settings to resume it, or pass "
                "--overwrite to replace it"
            )
    for name, written in DENSE_FILES.items():  # a dense set is replaced whole: only once it holds prep's files alone
        refuse_foreign(out / "eval" / name, _not_written(out / "eval" / name, written))
    return claim_output(out / "train", train_settings(spec), overwrite, names)


# The train split of a classification set draws sample indices from here on: a stream disjoint from its test split.
TRAIN_SPLIT_OFFSET = 10**12


def _classification_samples(spec: SyntheticSpec, split: str, label_of: Callable, train: bool = False) -> Iterator[dict]:
    for index in range(spec.num_eval_train_samples if train else spec.num_eval_samples):
        rng = synthetic.sample_rng(spec.seed, split, index + (TRAIN_SPLIT_OFFSET if train else 0))
        # Half the objects use (shape, colour) combinations that training never shows.
        heldout = "only" if index % 2 == 0 else "exclude"
        scene = synthetic.sample_scene(rng, heldout=heldout, kind="group")
        image = synthetic.render(scene, rng, spec.image_size)
        yield {
            "__key__": f"s{index:07d}",
            "jpg": synthetic.encode_jpeg(image),
            "cls": str(label_of(scene.objects[0])),
            "json": json.dumps(synthetic.describe(scene)),
        }


def _retrieval_samples(spec: SyntheticSpec) -> Iterator[dict]:
    for index in range(spec.num_retrieval_samples):
        rng = synthetic.sample_rng(spec.seed, "retrieval", index)
        scene = synthetic.sample_scene(rng, heldout="any")
        captions: list[str] = []
        for _ in range(50 * spec.captions_per_image):  # distinct phrasings where the templates allow
            text = synthetic.caption(scene, rng)
            if text not in captions:
                captions.append(text)
            if len(captions) == spec.captions_per_image:
                break
        while len(captions) < spec.captions_per_image:
            captions.append(captions[len(captions) % len(captions)])
        image = synthetic.render(scene, rng, spec.image_size)
        yield {"__key__": f"s{index:07d}", "jpg": synthetic.encode_jpeg(image), "txt": "\n".join(captions)}


def _write_benchmark(root: Path, samples: Iterator[dict], metadata: dict[str, str], split: str = "test") -> int:
    count = write_tar(root / split / "0.tar", samples)
    (root / split / "nshards.txt").write_text("1\n")
    for name, text in metadata.items():
        (root / name).write_text(text)
    return count


SHAPE_TEMPLATES = (
    "a photo of a {c}.",
    "a drawing of a {c}.",
    "a {c}.",
    "a picture of a {c}.",
    "there is a {c} in the image.",
    "a {c} on a background.",
)


# What prep writes in each dense set (paths relative to it), and so may replace.
DENSE_FILES = {
    "segmentation": re.compile(
        r"classnames\.txt|zeroshot_classification_templates\.txt|(images|annotations)(/(train|test)"
        r"(/s[0-9]{7}\.(jpg|png))?)?"
    ),
    "referring": re.compile(r"refs_test\.json|images(/s[0-9]{7}\.jpg)?"),
}


def _not_written(folder: Path, written: re.Pattern) -> list[Path]:
    """The files and folders in ``folder`` that prep does not write there."""
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.rglob("*")) if not written.fullmatch(p.relative_to(folder).as_posix())]


def _replace_folder(folder: Path, fill: Callable[[Path], dict[str, int]]) -> dict[str, int]:
    """``fill`` a fresh folder that then takes ``folder``'s place, so no image of an earlier run (another seed,
    more images) stays among this run's, and an interrupted run leaves the earlier set whole."""
    temporary = folder.with_name(folder.name + ".tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    counts = fill(temporary)
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        temporary.rename(folder)
        shutil.rmtree(old)
    else:
        temporary.rename(folder)
    return counts


def _fill_segmentation(spec: SyntheticSpec, root: Path) -> dict[str, int]:
    """ADE20K-style folders: a JPEG per image, a PNG of class indices (``scenes.CLASSNAMES``) per annotation."""
    (root / "classnames.txt").write_text("\n".join(scenes.CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(SHAPE_TEMPLATES) + "\n")
    for split, offset in (("train", TRAIN_SPLIT_OFFSET), ("test", 0)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for index in range(spec.num_dense_samples):
            grounded = scenes.grounded_sample(
                spec.seed, "segmentation", index + offset, spec.image_size, DENSE_HELDOUT_SHARE
            )
            name = f"s{index:07d}"
            (root / "images" / split / f"{name}.jpg").write_bytes(synthetic.encode_jpeg(grounded.image))
            (root / "annotations" / split / f"{name}.png").write_bytes(scenes.encode_png(grounded.mask))
    return {"segmentation/test": spec.num_dense_samples, "segmentation/train": spec.num_dense_samples}


def _fill_referring(spec: SyntheticSpec, root: Path) -> dict[str, int]:
    """RefCOCO-style flat JSON: each object a caption picks out is one entry, its image's objects the candidates."""
    (root / "images").mkdir()
    refs = []
    for index in range(spec.num_dense_samples):
        grounded = scenes.grounded_sample(spec.seed, "referring", index, spec.image_size, DENSE_HELDOUT_SHARE)
        image = f"images/s{index:07d}.jpg"
        candidates = [region.box for region in grounded.regions]
        found = [
            {"image": image, "expression": region.caption, "box": region.box, "candidates": candidates}
            for region in grounded.regions
            if region.unique
        ]
        if found:
            (root / image).write_bytes(synthetic.encode_jpeg(grounded.image))
            refs += found
    (root / "refs_test.json").write_text("[\n" + ",\n".join(json.dumps(ref) for ref in refs) + "\n]\n")
    return {"referring": len(refs)}


def write_dense_sets(spec: SyntheticSpec) -> dict[str, int]:
    """The held-out dense sets (``OUT/eval/segmentation``, ``OUT/eval/referring``) of grounded scenes, each
    replacing an earlier run's whole; with ``spec.num_dense_samples`` 0, none, and an earlier run's are removed (they
    would be another run's data). A set's folder holding files prep does not write there is refused."""
    root = Path(spec.out) / "eval"
    for name, written in DENSE_FILES.items():
        refuse_foreign(root / name, _not_written(root / name, written))
    if spec.num_dense_samples <= 0:
        for name in ("segmentation", "referring"):
            if (root / name).exists():
                shutil.rmtree(root / name)
        return {}
    counts = _replace_folder(root / "segmentation", lambda folder: _fill_segmentation(spec, folder))
    return counts | _replace_folder(root / "referring", lambda folder: _fill_referring(spec, folder))


def write_eval_sets(spec: SyntheticSpec) -> dict[str, int]:
    """The held-out dense sets, then the CLIP_benchmark-layout sets (shape and colour classification, retrieval):
    the colour set's probe split is written last, so ``eval/colors/train/nshards.txt`` marks a whole set."""
    root = Path(spec.out) / "eval"
    shapes = list(synthetic.SHAPES)
    colors = list(synthetic.COLORS)
    color_templates = ["a {c} shape.", "a photo of a {c} object.", "something {c}.", "a {c} thing."]
    label_of = {"shapes": lambda o: shapes.index(o.shape), "colors": lambda o: colors.index(o.color)}
    counts = write_dense_sets(spec)
    counts |= {
        "shapes": _write_benchmark(
            root / "shapes",
            _classification_samples(spec, "shapes", label_of["shapes"]),
            {
                "classnames.txt": "\n".join(shapes) + "\n",
                "zeroshot_classification_templates.txt": "\n".join(SHAPE_TEMPLATES) + "\n",
            },
        ),
        "colors": _write_benchmark(
            root / "colors",
            _classification_samples(spec, "colors", label_of["colors"]),
            {
                "classnames.txt": "\n".join(colors) + "\n",
                "zeroshot_classification_templates.txt": "\n".join(color_templates) + "\n",
            },
        ),
        "retrieval": _write_benchmark(
            root / "retrieval", _retrieval_samples(spec), {"dataset_type.txt": "retrieval\n"}
        ),
    }
    for name in ("shapes", "colors"):
        if spec.num_eval_train_samples > 0:
            counts[f"{name}/train"] = _write_benchmark(
                root / name, _classification_samples(spec, name, label_of[name], train=True), {}, split="train"
            )
        else:  # an earlier run's split would pair these test images with another run's probe data
            for stale in ("nshards.txt", "0.tar"):
                (root / name / "train" / stale).unlink(missing_ok=True)
    return counts


def write_synthetic(spec: SyntheticSpec, progress: bool = True, overwrite: bool = False) -> dict:
    """Write the training shards (in ``spec.num_workers`` processes) and the evaluation sets. Complete shards of an
    earlier run with the same settings are kept; other settings, or files prep did not write, are refused
    (``overwrite``: what an earlier run wrote is replaced)."""
    if not 0 <= spec.noise < 1:
        raise ValueError(f"--noise: a share of captions in [0, 1), got {spec.noise}")
    if not 0 <= spec.scenes <= 1:
        raise ValueError(f"--scenes: a share of training samples in [0, 1], got {spec.scenes}")
    if spec.num_dense_samples < 0:
        raise ValueError(f"--num-dense-samples: 0 or more images, got {spec.num_dense_samples}")
    if spec.num_samples <= 0 or spec.samples_per_shard <= 0:
        raise ValueError(
            f"num_samples and samples_per_shard must be positive, got {spec.num_samples}, {spec.samples_per_shard}"
        )
    num_shards = -(-spec.num_samples // spec.samples_per_shard)
    names = [f"{shard:05d}" for shard in range(num_shards)]
    complete = _claim(spec, names, overwrite)
    sizes = {f"{name}.tar": stats["successes"] for name, stats in complete.items()}
    todo = [shard for shard, name in enumerate(names) if name not in complete]
    with ProcessPoolExecutor(max_workers=max(1, spec.num_workers)) as pool:
        jobs = pool.map(_write_train_shard, [spec] * len(todo), todo)
        bar = tqdm(
            jobs, total=num_shards, initial=len(complete), desc="train shards", unit="shard", disable=not progress
        )
        for name, count in bar:
            sizes[name] = count
    train = Path(spec.out) / "train"
    total = sum(sizes.values())
    write_json(train / "sizes.json", dict(sorted(sizes.items())))
    write_json(train / "_stats.json", {"count": total, "successes": total, "failed_to_download": 0, "seed": spec.seed})
    noisy = write_noisy_keys(spec, train / "noisy_keys.tsv") if spec.noise > 0 else 0
    evaluation = write_eval_sets(spec)
    return {
        "noisy_captions": noisy,
        "train_samples": sum(sizes.values()),
        "train_shards": num_shards,
        "train_urls": str(train / f"{{00000..{num_shards - 1:05d}}}.tar"),
        "eval": evaluation,
    }
