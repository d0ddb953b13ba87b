"""Dense evaluation in the product: the suite's dense tasks (the same numbers as the evaluators), their options and
one-line errors, the results table and headline, the segmentation plot, ``clipforge eval --dataset`` on each dense
layout, and the evaluation during training (logged metrics and the plot at each evaluation step).

The sets are the stripe scenes and box images of tests/test_dense_evaluation.py; the model is the tiny ViT (32 px,
a 4 x 4 grid of 8-px patches), random, so that every run is a fraction of a second.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_fixtures import assert_valid_png
from PIL import Image
from test_dense_evaluation import CLASSNAMES, write_referring_set, write_segmentation_set
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

from clipforge.cli import main
from clipforge.evaluation import OpenClipEncoder, load_suite, run_suite
from clipforge.evaluation.dense_datasets import CropGeometry, load_referring_set, load_segmentation_set
from clipforge.evaluation.dense_suite import EXAMPLE_IMAGES
from clipforge.evaluation.plots import class_colours, segmentation_size
from clipforge.evaluation.referring import referring_expressions
from clipforge.evaluation.report import headline, markdown_table, sizes_table, write_report
from clipforge.evaluation.segmentation import linear_probe_segmentation, zero_shot_segmentation
from clipforge.evaluation.suite import single_dataset_suite
from clipforge.evaluation.zeroshot import build_classifier

BATCH = 4  # several batches per split, so that examples and confusion matrices add up across them


@pytest.fixture(scope="module")
def dense_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {
        "segmentation": write_segmentation_set(root / "segmentation", {"train": 10, "test": 6}, ignore_bands=True),
        "test_only": write_segmentation_set(root / "test_only", {"test": 5}, seed=1),
        "referring": write_referring_set(root / "referring", num_images=3),
    }


@pytest.fixture(scope="module")
def tiny_vit(tiny_model_json):
    from clipforge.models.builder import build_model
    from clipforge.models.config import ModelConfig

    torch.manual_seed(0)
    built = build_model(ModelConfig(name=tiny_model_json))
    built.model.eval()
    return built


def write_suite(path, entries: list[dict]) -> str:
    path.write_text(json.dumps({"name": "dense", "datasets": entries}))
    return str(path)


def dense_entries(sets) -> list[dict]:
    return [
        {"name": "segmentation", "task": "zeroshot_segmentation", "path": str(sets["segmentation"])},
        {"name": "segmentation-plain", "task": "zeroshot_segmentation", "path": str(sets["segmentation"]),
         "variant": "plain"},
        {"name": "segmentation-probe", "task": "segmentation_probe", "path": str(sets["segmentation"])},
        {"name": "referring", "task": "referring_expressions", "path": str(sets["referring"])},
    ]  # fmt: skip


def without_timing(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key not in ("seconds", "task", "dataset")}


def test_suite_gives_the_evaluators_numbers_and_keeps_examples(dense_sets, tiny_vit, tmp_path):
    built, encoder = tiny_vit, OpenClipEncoder(tiny_vit.model)
    suite = load_suite(write_suite(tmp_path / "suite.yaml", dense_entries(dense_sets)))
    examples = {}
    results = run_suite(encoder, built.tokenizer, built.eval_transform, suite, BATCH, 0, examples=examples)
    train = load_segmentation_set(dense_sets["segmentation"], "train")
    test = load_segmentation_set(dense_sets["segmentation"], "test")
    transform = built.eval_transform
    expected = {
        "segmentation": zero_shot_segmentation(encoder, built.tokenizer, test, transform, batch_size=BATCH),
        "segmentation-plain": zero_shot_segmentation(encoder, built.tokenizer, test, transform, "plain", BATCH),
        "segmentation-probe": linear_probe_segmentation(encoder, train, test, transform, batch_size=BATCH),
        "referring": referring_expressions(
            encoder, built.tokenizer, load_referring_set(dense_sets["referring"]), transform
        ),
    }
    for name, metrics in expected.items():
        assert without_timing(results[name]) == metrics, name
        assert results[name]["task"] == suite.datasets[[e.name for e in suite.datasets].index(name)].task
    assert results["segmentation"]["variant"] == "maskclip" and results["segmentation"]["grid"] == [4, 4]
    assert results["segmentation-probe"]["dataset"]["num_train_images"] == 10
    assert results["referring"]["dataset"] | {"path": None} == {
        "path": None, "layout": "referring", "split": "test", "num_images": 3, "num_expressions": 9,
    }  # fmt: skip
    json.dumps(results)  # the results stay JSON: the examples went to their own dict

    # the examples: the first test images as the model saw them, their masks through the resizing rule, and the
    # prediction recomputed here from the patch embeddings and the class-name classifier
    assert set(examples) == {"segmentation", "segmentation-plain", "segmentation-probe"}
    kept = examples["segmentation"]
    assert kept.crops.shape == (EXAMPLE_IMAGES, 32, 32, 3) and kept.crops.dtype == np.uint8
    geometry = CropGeometry(transform)
    resize, crop = Resize(32, interpolation=InterpolationMode.BICUBIC), CenterCrop(32)
    for index in range(EXAMPLE_IMAGES):
        assert np.array_equal(kept.masks[index], geometry.mask(test.mask(index)))
        seen = np.asarray(crop(resize(test.image(index)))).astype(int)
        assert np.abs(kept.crops[index].astype(int) - seen).max() <= 1, index  # normalisation undone, rounding
    assert (kept.masks == -1).any()  # the ignore bands are kept as ignore
    images = torch.stack([transform(test.image(index)) for index in range(EXAMPLE_IMAGES)])
    classifier = build_classifier(encoder, built.tokenizer, test.classnames, test.templates)
    scores = encoder.encode_image_dense(images, tokens=False).embeddings @ classifier
    upsampled = F.interpolate(scores.permute(0, 3, 1, 2), size=(32, 32), mode="bilinear", align_corners=False)
    assert np.array_equal(kept.predicted, upsampled.argmax(dim=1).numpy())
    assert kept.classnames == CLASSNAMES and kept.task == "zeroshot_segmentation"


def test_table_headline_and_plot_show_the_dense_metrics(dense_sets, tiny_vit, tmp_path):
    built = tiny_vit
    suite = load_suite(write_suite(tmp_path / "suite.yaml", dense_entries(dense_sets)))
    examples = {}
    results = run_suite(
        OpenClipEncoder(built.model), built.tokenizer, built.eval_transform, suite, BATCH, 0, examples=examples
    )
    flat = headline(results)
    assert flat["segmentation/miou"] == results["segmentation"]["miou"]
    assert flat["segmentation-probe/pixel_accuracy"] == results["segmentation-probe"]["pixel_accuracy"]
    assert flat["referring/accuracy"] == results["referring"]["accuracy"]
    assert len(flat) == 3 * 2 + 1
    table = markdown_table(results).splitlines()
    probe = results["segmentation-probe"]
    assert (
        f"| segmentation-probe | segmentation probe | mIoU | {probe['miou']:.1%} | {probe['chance_miou']:.1%} |"
        in table
    )
    assert "| segmentation-plain | zero-shot segmentation (plain) | pixel accuracy | " in "\n".join(table)
    referring = results["referring"]
    assert (
        f"| referring | referring expressions (maskclip) | accuracy (IoU > 0.5) | {referring['accuracy']:.1%} | "
        f"{referring['chance']:.1%} |" in table
    )
    assert [row.split(" | ")[0] for row in table[2:]] == ["| segmentation"] * 2 + ["| segmentation-plain"] * 2 + [
        "| segmentation-probe"
    ] * 2 + ["| referring"]
    sizes = sizes_table(results)
    assert "| segmentation-probe | segmentation probe (grid 4×4) | train → test | 6 | 3 classes |" in sizes
    assert "| referring | referring expressions (grid 4×4) | test | 3 | 9 expressions |" in sizes

    written = write_report(results, tmp_path / "out", "dense", examples=examples)
    plot = tmp_path / "out" / "dense_segmentation-probe_segmentation.png"
    assert plot in written and len([path for path in written if path.suffix == ".png"]) == 3
    assert_valid_png(plot)
    image = Image.open(plot).convert("RGB")
    assert image.size == segmentation_size(EXAMPLE_IMAGES)
    # the panels: the true masks' classes and the ignore band in the fixed palette, and the input's own colours
    pixels = np.asarray(image).reshape(-1, 3)
    colours = {tuple(colour) for colour in np.unique(pixels, axis=0)}
    kept = examples["segmentation-probe"]
    palette = class_colours(len(CLASSNAMES))
    for label in np.unique(kept.masks):
        assert (tuple(palette[label]) if label >= 0 else (0, 0, 0)) in colours, label
    for colour in np.unique(kept.crops.reshape(-1, 3), axis=0)[:5]:
        assert tuple(colour) in colours
    assert "segmentation" in (tmp_path / "out" / "dense.md").read_text()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"task": "linear_probe", "variant": "plain"}, "datasets[0].variant = 'plain': only for zeroshot_segmentation"),
        ({"variant": "fancy"}, "datasets[0].variant = 'fancy' is not one of ('maskclip', 'plain')"),
        ({"ignore_index": 300}, "datasets[0].ignore_index = 300: masks are 8-bit, so 0 to 255"),
        ({"reduce_zero_label": "maybe"}, "datasets[0].reduce_zero_label"),
        ({"max_train_patches": 5}, "datasets[0].max_train_patches = 5: only for segmentation_probe"),
        ({"task": "segmentation_probe", "max_train_patches": 0}, "max_train_patches = 0: must be at least 1"),
        ({"format": "wds"}, "datasets[0].format = 'wds': not for zeroshot_segmentation (a dense task reads"),
        (
            {"task": "segmentation_probe", "val_split": "val"},
            "datasets[0].val_split = 'val': not for segmentation_probe",
        ),
        ({"task": "referring_expressions", "classnames": ["a"]}, "datasets[0].classnames = ['a']: not for referring"),
    ],
)
def test_a_bad_dense_option_is_one_line_naming_the_key(tmp_path, entry, message):
    suite = write_suite(tmp_path / "suite.yaml", [{"name": "x", "task": "zeroshot_segmentation", "path": "x", **entry}])
    with pytest.raises(ValueError) as error:
        load_suite(suite, check=False)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert str(error.value).startswith(f"{suite}: ")


def test_missing_or_broken_dense_data_fails_before_the_model(tmp_path, tiny_model_json, tiny_weights, capsys):
    missing = tmp_path / "nowhere"
    suite = write_suite(
        tmp_path / "suite.yaml",
        [
            {"name": "seg", "task": "segmentation_probe", "path": str(missing), "get": "clipforge prep synthetic"},
            {"name": "refs", "task": "referring_expressions", "path": str(missing)},
        ],
    )
    with pytest.raises(FileNotFoundError) as error:
        load_suite(suite)
    text = str(error.value)
    assert f"expects its files at {missing} (segmentation folders: {missing}/images/{{test,train}}/NAME.jpg" in text
    assert "Get them with:  clipforge prep synthetic" in text
    assert f"{missing}/refs_test.json" in text
    broken = tmp_path / "broken"
    write_segmentation_set(broken, {"test": 2})
    (broken / "annotations" / "test" / "0001.png").unlink()
    suite = write_suite(
        tmp_path / "broken.yaml", [{"name": "seg", "task": "zeroshot_segmentation", "path": str(broken)}]
    )
    assert main(["eval", "--model", tiny_model_json, "--weights", str(tiny_weights), "--suite", suite]) == 2
    err = capsys.readouterr().err
    assert f"0001.png: no annotation {broken}/annotations/test/0001.png" in err and err.count("\n") == 1, err


def test_a_tower_without_patches_is_refused_before_any_image(dense_sets, tmp_path):
    class NoPatches:
        def encode_image(self, images):
            raise AssertionError("no image should be read")

    suite = load_suite(write_suite(tmp_path / "suite.yaml", dense_entries(dense_sets)[-1:]))
    with pytest.raises(ValueError, match="NoPatches gives no patch features") as error:
        run_suite(NoPatches(), None, None, suite)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def tiny_weights(tiny_vit, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(tiny_vit.model.state_dict(), path)
    return path


def run_cli(tiny_model_json, weights, out, *args) -> dict:
    argv = ["eval", "--model", tiny_model_json, "--weights", str(weights), "--out", str(out), "--quiet"]
    assert main([*argv, "--workers", "0", "--batch-size", str(BATCH), *map(str, args)]) == 0
    (written,) = out.glob("*.json")
    return json.loads(written.read_text())


def test_eval_dataset_recognises_each_dense_layout(dense_sets, tiny_vit, tiny_model_json, tiny_weights, tmp_path):
    from_suite = run_cli(
        tiny_model_json, tiny_weights, tmp_path / "suite", "--suite",
        write_suite(tmp_path / "suite.yaml", dense_entries(dense_sets)),
    )  # fmt: skip
    segmentation = run_cli(tiny_model_json, tiny_weights, tmp_path / "seg", "--dataset", dense_sets["segmentation"])
    assert {name: metrics["task"] for name, metrics in segmentation.items()} == {
        "segmentation": "zeroshot_segmentation",
        "segmentation-probe": "segmentation_probe",
    }  # a train split: the probe too
    for name, metrics in segmentation.items():
        assert without_timing(metrics) == without_timing(from_suite[name]), name
    assert sorted(path.name for path in (tmp_path / "seg").glob("*.png")) == [
        "segmentation_tiny_segmentation-probe_segmentation.png",
        "segmentation_tiny_segmentation_segmentation.png",
    ]
    plain = run_cli(
        tiny_model_json, tiny_weights, tmp_path / "plain", "--dataset", dense_sets["segmentation"],
        "--task", "zeroshot_segmentation", "--variant", "plain", "--no-plots",
    )  # fmt: skip
    assert without_timing(plain["segmentation"]) == without_timing(from_suite["segmentation-plain"])
    test_only = run_cli(tiny_model_json, tiny_weights, tmp_path / "test_only", "--dataset", dense_sets["test_only"])
    assert {name: metrics["task"] for name, metrics in test_only.items()} == {"test_only": "zeroshot_segmentation"}
    referring = run_cli(tiny_model_json, tiny_weights, tmp_path / "refs", "--dataset", dense_sets["referring"])
    assert without_timing(referring["referring"]) == without_timing(from_suite["referring"])
    # ADE20K's convention: value 0 is ignored and the others name classes one lower
    reduced = run_cli(
        tiny_model_json, tiny_weights, tmp_path / "reduced", "--dataset", dense_sets["test_only"],
        "--reduce-zero-label", "--classnames", _names(tmp_path),
    )  # fmt: skip
    masks = [load_segmentation_set(dense_sets["test_only"]).mask(i) for i in range(5)]
    geometry = CropGeometry(tiny_vit.eval_transform)
    labelled = sum(int((geometry.mask(mask) > 0).sum()) for mask in masks)
    assert reduced["test_only"]["num_pixels"] == labelled and reduced["test_only"]["num_classes"] == 2


def _names(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("circle\nsquare\n")
    return path


def test_eval_dataset_options_that_do_not_fit_a_dense_set_are_one_line_errors(
    dense_sets, tiny_model_json, tiny_weights, tmp_path, capsys
):
    shapes_like = dense_sets["segmentation"]
    cases = [
        (["--dataset", shapes_like, "--predictions", tmp_path / "p.csv"], "--predictions: per-image predictions"),
        (["--dataset", shapes_like, "--task", "linear_probe"], "is a segmentation set, whose tasks are"),
        (["--dataset", dense_sets["referring"], "--classnames", _names(tmp_path)], "classnames = ['circle', 'square']"),
        (["--dataset", dense_sets["referring"], "--ignore-index", "0"], "ignore_index = 0: only for"),
        (["--dataset", shapes_like, "--format", "wds"], "format = 'wds': not for zeroshot_segmentation"),
    ]
    for args, message in cases:
        argv = ["eval", "--model", tiny_model_json, "--weights", str(tiny_weights), *map(str, args)]
        assert main(argv) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)
    assert single_dataset_suite(shapes_like, split="train").datasets[0].task == "zeroshot_segmentation"
    assert len(single_dataset_suite(shapes_like, split="train").datasets) == 1  # no probe on its own train split


def train_config(synth_data, model_json, out, suite, *extra):
    from clipforge.train.config import load_config

    return load_config(
        None,
        [
            f"data.train_urls={synth_data}/train/{{00000..00005}}.tar",
            "data.batch_size=16",
            "data.num_workers=0",
            "data.shuffle_buffer=50",
            f"model.name={model_json}",
            "optim.warmup_steps=1",
            f"train.output_dir={out}",
            "train.steps=4",
            "checkpoint.every=100",
            "logging.log_every=2",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            f"eval.suite={suite}",
            "eval.every_n_steps=2",
            f"eval.batch_size={BATCH}",
            "eval.num_workers=0",
            *extra,
        ],
    )


def test_training_logs_dense_metrics_and_plots_at_each_evaluation(dense_sets, synth_data, tiny_model_json, tmp_path):
    from clipforge.train.loop import train

    suite = write_suite(tmp_path / "suite.yaml", [dense_entries(dense_sets)[i] for i in (0, 2, 3)])
    run_dir = tmp_path / "run"
    result = train(train_config(synth_data, tiny_model_json, run_dir, suite, "logging.plot=true"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [record for record in records if "eval/segmentation/miou" in record]
    assert [record["step"] for record in logged] == [2, 4]
    for record in logged:
        written = json.loads((run_dir / "eval" / f"step_{record['step']:08d}.json").read_text())
        assert record["eval/segmentation/miou"] == written["segmentation"]["miou"]
        assert record["eval/segmentation-probe/pixel_accuracy"] == written["segmentation-probe"]["pixel_accuracy"]
        assert record["eval/referring/accuracy"] == written["referring"]["accuracy"]
        for name in ("segmentation", "segmentation-probe"):
            plot = run_dir / "eval" / f"step_{record['step']:08d}_{name}_segmentation.png"
            assert Image.open(plot).size == segmentation_size(EXAMPLE_IMAGES)
    assert "| segmentation-probe | segmentation probe | mIoU |" in result["eval_table"]


def test_training_refuses_a_tower_without_patches_before_its_first_step(
    dense_sets, synth_data, tiny_model_json, tmp_path
):
    from clipforge.train.loop import train

    config = json.loads(open(tiny_model_json).read())
    config["vision_cfg"]["attentional_pool"] = True
    model_json = tmp_path / "pooled.json"
    model_json.write_text(json.dumps(config))
    suite = write_suite(tmp_path / "suite.yaml", dense_entries(dense_sets)[:1])
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="attentional pooler") as error:
        train(train_config(synth_data, str(model_json), run_dir, suite))
    assert "\n" not in str(error.value)
    assert not (run_dir / "metrics.jsonl").exists() or "train/loss" not in (run_dir / "metrics.jsonl").read_text()


def test_the_model_card_table_shows_the_dense_rows_beside_their_chance():
    from clipforge.eval_results import markdown_table

    results = {
        "seg": {
            "task": "zeroshot_segmentation",
            "variant": "maskclip",
            "miou": 0.25,
            "chance_miou": 0.037,
            "pixel_accuracy": 0.9,
            "chance_pixel_accuracy": 0.143,
        },
        "refs": {"task": "referring_expressions", "variant": "maskclip", "accuracy": 0.5, "chance": 0.342},
    }
    rows = markdown_table(results).splitlines()[2:]
    assert rows == [
        "| seg | zero-shot segmentation (maskclip) | mIoU | 25.0% | 3.7% |",
        "| seg | zero-shot segmentation (maskclip) | pixel accuracy | 90.0% | 14.3% |",
        "| refs | referring expressions (maskclip) | accuracy (IoU > 0.5) | 50.0% | 34.2% |",
    ]
