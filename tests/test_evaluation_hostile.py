"""`clipforge eval` on hostile inputs: class names that do not fit, symlink loops, unreadable images, unwritable
destinations, malformed suites, formula-looking text in CSV, a run directory given for a checkpoint."""

from __future__ import annotations

import csv
import io
import json
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_fixtures import write_hf, write_imagefolder
from PIL import Image

from clipforge.cli import main
from clipforge.evaluation import load_benchmark, load_suite, run_suite
from clipforge.evaluation.loading import model_kind
from clipforge.evaluation.predictions import classification_rows, retrieval_rows, write_predictions
from clipforge.evaluation.report import sizes_table

FAST = ["--quiet", "--no-plots", "--workers", "0", "--batch-size", "100"]


@pytest.fixture(scope="module")
def run_checkpoint(tiny_resnet_json, tmp_path_factory):
    """A random-init tiny CLIP-ResNet saved as training saves it: RUN/checkpoints/step_00000030 and ``latest``."""
    from checkpointing import save_checkpoint

    from clipforge.config import to_yaml
    from clipforge.models import build_model
    from clipforge.train.config import load_config

    cfg = load_config(None, ["data.train_urls=data/{0..9}.tar", f"model.name={tiny_resnet_json}"])
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    return save_checkpoint(run / "checkpoints", build_model(cfg.model).model, 30, to_yaml(cfg))


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model is loaded: the error under test must come first."""
    import clipforge.evaluation

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(clipforge.evaluation, "load_eval_model", refuse)


def one_line_error(capsys, argv, *fragments):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clipforge eval: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


class MeanColourEncoder:
    """An image's embedding is its mean colour; a text's is its first token's row of a fixed random table."""

    def __init__(self):
        self.table = torch.randn(49408, 3, generator=torch.Generator().manual_seed(0))

    def encode_image(self, images):
        return F.normalize(images.mean(dim=(2, 3)), dim=-1)

    def encode_text(self, tokens):
        return F.normalize(self.table[tokens[:, 1]], dim=-1)


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype="float32")).permute(2, 0, 1) / 255


def tokenizer(texts):
    import open_clip

    return open_clip.get_tokenizer("RN50")(texts)


def png(colour=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# --- class names that do not fit the dataset -------------------------------------------------------------------


def test_class_names_must_match_the_count_and_be_unique_before_the_model_loads(
    run_checkpoint, synth_data, tmp_path, capsys, no_model
):
    shapes = synth_data / "eval" / "shapes"  # 6 classes, its own classnames.txt
    names = (shapes / "classnames.txt").read_text().split()
    folder = write_imagefolder(shapes, tmp_path / "folder")
    hf = write_hf(shapes, tmp_path / "hf", "classification")
    capsys.readouterr()  # the HF writer's progress bars
    templates = ["--templates", str(shapes / "zeroshot_classification_templates.txt")]  # the HF copy ships none
    eval_ = ["eval", str(run_checkpoint), "--out", str(tmp_path / "out"), *templates, *FAST]
    few, twice, blank = tmp_path / "few.txt", tmp_path / "twice.json", tmp_path / "blank.json"
    few.write_text("\n".join(names[:4]) + "\n")
    twice.write_text(json.dumps([names[0], *names[1:5], names[0]]))
    blank.write_text(json.dumps([*names[:5], " "]))
    for dataset in (shapes, folder, hf):
        one_line_error(
            capsys, [*eval_, "--dataset", str(dataset), "--classnames", str(few)], "4 class names", "6 classes"
        )
        one_line_error(
            capsys, [*eval_, "--dataset", str(dataset), "--classnames", str(twice)], f"'{names[0]}' is listed 2"
        )
        one_line_error(
            capsys, [*eval_, "--dataset", str(dataset), "--classnames", str(blank)], "name number 6 (of 6) is blank"
        )
    # the dataset's own names file is held to the same rules
    (folder / "classnames.txt").write_text("a\nb\nc\n")
    one_line_error(capsys, [*eval_, "--dataset", str(folder)], "3 class names", "6 classes (the class folders of")
    (folder / "classnames.txt").write_text("a\nb\nc\nd\ne\na\n")
    one_line_error(capsys, [*eval_, "--dataset", str(folder)], "classnames.txt: class name 'a' is listed 2 times")
    # and so is a suite's entry, in every layout, when the suite is read
    suite = tmp_path / "suite.yaml"
    for dataset in (shapes, folder, hf):
        suite.write_text(
            f"datasets:\n  - {{name: x, task: linear_probe, path: '{dataset}', classnames: [{', '.join(names[:5])}]}}\n"
        )
        with pytest.raises(
            ValueError, match=r"5 class names \(.*suite.yaml: datasets\[0\]\.classnames\) for 6 classes"
        ):
            load_suite(suite)


def test_blank_lines_in_a_names_file_are_ignored_trailing_ones_too(synth_data, tmp_path):
    shapes = synth_data / "eval" / "shapes"
    names = (shapes / "classnames.txt").read_text().split()
    padded = tmp_path / "padded.txt"
    padded.write_text("\n" + "\n\n".join(names) + "\n\n  \n\n")
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        f"datasets:\n  - {{name: s, task: zeroshot_classification, path: '{shapes}', classnames: {padded}}}\n"
    )
    (entry,) = load_suite(suite).datasets
    assert entry.classnames == names
    assert load_benchmark(shapes, classnames=entry.classnames).classnames == names


