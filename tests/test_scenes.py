"""Grounded scenes: masks and boxes where the image shows the objects, region captions that pick out one object,
the dense held-out sets' layouts, and training shards that carry regions without changing what training reads."""

import hashlib
import io
import json
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipforge.data import scenes, synthetic
from clipforge.data.inspection import inspect_shard
from clipforge.data.samples import SampleDecoder, SkipCounter, read_tar
from clipforge.data.shards import DENSE_HELDOUT_SHARE, TRAIN_SPLIT_OFFSET, SyntheticSpec, write_synthetic
from clipforge.data.synthetic import SHAPES, Scene, SceneObject


def coverage(image: np.ndarray, background: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """How much of each pixel an object of colour ``fill`` covers on a plain ``background``, read off the image."""
    direction = fill - background
    return ((image - background) @ direction) / (direction @ direction)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_mask_is_where_the_antialiased_image_shows_more_object_than_background(shape):
    for seed in range(4):
        rng = np.random.default_rng(seed)
        center = tuple(float(v) for v in rng.uniform(0.3, 0.7, size=2))
        obj = SceneObject(
            shape, "red", "large", center, float(rng.uniform(0.12, 0.25)), float(rng.uniform(-0.25, 0.25))
        )
        scene = Scene("scene", [obj], "plain")
        image = np.asarray(synthetic.render(scene, rng, 48)).astype(float)
        layers = synthetic.render_layers(scene, 48)
        background = image[0, 0]
        fill = image.reshape(-1, 3)[np.argmax(np.linalg.norm(image - background, axis=-1))]  # a pixel wholly inside
        covered = coverage(image, background, fill)
        # Box-filtered from 2x: coverage is 0, 1/4, 1/2, 3/4 or 1; a half-covered pixel goes to the object.
        assert np.array_equal(layers == 1, covered > 0.375), (shape, seed)
        assert 0.02 < (layers == 1).mean() < 0.6
        assert set(np.unique(scenes.class_mask(scene, layers))) == {0, 1 + SHAPES.index(shape)}


def test_an_object_drawn_over_another_wins_its_pixels():
    first = SceneObject("square", "blue", "large", (0.45, 0.5), 0.25, 0.0)
    second = SceneObject("circle", "yellow", "small", (0.6, 0.5), 0.15, 0.0)
    both = synthetic.render_layers(Scene("scene", [first, second], "plain"), 40)
    alone = [synthetic.render_layers(Scene("scene", [o], "plain"), 40) == 1 for o in (first, second)]
    assert np.array_equal(both == 2, alone[1])
    assert np.array_equal(both == 1, alone[0] & ~alone[1])
    assert (alone[0] & alone[1]).sum() > 20  # they do overlap


def grounded_samples(count=60, side=48, split="referring", share=DENSE_HELDOUT_SHARE):
    return [scenes.grounded_sample(0, split, index, side, share) for index in range(count)]


def patch(pixels: np.ndarray, y: int, x: int) -> np.ndarray:
    """The 8-connected patch of true ``pixels`` that holds (y, x)."""
    assert pixels[y, x]
    found = np.zeros_like(pixels)
    found[y, x] = True
    while True:
        grown = found.copy()
        grown[1:] |= found[:-1]
        grown[:-1] |= found[1:]
        grown[:, 1:] |= grown[:, :-1]  # after the rows: diagonal neighbours too
        grown[:, :-1] |= grown[:, 1:].copy()
        grown &= pixels
        if np.array_equal(grown, found):
            return found
        found = grown


def test_boxes_are_the_extent_of_each_objects_mask_pixels():
    for sample in grounded_samples():
        assert 2 <= len(sample.scene.objects) <= 4 and len(sample.regions) == len(sample.scene.objects)
        for region in sample.regions:
            obj = sample.scene.objects[region.index]
            x0, y0, x1, y1 = region.box
            cx, cy = obj.center[0] * 48, obj.center[1] * 48
            assert x0 < cx < x1 and y0 < cy < y1
            # Objects stand apart: the object is the patch of its class's pixels that holds its centre.
            ys, xs = np.nonzero(patch(sample.mask == 1 + SHAPES.index(obj.shape), int(cy), int(cx)))
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == region.box
            assert region.name == f"{obj.color} {obj.shape}"


def test_mask_pixels_show_their_objects_colour_in_the_image():
    close = total = 0
    for sample in grounded_samples():
        image = np.asarray(sample.image).astype(float)
        layers = synthetic.render_layers(sample.scene, 48)
        for layer, obj in enumerate(sample.scene.objects, start=1):
            pixels = image[layers == layer]
            nearest = np.argmin(
                [np.linalg.norm(pixels - np.array(rgb), axis=-1) for rgb in synthetic.COLORS.values()], axis=0
            )
            close += (nearest == list(synthetic.COLORS).index(obj.color)).sum()
            total += len(pixels)
            assert np.array_equal(sample.mask[layers == layer], np.full(len(pixels), 1 + SHAPES.index(obj.shape)))
    assert close / total > 0.95


# An independent reading of a region caption: the object it names, where, and beside what.
_NOUN = r"(?:(?P<{0}color>" + "|".join(synthetic.COLORS) + r") )?(?P<{0}shape>" + "|".join(SHAPES) + ")"
_PLACES = {phrase: place for place, phrases in synthetic.POSITION_PHRASES.items() for phrase in phrases}
_CAPTION = re.compile(
    r"the "
    + _NOUN.format("")
    + r"(?: (?P<place>"
    + "|".join(_PLACES)
    + r")| (?P<relation>"
    + "|".join(synthetic.RELATIONS)
    + r") the "
    + _NOUN.format("ref_")
    + ")?"
)


def _fits(obj, color, shape):
    return obj.shape == shape and color in (None, obj.color)


def _in_cell(obj, place):
    """The centre in the grid cell, where a side's middle cell stands for the whole side."""
    column, row = synthetic.POSITIONS[place]
    x, y = (int(v * 3) for v in obj.center)
    if (column == 1) != (row == 1):
        return x == column if row == 1 else y == row
    return (x, y) == (column, row)


def _side(obj, reference, relation):
    dx, dy = reference.center[0] - obj.center[0], reference.center[1] - obj.center[1]
    return {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation] > 0


def test_region_captions_pick_out_their_object_and_no_other():
    kinds = {"name": 0, "place": 0, "relation": 0}
    for sample in grounded_samples(150):
        objects = [sample.scene.objects[r.index] for r in sample.regions]
        captions = [r.caption for r in sample.regions if r.unique]
        assert len(set(captions)) == len(captions)
        for target, region in zip(objects, sample.regions):
            if not region.unique:
                assert region.caption in (f"a {region.name}", f"an {region.name}")
                continue
            match = _CAPTION.fullmatch(region.caption)
            assert match, region.caption
            color, shape = match["color"], match["shape"]
            assert _fits(target, color, shape), region.caption
            fitting = [o for o in objects if _fits(o, color, shape)]
            if match["place"]:
                place = _PLACES[match["place"]]
                assert _in_cell(target, place), region.caption
                fitting = [o for o in fitting if _in_cell(o, place)]
                kinds["place"] += 1
            elif match["relation"]:
                (reference,) = [o for o in objects if _fits(o, match["ref_color"], match["ref_shape"])]
                assert _side(target, reference, match["relation"]), region.caption
                fitting = [o for o in fitting if _side(o, reference, match["relation"])]
                kinds["relation"] += 1
            else:
                kinds["name"] += 1
            assert fitting == [target], (region.caption, objects)
    assert min(kinds.values()) > 30, kinds  # every kind of caption is used


def test_training_scenes_never_hold_a_heldout_pair_and_dense_sets_hold_them_half_the_time():
    for index in range(300):
        rng = synthetic.sample_rng(0, "scenes", index)
        scene = scenes.sample_grounded_scene(rng)
        assert not {(o.shape, o.color) for o in scene.objects} & synthetic.HELDOUT_COMBOS
    combos = [(o.shape, o.color) for sample in grounded_samples(200) for o in sample.scene.objects]
    share = sum(combo in synthetic.HELDOUT_COMBOS for combo in combos) / len(combos)
    assert 0.4 < share < 0.6


def spec(out, **changes) -> SyntheticSpec:
    values = dict(num_samples=24, samples_per_shard=8, image_size=32, num_eval_samples=2, num_retrieval_samples=2)
    values.update(num_eval_train_samples=0, num_workers=1, num_dense_samples=12)
    return SyntheticSpec(out=str(out), **{**values, **changes})


def test_dense_sets_are_written_in_the_documented_layouts(tmp_path):
    summary = write_synthetic(spec(tmp_path / "s"), progress=False)
    assert summary["eval"]["segmentation/test"] == summary["eval"]["segmentation/train"] == 12
    segmentation = tmp_path / "s" / "eval" / "segmentation"
    assert (segmentation / "classnames.txt").read_text().splitlines() == ["background", *SHAPES]
    templates = (segmentation / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates and all("{c}" in t for t in templates)
    for split, offset in (("train", TRAIN_SPLIT_OFFSET), ("test", 0)):
        images = sorted(p.stem for p in (segmentation / "images" / split).iterdir())
        assert images == sorted(p.stem for p in (segmentation / "annotations" / split).iterdir())
        assert len(images) == 12
        for index, name in enumerate(images):
            image = Image.open(segmentation / "images" / split / f"{name}.jpg")
            annotation = Image.open(segmentation / "annotations" / split / f"{name}.png")
            assert image.format == "JPEG" and image.size == (32, 32) and image.mode == "RGB"
            assert annotation.mode == "L" and annotation.size == (32, 32)
            values = np.asarray(annotation)
            assert values.max() <= len(SHAPES) and (values > 0).any() and (values == 0).any()
            sample = scenes.grounded_sample(0, "segmentation", index + offset, 32, DENSE_HELDOUT_SHARE)
            assert np.array_equal(values, sample.mask)
    referring = tmp_path / "s" / "eval" / "referring"
    refs = json.loads((referring / "refs_test.json").read_text())
    assert summary["eval"]["referring"] == len(refs) > 12  # several objects in most images
    assert sorted({r["image"] for r in refs}) == sorted(f"images/{p.name}" for p in (referring / "images").iterdir())
    for ref in refs:
        assert set(ref) == {"image", "expression", "box", "candidates"}
        assert Image.open(referring / ref["image"]).size == (32, 32)
        assert ref["box"] in ref["candidates"] and 2 <= len(ref["candidates"]) <= 4
        assert all(0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32 for x0, y0, x1, y1 in ref["candidates"])
        assert ref["expression"].startswith("the ")
    per_image = {}
    for ref in refs:
        per_image.setdefault(ref["image"], []).append(ref["expression"])
    assert all(len(set(e)) == len(e) for e in per_image.values())


def test_a_smaller_rerun_leaves_no_image_of_the_earlier_dense_sets_and_zero_removes_them(tmp_path):
    write_synthetic(spec(tmp_path / "s"), progress=False)
    write_synthetic(spec(tmp_path / "s", num_dense_samples=5), progress=False)
    segmentation = tmp_path / "s" / "eval" / "segmentation"
    assert len(list((segmentation / "images" / "test").iterdir())) == 5
    assert len(list((segmentation / "annotations" / "train").iterdir())) == 5
    assert sorted(p.name for p in (tmp_path / "s" / "eval").iterdir()) == [
        "colors",
        "referring",
        "retrieval",
        "segmentation",
        "shapes",
    ]
    write_synthetic(spec(tmp_path / "s", num_dense_samples=0), progress=False)
    assert sorted(p.name for p in (tmp_path / "s" / "eval").iterdir()) == ["colors", "retrieval", "shapes"]


def test_a_dense_set_holding_other_files_is_refused_before_anything_is_written(tmp_path):
    write_synthetic(spec(tmp_path / "s"), progress=False)
    before = digests(tmp_path / "s")
    (tmp_path / "s" / "eval" / "referring" / "images" / "mine.jpg").write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"referring holds 1 entry prep did not write \(mine.jpg\)"):
        write_synthetic(spec(tmp_path / "s", seed=1), progress=False, overwrite=True)
    after = digests(tmp_path / "s")
    assert after.pop("eval/referring/images/mine.jpg") and after == before  # nothing written, nothing removed


def digests(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def tar_samples(path):
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1)
            samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


def test_scene_shards_carry_regions_and_masks_and_training_reads_them_as_before(tmp_path):
    write_synthetic(spec(tmp_path / "plain"), progress=False)
    write_synthetic(spec(tmp_path / "a", scenes=0.5), progress=False)
    write_synthetic(spec(tmp_path / "b", scenes=0.5, num_workers=2), progress=False)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    plain_eval = {k: v for k, v in digests(tmp_path / "plain").items() if k.startswith("eval")}
    assert plain_eval == {k: v for k, v in digests(tmp_path / "a").items() if k.startswith("eval")}
    grounded = 0
    for shard in sorted((tmp_path / "plain" / "train").glob("*.tar")):
        plain, scene = tar_samples(shard), tar_samples(tmp_path / "a" / "train" / shard.name)
        assert plain.keys() == scene.keys()
        for key, members in scene.items():
            assert set(members) == {"jpg", "txt", "json", "regions.json", "mask.png"}
            meta = json.loads(members["json"])
            is_scene = meta["scene"]["kind"] == "scene"
            grounded += is_scene
            if not is_scene:  # the samples the scenes leave alone are those of a run without them
                assert {s: members[s] for s in ("jpg", "txt", "json")} == plain[key]
            else:
                assert 2 <= len(meta["scene"]["objects"]) <= 4
                assert not {(o["shape"], o["color"]) for o in meta["scene"]["objects"]} & synthetic.HELDOUT_COMBOS
            regions = json.loads(members["regions.json"])
            assert set(regions) == {"boxes", "names", "captions"}
            assert len(regions["boxes"]) == len(regions["names"]) == len(regions["captions"])
            assert regions["names"] == [f"{o['color']} {o['shape']}" for o in meta["scene"]["objects"]]
            mask = np.asarray(Image.open(io.BytesIO(members["mask.png"])))
            assert mask.shape == (32, 32) and Image.open(io.BytesIO(members["mask.png"])).mode == "L"
            for box, name in zip(regions["boxes"], regions["names"]):
                x0, y0, x1, y1 = box
                assert (mask[y0:y1, x0:x1] == 1 + SHAPES.index(name.split()[1])).any()
        # The training reader: every sample, nothing counted as a problem, the image and caption it had.
        counter = SkipCounter(strict=True)
        decode = SampleDecoder(lambda data, rng: data, "txt")
        with open(tmp_path / "a" / "train" / shard.name, "rb") as stream:
            read = [decode(sample, counter, None) for sample in read_tar(shard.name, stream, counter)]
        assert [(image, caption) for image, caption, _ in read] == [
            (members["jpg"], members["txt"].decode()) for members in scene.values()
        ]
        report = inspect_shard(str(tmp_path / "a" / "train" / shard.name))
        assert report.valid == report.samples == len(scene) and not report.problems
        assert dict(report.extensions) == {"jpg": len(scene)}
    assert 4 < grounded < 20


def test_all_scenes_with_the_flag_alone_and_its_setting_guards_the_shards(tmp_path):
    write_synthetic(spec(tmp_path / "s", scenes=1.0, num_dense_samples=0), progress=False)
    samples = tar_samples(tmp_path / "s" / "train" / "00000.tar")
    assert all(json.loads(m["json"])["scene"]["kind"] == "scene" for m in samples.values())
    with pytest.raises(ValueError, match="other settings"):
        write_synthetic(spec(tmp_path / "s", num_dense_samples=0), progress=False)
    with pytest.raises(ValueError, match=r"--scenes: a share of training samples in \[0, 1\], got 1.5"):
        write_synthetic(spec(tmp_path / "t", scenes=1.5), progress=False)


def test_the_prep_synthetic_flag():
    from clipforge.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["prep", "synthetic", "--out", "x"]).scenes == 0.0
    assert parser.parse_args(["prep", "synthetic", "--out", "x", "--scenes"]).scenes == 1.0
    assert parser.parse_args(["prep", "synthetic", "--out", "x", "--scenes", "0.25"]).scenes == 0.25
    assert parser.parse_args(["prep", "synthetic", "--out", "x"]).num_dense_samples == 300


def test_noisy_captions_among_scenes_come_from_other_samples_and_regions_stay_with_the_image(tmp_path):
    write_synthetic(spec(tmp_path / "clean", scenes=0.5, num_dense_samples=0), progress=False)
    write_synthetic(spec(tmp_path / "noisy", scenes=0.5, noise=0.4, num_dense_samples=0), progress=False)
    clean, noisy = {}, {}
    for shard in sorted((tmp_path / "clean" / "train").glob("*.tar")):
        clean |= tar_samples(shard)
        noisy |= tar_samples(tmp_path / "noisy" / "train" / shard.name)
    lines = (tmp_path / "noisy" / "train" / "noisy_keys.tsv").read_text().splitlines()[1:]
    replaced = dict(line.split("\t") for line in lines)
    assert 3 < len(replaced) < 18
    for key, members in noisy.items():
        assert members["txt"] == clean[replaced.get(key, key)]["txt"]
        assert {s: members[s] for s in ("jpg", "regions.json", "mask.png")} == {
            s: clean[key][s] for s in ("jpg", "regions.json", "mask.png")
        }
