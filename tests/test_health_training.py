"""Representation health wired in: the trainer's held-out diagnostics and collapse alarms, the multi-positive
loss fed by the pipeline's content ids, and `clipforge eval`'s health table and embedding plots."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.cli import main
from clipforge.config import ConfigError
from clipforge.data.loader import build_train_loader
from clipforge.evaluation import load_eval_model
from clipforge.evaluation.datasets import load_benchmark
from clipforge.evaluation.plots import HEATMAP_SIZE, HISTOGRAM_SIZE, PROJECTION_SIZE
from clipforge.models import build_model
from clipforge.train.config import load_config
from clipforge.train.health import CollapseError
from clipforge.train.loop import train


def config(synth_data, model_json, out, *extra):
    return load_config(
        None,
        [
            f"data.train_urls={synth_data}/train/{{00000..00005}}.tar",
            "data.batch_size=32",
            "data.num_workers=0",
            "data.shuffle_buffer=100",
            f"model.name={model_json}",
            "optim.lr=2e-3",
            "optim.warmup_steps=2",
            f"train.output_dir={out}",
            "checkpoint.every=100",
            "logging.log_every=1",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_health_is_measured_on_the_held_out_pairs_and_plotted(synth_data, synth_suite, tiny_resnet_json, tmp_path):
    run_dir = tmp_path / "run"
    train(
        config(
            synth_data,
            tiny_resnet_json,
            run_dir,
            "train.steps=6",
            f"eval.suite={synth_suite}",
            "eval.batch_size=100",
            "health.every_n_steps=3",
            "health.num_samples=64",
            "logging.plot=true",
        )
    )
    measured = [r for r in records(run_dir) if "health/alignment" in r]
    assert [r["step"] for r in measured] == [3, 6]
    for record in measured:
        assert 0 < record["health/alignment"] < 4 and record["health/uniformity_image"] < 0
        assert 1 <= record["health/mean_rank_i2t"] <= 64 and 1 <= record["health/effective_rank_text"] <= 64
    # the step-6 numbers are those of the final checkpoint on the suite's retrieval set (first 64 images, first
    # caption each), recomputed here from the model with plain numpy
    loaded = load_eval_model(str(run_dir / "checkpoints" / "latest"))
    benchmark = load_benchmark(synth_data / "eval" / "retrieval", kind="retrieval")
    images = torch.stack([loaded.transform(benchmark.image(i)) for i in range(64)])
    texts = loaded.tokenizer([benchmark.source.target(i)[0] for i in range(64)])
    x = loaded.encoder.encode_image(images).numpy().astype(np.float64)
    y = loaded.encoder.encode_text(texts).numpy().astype(np.float64)
    assert measured[1]["health/alignment"] == pytest.approx(((x - y) ** 2).sum(1).mean(), rel=1e-4)
    # a caption repeated in the set gives equal similarities: ties share their rank (health.mean_rank's rule)
    ranks = [
        1 + (x[i] @ y.T > x[i] @ y[i] + 1e-6).sum() + ((abs(x[i] @ y.T - x[i] @ y[i]) <= 1e-6).sum() - 1) / 2
        for i in range(64)
    ]
    assert measured[1]["health/mean_rank_i2t"] == pytest.approx(np.mean(ranks), abs=1e-6)
    ranks_t2i = [
        1 + (y[i] @ x.T > y[i] @ x[i] + 1e-6).sum() + ((abs(y[i] @ x.T - y[i] @ x[i]) <= 1e-6).sum() - 1) / 2
        for i in range(64)
    ]
    similarity = x @ y.T
    off_diagonal = similarity + np.diag(np.full(64, -np.inf))

    def uniformity(z):
        upper = np.triu_indices(len(z), 1)
        return np.log(np.exp(-2 * ((z[:, None] - z[None]) ** 2).sum(-1)[upper]).mean())

    def effective_rank(z):  # singular values under float32 rounding of the centring count as zero (its rule)
        singular = np.linalg.svd(z - z.mean(0), compute_uv=False)
        singular = singular[singular > max(z.shape) * np.finfo(np.float32).eps * np.linalg.norm(z)]
        p = singular / singular.sum()
        return np.exp(-(p * np.log(p)).sum())

    expected = {
        "health/uniformity_image": uniformity(x),
        "health/uniformity_text": uniformity(y),
        "health/positive_cos": np.diag(similarity).mean(),
        "health/hardest_negative_cos_i2t": off_diagonal.max(1).mean(),
        "health/hardest_negative_cos_t2i": off_diagonal.max(0).mean(),
        "health/mean_rank_t2i": np.mean(ranks_t2i),
        "health/effective_rank_image": effective_rank(x),
        "health/effective_rank_text": effective_rank(y),
        "health/std_mean_image": x.std(0).mean(),
        "health/std_min_image": x.std(0).min(),
        "health/std_mean_text": y.std(0).mean(),
        "health/std_min_text": y.std(0).min(),
    }
    for key, value in expected.items():
        assert measured[1][key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    with Image.open(run_dir / "curves.png") as curves:
        assert curves.size == (1500, 400)  # loss, temperature and the alignment / uniformity panel


def test_collapse_alarm_warns_names_the_metric_and_can_stop_the_run(
    synth_data, synth_suite, tiny_resnet_json, tmp_path, caplog
):
    impossible = (
        "train.steps=4",
        f"eval.suite={synth_suite}",
        "eval.batch_size=100",
        "health.every_n_steps=2",
        "health.num_samples=32",
        "health.min_effective_rank=1000",
    )
    with caplog.at_level(logging.WARNING, logger="clipforge.train"):
        result = train(config(synth_data, tiny_resnet_json, tmp_path / "warn", *impossible))
    assert result["step"] == 4  # warned, not stopped
    warnings = [r.getMessage() for r in caplog.records if "health.min_effective_rank" in r.getMessage()]
    assert any(
        w.startswith("step 2: health/effective_rank_image = ") and "< health.min_effective_rank 1000" in w
        for w in warnings
    ), warnings
    with pytest.raises(CollapseError, match=r"step 2: health/effective_rank_image = .* < health.min_effective_rank"):
        train(config(synth_data, tiny_resnet_json, tmp_path / "stop", *impossible, "health.stop_on_collapse=true"))


def test_a_collapse_stop_found_by_rank_0_stops_both_ranks(synth_data, synth_suite, tiny_resnet_json, tmp_path):
    import sys

    from ranks import launch_ranks

    from clipforge.config import to_yaml

    cfg = config(
        synth_data,
        tiny_resnet_json,
        tmp_path / "run",
        "train.steps=20",
        f"eval.suite={synth_suite}",
        "eval.batch_size=100",
        "health.every_n_steps=2",
        "health.num_samples=32",
        "health.min_effective_rank=1000",
        "health.stop_on_collapse=true",
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(to_yaml(cfg))
    (code0, out0), (code1, out1) = launch_ranks([sys.executable, "-m", "clipforge", "train", str(path)], 2)
    assert code0 != 0 and code1 != 0
    assert "CollapseError: step 2: health/effective_rank_image = " in out0, out0[-3000:]
    assert "CollapseError: step 2: rank 0 found the embeddings collapsing" in out1, out1[-3000:]


def test_temperature_pinned_at_its_clamp_is_an_alarm(synth_data, tiny_resnet_json, tmp_path):
    # logit_scale starts at 1/0.07 = 14.29; a clamp at 1 pins it from the first step (the loss pushes it up)
    with pytest.raises(CollapseError, match=r"step 3: logit_scale = 1 has sat at loss.max_logit_scale 1 for 3"):
        train(
            config(
                synth_data,
                tiny_resnet_json,
                tmp_path / "run",
                "train.steps=6",
                "loss.max_logit_scale=1",
                "health.max_clamped_steps=3",
                "health.stop_on_collapse=true",
            )
        )


def test_health_needs_held_out_pairs(synth_data, tiny_resnet_json, tmp_path):
    with pytest.raises(ConfigError, match="health.every_n_steps needs held-out image–caption pairs"):
        config(synth_data, tiny_resnet_json, tmp_path / "run", "health.every_n_steps=10")


def test_pipeline_ids_are_equal_exactly_for_equal_captions(synth_data, tiny_resnet_json):
    cfg = config(synth_data, tiny_resnet_json, "unused", "data.batch_size=256")
    built = build_model(cfg.model)
    loader = build_train_loader(cfg.data, built.preprocess_cfg, built.tokenizer, fields=("caption_ids", "image_ids"))
    batch = next(iter(loader))
    tokens, ids = batch["texts"], batch["caption_ids"]
    same_text = (tokens[:, None, :] == tokens[None, :, :]).all(-1)
    assert torch.equal(ids[:, None] == ids[None, :], same_text)
    assert same_text.sum() > len(tokens)  # the synthetic captions repeat: the test is not vacuous
    assert batch["image_ids"].unique().numel() == len(tokens)  # every image file differs
    assert ids.dtype == torch.int64 and (ids >= 0).all()


def test_multi_positive_loss_trains_from_the_pipeline_ids(synth_data, tiny_resnet_json, tmp_path):
    result = train(config(synth_data, tiny_resnet_json, tmp_path / "run", "train.steps=5", "loss.positives=caption"))
    losses = [r["train/loss"] for r in records(tmp_path / "run") if "train/loss" in r]
    assert result["step"] == 5 and len(losses) == 5 and all(np.isfinite(losses))


def test_eval_reports_health_and_draws_the_embedding_plots(synth_data, synth_suite, tiny_resnet_json, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(config(synth_data, tiny_resnet_json, run_dir, "train.steps=2"))
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                str(run_dir / "checkpoints" / "latest"),
                "--suite",
                str(synth_suite),
                "--out",
                str(out),
                "--embedding-plots",
                "--quiet",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| representation health | retrieval |" in printed and "effective rank, images" in printed
    results = json.loads(next(out.glob("*.json")).read_text())
    assert set(results["retrieval"]["health"]) >= {"health/alignment", "health/uniformity_text"}
    sizes = {
        "shapes_tsne": PROJECTION_SIZE,
        "colors_tsne": PROJECTION_SIZE,
        "retrieval_similarity": HEATMAP_SIZE,
        "retrieval_similarity_hist": HISTOGRAM_SIZE,
    }
    for suffix, size in sizes.items():
        [path] = out.glob(f"*_{suffix}.png")
        with Image.open(path) as image:
            assert image.size == size
            assert np.asarray(image.convert("L")).std() > 5  # something is drawn
    histogram = results["retrieval"]["similarity_histogram"]
    assert sum(histogram["positive"]) == 100 and sum(histogram["negative"]) == 100 * 99