@pytest.fixture(scope="module")
def unnamed_wds(tmp_path_factory):
    """A classification WebDataset with labels 0, 1, 2 and no classnames.txt: only the labels give the count."""
    from clipforge.data.shards import write_tar

    root = tmp_path_factory.mktemp("unnamed")
    samples = [
        {"__key__": f"s{index:03d}", "png": png((60 * index, 0, 0)), "cls": str(index % 3)} for index in range(6)
    ]
    write_tar(root / "test" / "0.tar", iter(samples))
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    return root


def test_labels_beyond_the_class_names_stop_before_embedding_with_predictions_too(
    run_checkpoint, unnamed_wds, tmp_path, capsys
):
    with pytest.raises(ValueError, match=r"label 2 has no class name: 2 class names \(the class names given\)"):
        load_benchmark(unnamed_wds, classnames=["zero", "one"])
    names = tmp_path / "names.txt"
    names.write_text("zero\none\n")
    argv = ["eval", str(run_checkpoint), "--dataset", str(unnamed_wds), "--classnames", str(names), *FAST]
    one_line_error(capsys, [*argv, "--predictions", str(tmp_path / "p.csv")], "label 2 has no class name", "names.txt")
    assert not (tmp_path / "p.csv").exists()
    names.write_text("zero\none\ntwo\n")
    assert main([*argv, "--out", str(tmp_path / "out"), "--predictions", str(tmp_path / "p.csv")]) == 0
    (result,) = json.loads(next((tmp_path / "out").glob("*.json")).read_text()).values()
    assert sorted(result["per_class_accuracy"]) == ["one", "two", "zero"]


def test_an_adhoc_eval_writes_beside_not_into_the_runs_results_and_says_when_it_replaces(
    run_checkpoint, synth_data, capsys
):
    from clipforge.export.card import find_eval_results

    run_dir = run_checkpoint.parent.parent
    (run_dir / "eval").mkdir(exist_ok=True)
    training = run_dir / "eval" / f"step_{30:08d}.json"
    training.write_text('{"shapes": {"task": "zeroshot_classification", "acc1": 0.9}}')
    before = training.read_bytes()
    argv = ["eval", str(run_dir / "checkpoints" / "latest"), "--dataset", str(synth_data / "eval" / "shapes"), *FAST]
    assert main(argv) == 0
    first = capsys.readouterr().out
    written = run_dir / "eval" / "adhoc" / f"shapes_{run_checkpoint.name}.json"
    assert f"results: {written}\n" in first and "replaced" not in first
    assert sorted(path.name for path in (run_dir / "eval").glob("*.json")) == [training.name]
    assert training.read_bytes() == before
    assert find_eval_results(run_dir, run_checkpoint.name)[0] == training  # the card's default source is untouched
    assert main(argv) == 0
    assert f"results: {written} (replaced the one there)" in capsys.readouterr().out


# --- symbolic links in image folders ---------------------------------------------------------------------------


def two_classes(split):
    for name, colour in (("circle", (200, 10, 10)), ("square", (10, 200, 10))):
        (split / name).mkdir(parents=True)
        for index in range(3):
            (split / name / f"{index}.png").write_bytes(png(colour))
    return split


