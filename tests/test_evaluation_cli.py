"""``clipforge eval CKPT --dataset PATH``: one dataset without a suite, template placeholders, predictions files."""

import csv
import json

import pytest
import webdataset as wds
from eval_fixtures import write_hf, write_imagefolder

from clipforge.cli import main
from clipforge.evaluation import load_benchmark, load_suite
from clipforge.evaluation.suite import single_dataset_suite
from clipforge.evaluation.zeroshot import class_prompts

FAST = ["--quiet", "--no-plots", "--workers", "0", "--batch-size", "100"]


def run_eval(checkpoint, out, *args):
    """`clipforge eval` → the results JSON it wrote, as {dataset name: metrics without timings}."""
    assert main(["eval", str(checkpoint), "--out", str(out), *FAST, *map(str, args)]) == 0
    (written,) = out.glob("*.json")
    results = json.loads(written.read_text())
    return {name: {k: v for k, v in metrics.items() if k != "seconds"} for name, metrics in results.items()}


@pytest.fixture(scope="module")
def layouts(synth_data, tmp_path_factory):
    """The synthetic shapes and retrieval sets in each layout the suite reads."""
    root = tmp_path_factory.mktemp("layouts")
    shapes, retrieval = synth_data / "eval" / "shapes", synth_data / "eval" / "retrieval"
    return {
        "wds": shapes,
        "imagefolder": write_imagefolder(shapes, root / "shapes_folder"),
        "hf": write_hf(shapes, root / "shapes_hf", "classification"),
        "wds-retrieval": retrieval,
        "hf-retrieval": write_hf(retrieval, root / "retrieval_hf", "retrieval"),
    }


def test_one_dataset_gives_the_numbers_of_the_equivalent_suite_on_each_layout(trained_checkpoint, layouts, tmp_path):
    templates = layouts["wds"] / "zeroshot_classification_templates.txt"  # the HF copy ships none
    entries = [
        {"name": "wds", "task": "zeroshot_classification", "path": str(layouts["wds"])},
        {"name": "imagefolder", "task": "zeroshot_classification", "path": str(layouts["imagefolder"])},
        {"name": "hf", "task": "zeroshot_classification", "path": str(layouts["hf"]), "templates": str(templates)},
        {"name": "wds-retrieval", "task": "zeroshot_retrieval", "path": str(layouts["wds-retrieval"])},
        {"name": "hf-retrieval", "task": "zeroshot_retrieval", "path": str(layouts["hf-retrieval"])},
    ]
    suite = tmp_path / "suite.yaml"
    suite.write_text(json.dumps({"name": "layouts", "datasets": entries}))
    from_suite = run_eval(trained_checkpoint, tmp_path / "suite", "--suite", suite)
    for entry in entries:  # no --task: the default follows what the dataset holds
        extra = ["--templates", templates] if entry["name"] == "hf" else []
        single = run_eval(trained_checkpoint, tmp_path / entry["name"], "--dataset", entry["path"], *extra)
        (result,) = single.values()
        assert result == from_suite[entry["name"]], entry["name"]
        assert result["task"] == entry["task"]
    # the three classification layouts really are one set: the same numbers whichever way it is read
    for name in ("imagefolder", "hf"):
        for key in ("acc1", "acc5", "per_class_accuracy"):
            assert from_suite[name][key] == from_suite["wds"][key], (name, key)
        # the image folder sums per-class recalls in its own (alphabetical) class order
        assert from_suite[name]["mean_per_class_recall"] == pytest.approx(from_suite["wds"]["mean_per_class_recall"])
    assert 1 / 6 + 0.05 < from_suite["wds"]["acc5"] < 1  # a trained model, not a constant prediction


def test_brace_and_c_placeholders_give_identical_scores(trained_checkpoint, synth_data, tmp_path):
    colors = synth_data / "eval" / "colors"
    shipped = [line for line in (colors / "zeroshot_classification_templates.txt").read_text().splitlines() if line]
    assert all("{c}" in template for template in shipped)
    c_file, brace_file = tmp_path / "c.txt", tmp_path / "brace.json"
    c_file.write_text("\n".join(shipped) + "\n\n")  # a trailing blank line is not a template
    brace_file.write_text(json.dumps([template.replace("{c}", "{}") for template in shipped]))
    with_c = run_eval(trained_checkpoint, tmp_path / "c", "--dataset", colors, "--templates", c_file)
    with_brace = run_eval(trained_checkpoint, tmp_path / "brace", "--dataset", colors, "--templates", brace_file)
    assert with_c == with_brace
    assert with_c["colors"]["acc1"] > 2 * with_c["colors"]["chance_acc1"]  # the class names reached the prompts
    assert class_prompts(["red", "blue"], ["a {} {c}.", "{}"]) == [["a red red.", "red"], ["a blue blue.", "blue"]]
    assert class_prompts(["{}"], ["a {c}"]) == [["a {}"]]  # a class name's own braces are left alone


