"""clipforge prep labelled: a classification set → shards whose captions are its class prompts (FLYP).

The captions are checked against class names × templates filled by hand from the files ``clipforge eval`` reads
(its own readers give the names and templates, ``str.replace`` fills them), the images against the input files'
bytes, the labels against the class folders' order; a corrupt image is skipped and counted; training reads the
shards with ``data.caption_key: txt:lines``."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clipforge.cli import main
from clipforge.data.samples import read_caption
from clipforge.data.shards import write_tar
from clipforge.evaluation.classnames import dataset_classes, read_lines, read_templates

CLASSES = ("big_circle", "square", "triangle")  # folder names; "_" reads as a space
TEMPLATES = ("a photo of a {c}.", "a drawing of the {}", "{c}, small and blurry")
PER_CLASS = 4


def png(seed: int, size: int = 32) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    image.putpixel((seed % size, seed % size), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def read_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def filled(names: list[str], templates: list[str]) -> list[list[str]]:
    """Every template with its placeholder replaced by the name, by hand."""
    return [[t.replace("{c}", name).replace("{}", name) for t in templates] for name in names]


@pytest.fixture
def folder(tmp_path) -> Path:
    """An image folder with a train split: 3 classes × 4 PNGs, one corrupt JPEG in the second class, and the
    templates file clipforge eval reads."""
    root = tmp_path / "set"
    for label, name in enumerate(CLASSES):
        (root / "train" / name).mkdir(parents=True)
        for index in range(PER_CLASS):
            (root / "train" / name / f"{index}.png").write_bytes(png(label * 10 + index))
    (root / "train" / CLASSES[1] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n\n")
    return root


def test_image_folder_captions_are_classnames_times_templates_and_a_corrupt_image_is_counted(folder, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["prep", "labelled", str(folder), "--out", str(out), "--workers", "2", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == {"corrupt_image": 1}
    assert summary["samples"] == len(CLASSES) * PER_CLASS and summary["rows"] == len(CLASSES) * PER_CLASS + 1
    assert summary["classes"] == 3 and summary["prompts_per_class"] == 3

    # the reference: the eval's own readers for the names and templates, filled by hand
    names = dataset_classes(folder, "train").names
    assert names == ["big circle", "square", "triangle"]
    expected = filled(names, read_templates(folder / "zeroshot_classification_templates.txt"))
    samples = read_samples(out)
    assert len(samples) == len(CLASSES) * PER_CLASS
    seen = set()
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        class_folder, file = meta["url"].split("/")
        label = CLASSES.index(class_folder)  # torchvision's order: sorted folders
        assert int(sample["cls"]) == label == meta["label"], key
        assert sample["txt"].decode().split("\n") == expected[label], key
        assert sample["png"] == (folder / "train" / class_folder / file).read_bytes()  # stored as they were
        seen.add(meta["url"])
    assert len(seen) == len(samples) and not any("broken" in url for url in seen)
    # every prompt of every class, exactly once per sample of the class: classes × templates, nothing else
    by_class = {label: set() for label in range(3)}
    for sample in samples.values():
        by_class[int(sample["cls"])].update(sample["txt"].decode().split("\n"))
    assert [sorted(prompts) for _, prompts in sorted(by_class.items())] == [sorted(row) for row in expected]

    # training's caption reader (data.caption_key: txt:lines) draws every template of a class, and only those
    rng = random.Random(0)
    sample = next(iter(samples.values()))
    drawn = {read_caption(sample, "txt:lines", rng) for _ in range(200)}
    assert drawn == set(expected[int(sample["cls"])])

    # other templates are other settings: the shards are not mixed
    other = tmp_path / "other.txt"
    other.write_text("an image of {c}\n")
    assert main(["prep", "labelled", str(folder), "--out", str(out), "--templates", str(other), "--quiet"]) == 2
    assert "class_prompts_sha256" in capsys.readouterr().err
    assert main(["prep", "labelled", str(folder), "--out", str(out), "--templates", str(other), "--quiet",
                 "--overwrite", "--workers", "1"]) == 0  # fmt: skip
    capsys.readouterr()
    assert {s["txt"].decode() for s in read_samples(out).values()} == {f"an image of {n}" for n in names}


def test_clip_benchmark_set_with_classnames_and_openai_templates(tmp_path, capsys):
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    root = tmp_path / "wds"
    labels = [2, 0, 1, 1, 0, 2, 2]
    images = {f"s{index:03d}": png(index) for index in range(len(labels))}
    (root / "train").mkdir(parents=True)
    write_tar(
        root / "train" / "0.tar",
        iter(
            [{"__key__": key, "png": images[key], "cls": str(label)} for key, label in zip(images, labels)]
            + [{"__key__": "noimage", "cls": "0"}]
        ),
    )
    (root / "train" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("apple\npear\nplum\n")
    names_file = tmp_path / "names.txt"
    names_file.write_text("green apple\npear\nred plum\n")
    command = ["prep", "labelled", str(root), "--out", str(tmp_path / "out"), "--quiet", "--workers", "1"]
    assert main([*command, "--classnames", str(names_file), "--templates", "openai_imagenet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == {"missing_image": 1} and summary["prompts_per_class"] == 80
    expected = [[template(name) for template in OPENAI_IMAGENET_TEMPLATES] for name in read_lines(names_file)]
    samples = read_samples(tmp_path / "out")
    assert sorted(json.loads(s["json"])["url"].rsplit(":", 1)[1].split(".")[0] for s in samples.values()) == sorted(
        images
    )
    for sample in samples.values():
        key = json.loads(sample["json"])["url"].rsplit(":", 1)[1].split(".")[0]
        label = labels[int(key[1:])]
        assert int(sample["cls"]) == label and sample["png"] == images[key]
        assert sample["txt"].decode().split("\n") == expected[label]


def test_a_set_without_templates_is_refused_in_one_line(folder, tmp_path, capsys):
    (folder / "zeroshot_classification_templates.txt").unlink()
    assert main(["prep", "labelled", str(folder), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "no templates" in error and "--templates" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_training_reads_the_shards_with_one_prompt_per_sample(folder, tiny_model_json, tmp_path, capsys):
    from clipforge.train.config import load_config
    from clipforge.train.loop import train

    out = tmp_path / "shards"
    command = ["prep", "labelled", str(folder), "--out", str(out), "--quiet", "--samples-per-shard", "3"]
    assert main(command) == 0
    capsys.readouterr()
    shards = sorted(out.glob("*.tar"))
    cfg = load_config(
        None,
        [
            f"data.train_urls={out}/{{{shards[0].stem}..{shards[-1].stem}}}.tar",
            "data.caption_key=txt:lines",
            "data.batch_size=4",
            "data.num_workers=1",
            "data.shuffle_buffer=4",
            "loss.positives=caption",
            f"model.name={tiny_model_json}",
            "train.steps=4",
            f"train.output_dir={tmp_path / 'run'}",
            "checkpoint.every=100",
            "logging.log_every=1",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
        ],
    )
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [record for record in records if "train/loss" in record]
    assert [record["step"] for record in trained] == [1, 2, 3, 4]
    assert all(record["train/loss"] > 0 for record in trained)
    assert not any(value for record in records for key, value in record.items() if key.startswith("data/skipped"))


def test_hf_dataset_with_class_labels_keeps_its_image_bytes(tmp_path, capsys):
    import datasets

    labels = [1, 0, 1, 2]
    images = [png(100 + index) for index in range(len(labels))]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "wild boar"])}
    )
    rows = {"image": [{"bytes": data, "path": None} for data in images], "label": labels}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    templates = tmp_path / "templates.txt"
    templates.write_text("a {c}\nthe {c} again\n")
    command = ["prep", "labelled", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--quiet"]
    assert main([*command, "--templates", str(templates), "--workers", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == len(labels)
    expected = filled(["cat", "dog", "wild boar"], read_templates(templates))
    samples = sorted(read_samples(tmp_path / "out").values(), key=lambda sample: json.loads(sample["json"])["row"])
    assert [int(sample["cls"]) for sample in samples] == labels
    assert [sample["png"] for sample in samples] == images
    assert [sample["txt"].decode().split("\n") for sample in samples] == [expected[label] for label in labels]