def test_links_to_folders_are_not_followed_out_of_a_class_folder_and_are_counted(tmp_path, caplog):
    split = two_classes(tmp_path / "pets" / "test")
    (split / "circle" / "loop").symlink_to("..")  # circle/loop/square/*.png, circle/loop/circle/loop/... 40 deep
    (split / "circle" / "nested").mkdir()
    (split / "circle" / "nested" / "3.png").write_bytes(png())  # a real sub-folder is still read
    with caplog.at_level(logging.WARNING, logger="clipforge.evaluation"):
        benchmark = load_benchmark(tmp_path / "pets", templates=["a {c}."])
    assert benchmark.classnames == ["circle", "square"]
    assert [benchmark.source.target(i) for i in range(len(benchmark))] == [0, 0, 0, 0, 1, 1, 1]
    assert benchmark.keys()[:4] == ["circle/0.png", "circle/1.png", "circle/2.png", "circle/nested/3.png"]
    assert benchmark.source.skipped_links == ["circle/loop"]
    assert benchmark.describe()["skipped_links"] == 1
    assert "1 symbolic link(s) to folders not followed" in caplog.text and "circle/loop" in caplog.text
    for link, target in (("everything", "."), ("up", "..")):  # a "class" holding every class
        split = two_classes(tmp_path / link / "test")
        (split / link).symlink_to(target)
        benchmark = load_benchmark(tmp_path / link, templates=["a {c}."])
        assert benchmark.classnames == ["circle", "square"] and len(benchmark) == 6
        assert benchmark.source.skipped_links == [link]


# --- unreadable images -----------------------------------------------------------------------------------------