def test_a_template_without_placeholder_is_refused_naming_it_before_the_model_loads(
    trained_checkpoint, synth_data, tmp_path, capsys, monkeypatch
):
    import clipforge.evaluation

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the templates were checked")

    monkeypatch.setattr(clipforge.evaluation, "load_eval_model", no_model)
    shapes = synth_data / "eval" / "shapes"
    for text in ("a photo of a {classname}.", "a photo of a dog."):
        templates = tmp_path / "templates.txt"
        templates.write_text(f"a photo of a {{c}}.\n{text}\n")
        assert main(["eval", str(trained_checkpoint), "--dataset", str(shapes), "--templates", str(templates)]) == 2
        err = capsys.readouterr().err
        assert repr(text) in err and str(templates) in err and err.count("\n") == 1, err
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"datasets:\n  - {{name: s, task: zeroshot_classification, path: {shapes}, templates: [a cat]}}\n")
    with pytest.raises(ValueError, match=r"datasets\[0\]\.templates: template 'a cat' has no class-name placeholder"):
        load_suite(suite)
    shipped = tmp_path / "shipped"  # a dataset whose own templates file is wrong fails at suite load too
    (shipped / "test").mkdir(parents=True)
    (shipped / "test" / "nshards.txt").write_text("1\n")
    (shipped / "zeroshot_classification_templates.txt").write_text("itap of a {c}.\n{label}\n")
    with pytest.raises(ValueError, match=r"zeroshot_classification_templates.txt: template '\{label\}'"):
        single_dataset_suite(shipped)
    (shipped / "zeroshot_classification_templates.txt").unlink()  # and one that ships none needs --templates
    with pytest.raises(ValueError, match="needs templates and the dataset ships none.*--templates"):
        single_dataset_suite(shipped)


