"""Embedding diagnostics against brute-force numpy / python-loop computations, hand-checkable cases,
and the collapse monitor's alarms."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipforge.evaluation.health import HEALTH_KEYS, alignment, effective_rank, embedding_health, uniformity
from clipforge.train.config import HealthConfig
from clipforge.train.health import CollapseError, CollapseMonitor


def paired(n=24, dim=8, noise=0.6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    text = F.normalize(image + noise * torch.randn(n, dim, generator=generator), dim=-1)
    return image, text


# ---- brute force, in float64 numpy and python loops ------------------------------------------------------------


def dot(a, b):
    return sum(float(u) * float(v) for u, v in zip(a, b))


def brute_force(image: torch.Tensor, text: torch.Tensor, alpha=2.0, t=2.0) -> dict[str, float]:
    x, y = image.double().numpy(), text.double().numpy()
    n = len(x)
    out = {
        "health/alignment": sum(math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], y[i]))) ** alpha for i in range(n)) / n
    }
    for name, e in (("image", x), ("text", y)):
        terms = [
            math.exp(-t * sum((a - b) ** 2 for a, b in zip(e[i], e[j]))) for i in range(n) for j in range(i + 1, n)
        ]
        out[f"health/uniformity_{name}"] = math.log(sum(terms) / len(terms))
        centred = e - e.mean(axis=0)
        singular = np.linalg.svd(centred, compute_uv=False)
        p = singular / singular.sum()
        out[f"health/effective_rank_{name}"] = math.exp(-sum(q * math.log(q) for q in p if q > 1e-12))
        stds = [math.sqrt(sum((e[i, k] - e[:, k].mean()) ** 2 for i in range(n)) / n) for k in range(e.shape[1])]
        out[f"health/std_mean_{name}"], out[f"health/std_min_{name}"] = sum(stds) / len(stds), min(stds)
    out["health/positive_cos"] = sum(dot(x[i], y[i]) for i in range(n)) / n
    for direction, (queries, keys) in (("i2t", (x, y)), ("t2i", (y, x))):
        hardest, ranks = [], []
        for i in range(n):
            similarities = [dot(queries[i], keys[j]) for j in range(n)]
            hardest.append(max(s for j, s in enumerate(similarities) if j != i))
            ranks.append(1 + sum(1 for j, s in enumerate(similarities) if j != i and s > similarities[i]))
        out[f"health/hardest_negative_cos_{direction}"] = sum(hardest) / n
        out[f"health/mean_rank_{direction}"] = sum(ranks) / n
    return out


@pytest.mark.parametrize("n,dim,noise,seed", [(24, 8, 0.6, 0), (40, 16, 1.5, 1), (9, 32, 0.2, 2)])
def test_every_metric_equals_brute_force(n, dim, noise, seed):
    image, text = paired(n, dim, noise, seed)
    metrics = embedding_health(image, text)
    assert list(metrics) == list(HEALTH_KEYS)
    assert all(isinstance(value, float) for value in metrics.values())
    reference = brute_force(image, text)
    assert set(reference) == set(metrics)
    for key, value in metrics.items():
        assert value == pytest.approx(reference[key], rel=1e-5, abs=1e-5), key
    assert 1 <= metrics["health/mean_rank_i2t"] <= n
    assert metrics["health/mean_rank_i2t"] < (n + 1) / 2  # paired data: better than chance


@pytest.mark.parametrize("alpha,t", [(1.0, 1.0), (3.0, 5.0)])
def test_alignment_and_uniformity_parameters(alpha, t):
    image, text = paired(16, 8, seed=3)
    reference = brute_force(image, text, alpha=alpha, t=t)
    assert alignment(image, text, alpha).item() == pytest.approx(reference["health/alignment"], rel=1e-5)
    assert uniformity(image, t).item() == pytest.approx(reference["health/uniformity_image"], rel=1e-5)


def test_identical_pairs_align_perfectly():
    image, _ = paired(12, 8)
    metrics = embedding_health(image, image.clone())
    assert metrics["health/alignment"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["health/positive_cos"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["health/mean_rank_i2t"] == metrics["health/mean_rank_t2i"] == 1.0
    assert metrics["health/uniformity_image"] == metrics["health/uniformity_text"]


def test_fully_collapsed_embeddings():
    n = 16
    point = F.normalize(torch.arange(1.0, 9.0), dim=0)
    collapsed = point.expand(n, -1).clone()
    metrics = embedding_health(collapsed, collapsed.clone())
    assert metrics["health/effective_rank_image"] == metrics["health/effective_rank_text"] == 1.0
    for key in ("health/std_mean_image", "health/std_min_image", "health/std_mean_text", "health/std_min_text"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-7), key
    assert metrics["health/uniformity_image"] == pytest.approx(0.0, abs=1e-6)  # every distance 0
    assert metrics["health/hardest_negative_cos_i2t"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["health/mean_rank_i2t"] == metrics["health/mean_rank_t2i"] == (n + 1) / 2  # chance: all tied
    # collapsed onto a line through the origin (±v): one direction
    line = torch.cat([collapsed[: n // 2], -collapsed[n // 2 :]])
    assert effective_rank(line).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("dim", [2, 5, 16])
def test_orthonormal_embeddings(dim):
    eye = torch.eye(dim)
    cross = torch.cat([eye, -eye])  # ±e_k: centred already, D equal singular values
    metrics = embedding_health(cross, cross.clone())
    assert metrics["health/effective_rank_image"] == pytest.approx(dim, rel=1e-5)
    for key in ("health/std_mean_image", "health/std_min_image"):  # each column: one +1, one -1 in 2D rows
        assert metrics[key] == pytest.approx(1 / math.sqrt(dim), rel=1e-6)
    pairs = dim * (2 * dim - 1)  # D pairs (e_k, -e_k) at squared distance 4, the rest at 2
    expected = math.log((dim * math.exp(-8) + (pairs - dim) * math.exp(-4)) / pairs)
    assert metrics["health/uniformity_image"] == pytest.approx(expected, rel=1e-5)
    assert metrics["health/hardest_negative_cos_i2t"] == pytest.approx(0.0, abs=1e-7)


def test_embedding_health_refuses_bad_shapes():
    image, text = paired(8, 4)
    with pytest.raises(ValueError, match="same shape"):
        embedding_health(image, text[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        embedding_health(image[:1], text[:1])


# ---- configuration and monitor ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,key",
    [
        ({"every_n_steps": -1}, "health.every_n_steps"),
        ({"num_samples": 1}, "health.num_samples"),
        ({"every_n_steps": 10, "min_effective_rank": -1.0}, "health.min_effective_rank"),
        ({"every_n_steps": 10, "min_std": -0.1}, "health.min_std"),
        ({"max_clamped_steps": -2}, "health.max_clamped_steps"),
        ({"min_effective_rank": 4.0}, "health.min_effective_rank"),  # never measured: every_n_steps=0
        ({"stop_on_collapse": True}, "health.stop_on_collapse"),  # no alarm to stop on
    ],
)
def test_config_refuses_invalid_values(options, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        HealthConfig(**options)


def test_config_defaults_are_off():
    cfg = HealthConfig()
    assert (
        cfg.every_n_steps,
        cfg.num_samples,
        cfg.min_effective_rank,
        cfg.min_std,
        cfg.max_clamped_steps,
        cfg.stop_on_collapse,
    ) == (0, 512, 0.0, 0.0, 0, False)
    monitor = CollapseMonitor(cfg, 100.0)
    collapsed = torch.ones(8, 4) / 2
    assert monitor.check_embeddings(1, embedding_health(collapsed, collapsed)) == []
    assert all(monitor.check_temperature(step, 100.0) == [] for step in range(10))


ALARMS = HealthConfig(every_n_steps=10, min_effective_rank=4.0, min_std=0.01, max_clamped_steps=3)


def test_monitor_fires_on_collapsed_embeddings(caplog):
    collapsed = F.normalize(torch.ones(32, 16), dim=-1)
    metrics = embedding_health(collapsed, collapsed)
    with caplog.at_level(logging.WARNING, logger="clipforge.train"):
        warnings = CollapseMonitor(ALARMS, 100.0).check_embeddings(120, metrics)
    assert len(warnings) == 4
    assert warnings[0] == (
        "step 120: health/effective_rank_image = 1 < health.min_effective_rank 4: the image "
        "embeddings are collapsing (they span about 1.0 directions)"
    )
    assert warnings[1].startswith("step 120: health/std_mean_image = ")
    assert "< health.min_std 0.01: the image embeddings are collapsing" in warnings[1]
    assert "step 120: health/effective_rank_text = 1 < health.min_effective_rank 4" in warnings[2]
    assert "health/std_mean_text" in warnings[3] and "text embeddings" in warnings[3]
    assert [r.getMessage() for r in caplog.records if r.name == "clipforge.train"] == warnings
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_monitor_fires_on_dimensional_collapse_of_one_modality():
    image, text = paired(64, 32, seed=4)
    flat = F.normalize(text[:, :2] @ torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    warnings = CollapseMonitor(ALARMS, 100.0).check_embeddings(7, embedding_health(image, flat))
    assert len(warnings) == 1 and warnings[0].startswith("step 7: health/effective_rank_text = ")
    value = float(warnings[0].split(" = ")[1].split(" ")[0])
    assert 1 <= value < 2.01


def test_monitor_is_quiet_on_healthy_embeddings(caplog):
    image, text = paired(256, 32, seed=5)
    monitor = CollapseMonitor(ALARMS, 100.0)
    with caplog.at_level(logging.WARNING, logger="clipforge.train"):
        assert monitor.check_embeddings(10, embedding_health(image, text)) == []
        assert all(monitor.check_temperature(step, 99.0) == [] for step in range(20))
    assert not caplog.records


def test_monitor_fires_when_temperature_sits_at_its_clamp(caplog):
    monitor = CollapseMonitor(ALARMS, 100.0)
    at_clamp = torch.tensor(math.log(100.0)).exp()  # what clamp_logit_scale leaves: 100 up to float32 rounding
    assert monitor.check_temperature(1, at_clamp) == []
    assert monitor.check_temperature(2, 100.0) == []
    assert monitor.check_temperature(3, 98.0) == []  # left the clamp: the count starts again
    assert monitor.check_temperature(4, 99.995) == []  # within 1e-4 relative: at the clamp
    assert monitor.check_temperature(5, at_clamp) == []
    with caplog.at_level(logging.WARNING, logger="clipforge.train"):
        warnings = monitor.check_temperature(6, 100.0)
    assert warnings == [
        "step 6: logit_scale = 100 has sat at loss.max_logit_scale 100 for 3 consecutive steps >= "
        "health.max_clamped_steps 3: the temperature is pinned at its clamp (the loss wants sharper "
        "logits than allowed: duplicates, a too-easy task or collapsing embeddings)"
    ]
    assert [r.getMessage() for r in caplog.records] == warnings
    assert monitor.check_temperature(7, 100.0) == monitor.check_temperature(8, 100.0) == []
    assert len(monitor.check_temperature(9, 100.0)) == 1  # reminded every max_clamped_steps while it stays


def test_monitor_raises_when_configured():
    cfg = HealthConfig(every_n_steps=10, min_effective_rank=4.0, max_clamped_steps=2, stop_on_collapse=True)
    collapsed = F.normalize(torch.ones(16, 8), dim=-1)
    with pytest.raises(CollapseError, match=r"step 30: health/effective_rank_image = 1 < health\.min_effective_rank"):
        CollapseMonitor(cfg, 100.0).check_embeddings(30, embedding_health(collapsed, collapsed))
    monitor = CollapseMonitor(cfg, 50.0)
    monitor.check_temperature(1, 50.0)
    with pytest.raises(RuntimeError, match=r"step 2: logit_scale = 50 has sat at loss\.max_logit_scale 50 for 2"):
        monitor.check_temperature(2, 50.0)
    image, text = paired(64, 16)
    assert CollapseMonitor(cfg, 100.0).check_embeddings(40, embedding_health(image, text)) == []


def test_the_temperature_is_counted_on_the_device_and_read_only_at_logging_steps(monkeypatch):
    monitor = CollapseMonitor(ALARMS, 100.0)
    at_clamp, free = torch.tensor(100.0), torch.tensor(50.0)

    def no_sync(*args):
        raise AssertionError("a host sync in the per-step count")

    with monkeypatch.context() as patch:
        for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
            patch.setattr(torch.Tensor, name, no_sync)
        for value in (at_clamp, at_clamp, free, at_clamp, at_clamp, at_clamp, at_clamp):
            monitor.count_clamped(value)
    # read at a logging step (the 7th): 4 consecutive clamped steps, one max_clamped_steps=3 multiple
    assert len(monitor.temperature_alarms(7, at_clamp)) == 1 and monitor.clamped_steps == 4
    monitor.count_clamped(at_clamp)
    assert monitor.temperature_alarms(8, at_clamp) == []  # 5: no new multiple of 3
    monitor.count_clamped(at_clamp)
    assert len(monitor.temperature_alarms(9, at_clamp)) == 1  # 6
