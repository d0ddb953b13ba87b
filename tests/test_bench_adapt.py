"""bench/adapt.py: its digits set against scikit-learn's, its method configs as the trainer counts them, and (slow)
the whole bench in its --quick form."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench" / "adapt.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_adapt", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_digits_folder_holds_every_sklearn_digit_once_upscaled_with_its_label(tmp_path):
    from sklearn.datasets import load_digits

    from clipforge.evaluation import load_benchmark

    bench = load_bench()
    folder = bench.write_digits(tmp_path / "digits", size=32)
    digits = load_digits()
    seen = {}
    for split in ("train", "test"):
        benchmark = load_benchmark(folder, split=split)  # as clipforge eval opens it
        assert benchmark.classnames == list(bench.CLASSNAMES) and benchmark.templates == list(bench.TEMPLATES)
        for index in range(len(benchmark)):
            original = int(Path(benchmark.source.key(index)).stem)
            assert original not in seen
            seen[original] = split
            assert benchmark.source.target(index) == digits.target[original]
            image = benchmark.image(index)
            assert image.size == (32, 32)
            # shrunk back to 8 × 8 by averaging 4 × 4 blocks, it is the sklearn digit (0..16 → 0..255)
            small = np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=float)
            assert np.corrcoef(small.ravel(), digits.images[original].ravel())[0, 1] > 0.9
    assert sorted(seen) == list(range(len(digits.target)))
    test = [digits.target[i] for i, split in seen.items() if split == "test"]
    assert len(test) == 450  # 25%, stratified: a quarter of each class, to rounding
    assert np.abs(np.bincount(test) - np.bincount(digits.target) / 4).max() <= 1


def test_the_method_configs_train_what_each_row_says(tmp_path, synth_data, tiny_resnet_json):
    from argparse import Namespace

    bench = load_bench()
    bench.MODEL = tiny_resnet_json
    shards = {}
    for name in ("one", "all"):
        shards[name] = tmp_path / name
        shards[name].mkdir()
        (shards[name] / "00000.tar").write_bytes(b"")
    args = Namespace(steps=20, lr=3e-4, lora_lr=2e-3)
    from checkpointing import save_checkpoint

    from clipforge.config import to_yaml
    from clipforge.models import build_model
    from clipforge.train.config import load_config

    cfg = load_config(None, ["data.train_urls=x/{0..1}.tar", f"model.name={tiny_resnet_json}"])
    built = build_model(cfg.model)
    initial = save_checkpoint(tmp_path / "initial" / "checkpoints", built.model, 1, to_yaml(cfg))
    configs = bench.method_configs(tmp_path, initial, shards, args)
    counts = {
        name: bench.trainable_parameters(bench.write_yaml(tmp_path / f"{name}.yaml", config))
        for name, config in configs.items()
    }
    model = built.model
    everything = sum(p.numel() for p in model.parameters())
    assert counts["full"] == counts["flyp"] == everything
    # LoRA: rank-8 adapters on q, k, v, out and both MLP layers of every text block, by hand, and nothing else
    width, layers = model.transformer.width, len(model.transformer.resblocks)
    per_block = 3 * 8 * (width + width) + 8 * (width + width) + 8 * (width + 4 * width) + 8 * (4 * width + width)
    assert counts["lora"] == layers * per_block + 1  # + logit_scale
    assert configs["flyp"]["data"]["caption_key"] == "txt:lines" and configs["full"]["data"]["caption_key"] == "txt"
    assert all(c["loss"]["positives"] == "caption" for c in configs.values())


@pytest.mark.slow
def test_the_quick_bench_runs_end_to_end_and_its_table_holds_the_runs_numbers(tmp_path):
    bench = load_bench()
    text = bench.main(["--quick", "--work", str(tmp_path / "work")])
    record = json.loads((tmp_path / "work" / "adapt.json").read_text())
    tables = [block.splitlines()[2:] for block in text.split("\n\n") if block.startswith("|")]
    rows, sweep_rows, batchnorm_rows = tables
    assert len(rows) == 5 and len(sweep_rows) == 3 and len(batchnorm_rows) == 2 * len(bench.BN_ALPHAS)
    (seed,) = record["seeds"].values()
    sweep = json.loads((tmp_path / "work" / "seed0" / "wise" / "wise_ft.json").read_text())
    by_alpha = {row["alpha"]: row for row in sweep["alphas"]}
    assert seed["rows"]["full"][:2] == [by_alpha[1.0]["target_score"], by_alpha[1.0]["retention_score"]]
    assert seed["rows"]["zero-shot"][:2] == [by_alpha[0.0]["target_score"], by_alpha[0.0]["retention_score"]]
    chosen = by_alpha[sweep["chosen_alpha"]]
    assert seed["rows"]["wise"][:2] == [chosen["target_score"], chosen["retention_score"]]
    # the rule: the chosen alpha loses at most a point of retention
    assert chosen["retention_score"] >= by_alpha[0.0]["retention_score"] - 0.01 - 1e-9
    for name in ("lora", "flyp"):
        (evaluated,) = (tmp_path / "work" / "seed0" / f"{name}-eval").glob("*.json")
        results = json.loads(evaluated.read_text())
        assert seed["rows"][name][0] == results["digits"]["acc1"]
    shown = [float(value) / 100 for value in re.findall(r"\| (\d+\.\d)%", rows[1])]
    assert shown[0] == pytest.approx(seed["rows"]["full"][0], abs=0.0006)
    # with the BatchNorm statistics interpolated, alpha=1 is the fine-tuned model wise-ft scored
    (at_one,) = [row for row in seed["batchnorm"] if row["alpha"] == 1.0 and row["statistics"] == "interpolated"]
    assert at_one["scores"] == pytest.approx(seed["rows"]["full"][:2], abs=1e-9)