def broken_image_folder(root):
    """2 classes × 3 images, of which circle/1.png is empty and square/2.png is not an image."""
    for name, colour in (("circle", (200, 10, 10)), ("square", (10, 200, 10))):
        (root / name).mkdir(parents=True)
        for index in range(3):
            (root / name / f"{index}.png").write_bytes(png(colour))
    (root / "circle" / "1.png").write_bytes(b"")
    (root / "square" / "2.png").write_bytes(b"<html>not found</html>")
    (root / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    return root


def broken_wds(root):
    from clipforge.data.shards import write_tar

    samples = [
        {"__key__": f"s{index}", "png": png((200, 10, 10) if index % 2 else (10, 200, 10)), "cls": str(index % 2)}
        for index in range(6)
    ]
    samples[1]["png"], samples[5]["png"] = b"", png()[:40]  # empty; truncated
    write_tar(root / "test" / "0.tar", iter(samples))
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("circle\nsquare\n")
    (root / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    return root


def broken_hf(root):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["circle", "square"])})
    images = [{"bytes": data, "path": None} for data in (png(), b"", png(), png(), b"GIF89a", png())]
    table = {"image": images, "label": [0, 0, 0, 1, 1, 1]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(str(root))
    return root


@pytest.mark.parametrize(
    "make, unreadable",
    [
        (broken_image_folder, ["circle/1.png", "square/2.png"]),
        (broken_wds, ["0.tar:s1.png", "0.tar:s5.png"]),
        (broken_hf, ["row 1", "row 4"]),
    ],
)
def test_unreadable_images_are_skipped_counted_and_named(make, unreadable, tmp_path, caplog):
    root = make(tmp_path / "set")
    suite = tmp_path / "suite.yaml"
    extra = ", templates: ['a {c}.']" if make is broken_hf else ""
    suite.write_text(f"datasets:\n  - {{name: s, task: zeroshot_classification, path: '{root}'{extra}}}\n")
    predictions = {}
    with caplog.at_level(logging.WARNING, logger="clipforge.evaluation"):
        (metrics,) = run_suite(
            MeanColourEncoder(), tokenizer, to_tensor, load_suite(suite), 4, 0, predictions=predictions
        ).values()
    dataset = metrics["dataset"]
    assert (dataset["num_images"], dataset["num_scored"], dataset["num_unreadable"]) == (6, 4, 2)
    assert metrics["num_samples"] == 4  # the denominator: the images that were read
    assert [note.split(" (")[0].endswith(name) for note, name in zip(dataset["unreadable"], unreadable)] == [True] * 2
    assert "s test: 2 of 6 images could not be read and were skipped (the metrics count the 4" in caplog.text
    assert unreadable[0] in caplog.text and unreadable[1] in caplog.text
    assert "| s | classification | test | 4 of 6 (2 unreadable, not scored) | 2 classes |" in sizes_table(
        {"s": metrics}
    )
    keys = load_benchmark(root, templates=["a {c}."]).keys()
    scored = [key for key in keys if not any(name.endswith(key) or key in name for name in unreadable)]
    assert [row["id"] for row in predictions["s"]] == scored
    assert [keys[row["index"]] for row in predictions["s"]] == scored  # its position in the split, skipped ones too


def test_a_set_with_no_readable_image_is_one_line_naming_the_files(run_checkpoint, tmp_path, capsys):
    root = tmp_path / "dead"
    for name in ("circle", "square"):
        (root / name).mkdir(parents=True)
        (root / name / "0.jpg").write_bytes(b"")
    (root / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    argv = ["eval", str(run_checkpoint), "--dataset", str(root), "--out", str(tmp_path / "out"), *FAST]
    one_line_error(capsys, argv, "none of the 2 images could be read", "circle/0.jpg (not an image PIL can read)")


# --- destinations that cannot be written -----------------------------------------------------------------------


def test_unwritable_destinations_are_refused_before_the_model_loads(
    run_checkpoint, synth_data, tmp_path, capsys, no_model
):
    shapes = str(synth_data / "eval" / "shapes")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    (tmp_path / "folder.csv").mkdir()
    base = ["eval", str(run_checkpoint), "--dataset", shapes, *FAST]
    out = ["--out", str(tmp_path / "out")]
    cases = [
        (
            [*out, "--predictions", str(tmp_path / "folder.csv")],
            f"--predictions {tmp_path / 'folder.csv'}: is a folder",
        ),
        ([*out, "--predictions", str(a_file / "p.csv")], f"{a_file} is a file, so no folder can be made under it"),
        (["--out", str(a_file)], f"--out {a_file}: is a file, not a folder"),
        (["--out", str(a_file / "sub")], f"--out {a_file / 'sub'}: {a_file} is a file"),
    ]
    for args, message in cases:
        one_line_error(capsys, [*base, *args], message)
    with pytest.raises(AssertionError, match="the model was loaded"):  # folders that can be made: checks pass
        main([*base, *out, "--predictions", str(tmp_path / "new" / "dir" / "p.csv")])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_destination_is_refused_before_the_model_loads(
    run_checkpoint, synth_data, tmp_path, capsys, no_model
):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    base = ["eval", str(run_checkpoint), "--dataset", str(synth_data / "eval" / "shapes"), *FAST]
    one_line_error(capsys, [*base, "--out", str(locked)], f"--out {locked}: cannot be written (permission denied)")
    argv = [*base, "--out", str(tmp_path / "o"), "--predictions", str(locked / "p.csv")]
    one_line_error(capsys, argv, f"nothing can be created in {locked} (permission denied)")


def test_the_reason_a_folder_cannot_be_written_is_named(tmp_path, monkeypatch):
    """As root nothing is refused for its permissions, so the refusals are shown with os.access saying no."""
    from types import SimpleNamespace

    from clipforge.evaluation.predictions import check_destination

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=f"--out {tmp_path}: cannot be written \\(permission denied\\)$"):
        check_destination(tmp_path, "--out", folder=True)
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(ValueError, match=f"nothing can be created in {tmp_path} \\(read-only filesystem\\)$"):
        check_destination(tmp_path / "new" / "p.csv", "--predictions")


# --- suite files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "- name: a\n- name: b\n",
            "suite.yaml: the top level must be a mapping with name, data_root, datasets; got a list",
        ),
        ("name: s\ndatasets:\n  - {name: a, task: b\n", "suite.yaml: not valid YAML at line 4, column 1: did not find"),
        (
            "datasets:\n  - {name: a, task: zeroshot_retrieval, path: x, recall_k: 5}\n",
            "suite.yaml: key 'datasets[0].recall_k': expected a list, got 5",
        ),
        (
            "datasets:\n  - {name: a, task: zeroshot_retrieval, path: x}\n"
            "  - {name: b, task: linear_probe, path: x, seed: abc}\n",
            "suite.yaml: key 'datasets[1].seed': Value 'abc' of type 'str' could not be converted to Integer",
        ),
        (
            "datasets:\n  - {name: a, task: linear_probe, path: x, folds: 5}\n",
            "key 'datasets[0].folds': unknown (known: name",
        ),
        ("title: s\ndatasets: []\n", "suite.yaml: key 'title': unknown (known: name, data_root, datasets)"),
        ("datasets: {name: a}\n", "key 'datasets': expected a list"),
        ("datasets:\n  - a\n", "key 'datasets[0]': expected a mapping with name, task, path; got 'a'"),
        ("datasets:\n  - {name: a, path: x}\n", "key 'datasets[0].task': required, missing"),
        (
            "datasets:\n  - {name: a, task: zeroshot_classification, path: x, classnames: 3}\n",
            "suite.yaml: datasets[0].classnames = 3: expected openai_imagenet",
        ),
        (
            "datasets:\n  - {name: a, task: zeroshot_retrieval, path: x, recall_k: [1, 0]}\n",
            "datasets[0].recall_k = [1, 0]: expected a list of k >= 1",
        ),
    ],
    ids=[
        "top-level-list",
        "yaml-syntax",
        "recall_k-scalar",
        "wrong-type",
        "unknown-key",
        "unknown-top-key",
        "datasets-mapping",
        "entry-scalar",
        "missing-key",
        "classnames-type",
        "recall_k-value",
    ],
)
def test_suite_files_are_validated_like_run_configs(text, message, run_checkpoint, tmp_path, capsys, no_model):
    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    with pytest.raises(ValueError) as raised:
        load_suite(suite, check=False)
    assert message in str(raised.value) and str(suite) in str(raised.value)
    one_line_error(capsys, ["eval", str(run_checkpoint), "--suite", str(suite)], message)