def read_rows(path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def ranked(row, field, k):
    """The k ranked values of ``field`` (label/name/id) from a JSONL or CSV row, as strings."""
    if "top_scores" in row:
        key = {"label": "top_labels", "name": "top_names", "id": "top_ids"}[field]
        return [str(value) for value in row[key][:k]]
    return [row[f"top{rank}_{field}"] for rank in range(1, k + 1)]


def wds_keys(root):
    """Every sample's __key__, as webdataset itself reads the split."""
    shards = sorted((root / "test").glob("*.tar"), key=lambda p: int(p.stem))
    return [sample["__key__"] for sample in wds.WebDataset([str(s) for s in shards], shardshuffle=False)]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_classification_predictions_agree_with_the_reported_metrics(trained_checkpoint, layouts, tmp_path, suffix):
    for layout in ("wds", "imagefolder"):
        path = tmp_path / f"{layout}{suffix}"
        (metrics,) = run_eval(
            trained_checkpoint, tmp_path / layout, "--dataset", layouts[layout], "--predictions", path
        ).values()
        rows = read_rows(path)
        benchmark = load_benchmark(layouts[layout])
        assert len(rows) == metrics["num_samples"] == len(benchmark)
        assert [row["id"] for row in rows] == benchmark.keys()
        labels = [str(row["label"]) for row in rows]
        assert labels == [str(benchmark.source.target(i)) for i in range(len(benchmark))]
        assert [row["label_name"] for row in rows] == [benchmark.classnames[int(label)] for label in labels]
        assert (
            sum(ranked(row, "label", 1)[0] == label for row, label in zip(rows, labels)) / len(rows) == metrics["acc1"]
        )
        assert sum(label in ranked(row, "label", 5) for row, label in zip(rows, labels)) / len(rows) == metrics["acc5"]
        for row in rows:
            scores = row["top_scores"] if suffix == ".jsonl" else [float(row[f"top{r}_score"]) for r in range(1, 6)]
            assert len(scores) == 5 and scores == sorted(scores, reverse=True) and -1 <= min(scores) <= max(scores) <= 1
    assert [row["id"] for row in read_rows(tmp_path / f"wds{suffix}")] == wds_keys(layouts["wds"])
    assert read_rows(tmp_path / f"imagefolder{suffix}")[0]["id"].count("/") == 1  # CLASS/FILE under the split


def test_linear_probe_predictions_agree_with_the_reported_metrics(trained_checkpoint, synth_data, tmp_path):
    path = tmp_path / "probe.jsonl"
    shapes = synth_data / "eval" / "shapes"
    args = ["--dataset", shapes, "--task", "linear_probe", "--predictions", path, "--top-k", "2"]
    (metrics,) = run_eval(trained_checkpoint, tmp_path / "out", *args).values()
    rows = read_rows(path)
    assert len(rows) == metrics["num_samples"] and all(len(row["top_labels"]) == 2 for row in rows)
    assert sum(row["top_labels"][0] == row["label"] for row in rows) / len(rows) == metrics["acc1"]
    assert metrics["acc1"] > 0.3  # chance is 1/6


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_retrieval_predictions_agree_with_the_reported_recalls(trained_checkpoint, synth_data, tmp_path, suffix):
    retrieval, path = synth_data / "eval" / "retrieval", tmp_path / f"retrieval{suffix}"
    args = ["--dataset", retrieval, "--predictions", path, "--top-k", "11"]
    (metrics,) = run_eval(trained_checkpoint, tmp_path / "out", *args).values()
    rows = read_rows(path)
    keys = wds_keys(retrieval)
    benchmark = load_benchmark(retrieval)
    captions = {f"{key}#{j}": text for i, key in enumerate(keys) for j, text in enumerate(benchmark.source.target(i))}
    to_image = [row for row in rows if row["direction"] == "text_to_image"]
    to_text = [row for row in rows if row["direction"] == "image_to_text"]
    assert [row["query"] for row in to_image] == list(captions) and len(to_image) == metrics["num_texts"]
    assert [row["text"] for row in to_image] == list(captions.values())
    assert [row["query"] for row in to_text] == keys and len(to_text) == metrics["num_images"]

    def relevant(row):
        return row["relevant"] if suffix == ".jsonl" else row["relevant"].split(" ")

    assert all(relevant(row) == [row["query"].split("#")[0]] for row in to_image)
    assert all(relevant(row) == [c for c in captions if c.split("#")[0] == row["query"]] for row in to_text)

    def scores(row):
        return row["top_scores"] if suffix == ".jsonl" else [float(row[f"top{rank}_score"]) for rank in range(1, 12)]

    for k in (1, 5, 10):
        for direction, queries in (("image", to_image), ("text", to_text)):
            hits = sum(bool(set(ranked(row, "id", k)) & set(relevant(row))) for row in queries)
            # Captions repeated word for word embed equally: where the k-th and (k+1)-th scores tie, the top k is
            # ambiguous and the metrics' topk(k) may keep another of the tied ids than the file's topk(11) does.
            tied = sum(scores(row)[k - 1] == scores(row)[k] for row in queries)
            assert abs(hits - round(metrics[f"{direction}_retrieval_recall@{k}"] * len(queries))) <= tied, (k, tied)
    assert 0 < metrics["image_retrieval_recall@1"] < metrics["image_retrieval_recall@10"] < 1


def test_suite_or_dataset_exactly_one_and_options_that_do_not_apply_are_one_line_errors(
    trained_checkpoint, synth_data, synth_suite, capsys
):
    shapes = str(synth_data / "eval" / "shapes")
    cases = [
        ([], "give exactly one of --suite FILE"),
        (["--suite", str(synth_suite), "--dataset", shapes], "got both"),
        (["--suite", str(synth_suite), "--templates", "t.txt", "--top-k", "3"], "--templates, --top-k: only with"),
        (["--dataset", shapes, "--top-k", "3"], "--top-k 3: goes with --predictions"),
        (["--dataset", shapes, "--predictions", "out.txt"], "must be .csv or .jsonl, got '.txt'"),
        (["--dataset", shapes, "--data-root", "x"], "--data-root means"),
        (["--dataset", shapes, "--classnames", "missing.txt"], "'missing.txt' is neither openai_imagenet"),
        (["--dataset", str(synth_data / "nothing")], "does not exist"),
    ]
    for args, message in cases:
        assert main(["eval", str(trained_checkpoint), *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)