# --- CSV injection ---------------------------------------------------------------------------------------------

FORMULAS = ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_text_that_a_spreadsheet_would_run_is_escaped_in_csv_and_raw_in_jsonl(suffix, tmp_path):
    names = [*FORMULAS, "plain"]
    logits = torch.eye(len(names)) - 0.5  # negative scores stay numbers
    rows = classification_rows(logits, torch.arange(len(names)), names, [f"-id{i}" for i in range(len(names))], k=2)
    images = F.normalize(torch.eye(3), dim=-1)
    captions = retrieval_rows(images, images, torch.arange(3), FORMULAS[:3], ["=a", "b", "c"], k=2)
    path, retrieval_path = tmp_path / f"c{suffix}", tmp_path / f"r{suffix}"
    write_predictions(rows, path)
    write_predictions(captions, retrieval_path)
    if suffix == ".jsonl":
        read = [json.loads(line) for line in path.read_text().splitlines()]
        assert [row["label_name"] for row in read] == names and read[0]["id"] == "-id0"
        assert [row["text"] for row in map(json.loads, retrieval_path.read_text().splitlines())][:3] == FORMULAS[:3]
        return
    with open(path, newline="") as stream:
        read = list(csv.DictReader(stream))
    assert [row["label_name"] for row in read] == [f"'{name}" for name in FORMULAS] + ["plain"]
    assert [row["top1_name"] for row in read][:2] == ['\'=HYPERLINK("http://x")', "'+1+1"]
    assert read[0]["id"] == "'-id0" and float(read[0]["top2_score"]) == -0.5
    with open(retrieval_path, newline="") as stream:
        retrieved = list(csv.DictReader(stream))
    assert [row["text"] for row in retrieved][:3] == [f"'{text}" for text in FORMULAS[:3]]
    assert retrieved[0]["query"] == "'=a#0" and retrieved[0]["relevant"] == "'=a" and retrieved[0]["top1_id"] == "'=a"


# --- a run directory instead of a checkpoint -------------------------------------------------------------------


def test_a_run_directory_suggests_its_latest_checkpoint(run_checkpoint, synth_data, tmp_path, capsys):
    run_dir = run_checkpoint.parent.parent
    (run_dir / "config.yaml").write_text((run_checkpoint / "config.yaml").read_text())  # as training leaves it
    for given in (run_dir, run_dir / "checkpoints"):
        with pytest.raises(FileNotFoundError, match=f"did you mean {run_dir / 'checkpoints' / 'latest'}\\?$"):
            model_kind(str(given))
        argv = ["eval", str(given), "--dataset", str(synth_data / "eval" / "shapes")]
        one_line_error(capsys, argv, f"{given} is a ", f"did you mean {run_dir / 'checkpoints' / 'latest'}?")
    assert model_kind(str(run_dir / "checkpoints" / "latest")) == "clipforge"
    empty = tmp_path / "new_run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="did you mean .*latest\\? \\(no checkpoint is written there yet\\)"):
        model_kind(str(empty))
