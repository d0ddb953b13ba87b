"""WiSE-FT (weight-space ensembling): the weights ``(1 - α)·θ0 + α·θ1`` of an initial model θ0 and its fine-tuned
θ1, evaluated over a sweep of α on a target suite and a retention suite, and the α a stated rule picks.

    initial, finetuned, built = endpoints("weights/ViT-B-16", "runs/ft/checkpoints/latest")
    rows = sweep(built, initial, finetuned, [0, 0.5, 1], target_suite, retention_suite)
    chosen = choose_alpha(rows, max_retention_drop=1.0)

Interpolation is in fp32, buffers too, each result cast to the fine-tuned tensor's dtype; integer and boolean
buffers (BatchNorm's batch counts) are the fine-tuned model's. α = 0 and α = 1 are the endpoints' tensors themselves,
bit for bit (the arithmetic would turn a -0.0 into +0.0). The rule (``RULE``): among the α whose retention score is
at most ``max_retention_drop`` points (hundredths) below α = 0's, the one with the best target score; a tie goes to
the smaller α, the model closer to the initial one.

A suite's score is one headline metric (``clipforge.evaluation.report.headline``'s ``dataset/metric`` key) or, by
default, the mean over its datasets of each one's first headline metric (top-1 accuracy, image-retrieval R@1,
mIoU, referring accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from clipforge.evaluation.encoder import OpenClipEncoder
from clipforge.evaluation.report import HEADLINE_KEYS, headline
from clipforge.evaluation.suite import Suite, run_suite
from clipforge.model_loading import (
    load_checkpoint_model,
    load_open_clip_folder,
    load_weights,
    model_kind,
    read_checkpoint_config,
)
from clipforge.models import BuiltModel, ModelConfig, build_model

RULE = (
    "the best target score among the alphas whose retention score is at most max_retention_drop points below "
    "alpha=0's (a tie goes to the smaller alpha)"
)
DEFAULT_METRIC = "mean of each dataset's first headline metric"


def endpoints(
    initial: str, finetuned: str, device: torch.device | str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], BuiltModel]:
    """The initial and fine-tuned state dicts, and the fine-tuned checkpoint's model (its architecture, which the
    sweep loads each α into). ``finetuned`` is a clipforge checkpoint; ``initial`` anything ``clipforge.model_loading``
    reads: a clipforge checkpoint, an open_clip folder or weights file, a transformers CLIP folder. LoRA checkpoints
    come merged. Two architectures that differ are a ``ValueError`` naming the first differing key or shape."""
    if model_kind(finetuned) != "clipforge":
        raise ValueError(
            f"{finetuned}: the fine-tuned model must be a clipforge checkpoint (its config is the output's)"
        )
    built = load_checkpoint_model(finetuned, device)
    theta1 = {key: value.detach().clone() for key, value in built.model.state_dict().items()}
    theta0 = initial_weights(initial, read_checkpoint_config(finetuned)[0], device)
    check_same_architecture(theta0, theta1)
    return theta0, theta1, built


def initial_weights(
    source: str, architecture: ModelConfig, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The state dict of ``source`` in its own architecture where the files give one (a clipforge checkpoint, an
    open_clip folder); else (a weights file, a transformers folder) loaded into ``architecture`` (the fine-tuned
    model's), whose converter or strict load checks that it fits."""
    path = Path(source)
    kind = None if path.is_file() else model_kind(source)
    if kind == "clipforge":
        model = load_checkpoint_model(source, device).model
    elif kind == "open_clip_dir":
        model = load_open_clip_folder(source, device).model
    else:
        model = build_model(architecture, device).model
        try:
            load_weights(model, source)
        except RuntimeError as exc:  # open_clip's strict load lists every key; the first line names the problem
            raise ValueError(f"{source}: does not load into the fine-tuned architecture ({_first_line(exc)})") from None
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2])


def check_same_architecture(initial: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor]) -> None:
    """``ValueError`` naming the first key that one model has and the other lacks, or whose shape differs."""
    for key, tensor in finetuned.items():
        if key not in initial:
            raise ValueError(f"different architectures: {key} is in the fine-tuned model, not in the initial one")
        if initial[key].shape != tensor.shape:
            raise ValueError(
                f"different architectures: {key} is {tuple(initial[key].shape)} in the initial model, "
                f"{tuple(tensor.shape)} in the fine-tuned one"
            )
    extra = next((key for key in initial if key not in finetuned), None)
    if extra is not None:
        raise ValueError(f"different architectures: {extra} is in the initial model, not in the fine-tuned one")


def interpolate(
    initial: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha)·initial + alpha·finetuned`` per tensor in fp32, cast to the fine-tuned dtype; integer and
    boolean tensors from ``finetuned``. ``alpha`` 0 and 1 give the endpoints' own tensors (copies)."""
    if alpha == 0:
        return {key: value.clone() for key, value in initial.items()}
    if alpha == 1:
        return {key: value.clone() for key, value in finetuned.items()}
    mixed = {}
    for key, end in finetuned.items():
        if not (end.is_floating_point() or end.is_complex()):
            mixed[key] = end.clone()
            continue
        start = initial[key].to(device=end.device, dtype=torch.float32)
        mixed[key] = ((1 - alpha) * start + alpha * end.to(torch.float32)).to(end.dtype)
    return mixed


def suite_score(metrics: dict[str, float], results: dict[str, dict], metric: str | None) -> float:
    """``metrics[metric]`` (a headline key, ``dataset/metric``), or the mean of each dataset's first headline
    metric."""
    if metric is not None:
        if metric not in metrics:
            raise ValueError(f"metric {metric!r} is not among the suite's headline metrics: {sorted(metrics)}")
        return float(metrics[metric])
    firsts = [results[name][HEADLINE_KEYS[entry["task"]][0]] for name, entry in results.items()]
    firsts = [value for value in firsts if value is not None]
    if not firsts:
        raise ValueError(f"no headline metric to score the suite by among {sorted(metrics)}")
    return float(sum(firsts) / len(firsts))


def check_alphas(alphas: list[float]) -> list[float]:
    """The sweep's α values, sorted: each in [0, 1], no repeats, 0 among them (the retention reference)."""
    if not alphas or any(not 0 <= alpha <= 1 for alpha in alphas) or len(set(alphas)) != len(alphas):
        raise ValueError(f"--alphas {alphas}: distinct values in [0, 1] are needed")
    if 0 not in alphas:
        raise ValueError(f"--alphas {alphas}: 0 must be among them (retention drops are measured from alpha=0)")
    return sorted(alphas)


def sweep(
    built: BuiltModel,
    initial: dict[str, torch.Tensor],
    finetuned: dict[str, torch.Tensor],
    alphas: list[float],
    target: Suite,
    retention: Suite,
    *,
    target_metric: str | None = None,
    retention_metric: str | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    workers: int = 2,
    amp: bool = False,
) -> list[dict[str, Any]]:
    """For each α, the interpolated weights loaded into ``built.model`` and both suites run: rows of ``alpha``,
    ``target`` and ``retention`` (headline metrics) and ``target_score`` / ``retention_score``."""
    rows = []
    model = built.model
    for alpha in check_alphas(alphas):
        model.load_state_dict(interpolate(initial, finetuned, alpha), strict=True)
        model.eval()
        encoder = OpenClipEncoder(model, device, torch.bfloat16 if amp else None)
        row: dict[str, Any] = {"alpha": alpha}
        for name, suite, metric in (("target", target, target_metric), ("retention", retention, retention_metric)):
            results = run_suite(encoder, built.tokenizer, built.eval_transform, suite, batch_size, workers)
            row[name] = headline(results)
            row[f"{name}_score"] = suite_score(row[name], results, metric)
        rows.append(row)
    return rows


def choose_alpha(rows: list[dict[str, Any]], max_retention_drop: float = 1.0) -> float:
    """``RULE`` over rows with ``alpha``, ``target_score`` and ``retention_score`` (fractions; the drop is in
    points, hundredths)."""
    reference = next((row for row in rows if row["alpha"] == 0), None)
    if reference is None:
        raise ValueError("no alpha=0 row: retention drops are measured from the initial model")
    allowed = [
        row
        for row in rows
        if 100 * (reference["retention_score"] - row["retention_score"]) <= max_retention_drop + 1e-9
    ]
    best = max(allowed, key=lambda row: (row["target_score"], -row["alpha"]))  # alpha=0 is always allowed
    return best["alpha"]


def write_report(
    rows: list[dict[str, Any]], chosen: float, out: str | Path, settings: dict[str, Any]
) -> tuple[Path, Path]:
    """``wise_ft.json`` (the settings, the rule, every α's metrics, the chosen α) and ``wise_ft.png`` (both scores
    against α, the chosen one marked) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {**settings, "rule": RULE, "chosen_alpha": chosen, "alphas": rows}
    json_path = out / "wise_ft.json"
    json_path.write_text(json.dumps(report, indent=1))
    png_path = out / "wise_ft.png"
    plot(rows, chosen, png_path, settings.get("max_retention_drop"))
    return json_path, png_path


def plot(rows: list[dict[str, Any]], chosen: float, path: Path, max_drop: float | None = None) -> None:
    from clipforge.evaluation.plots import plt  # the headless backend, chosen once

    alphas = [row["alpha"] for row in rows]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    axis.plot(alphas, [100 * row["target_score"] for row in rows], "o-", label="target")
    axis.plot(alphas, [100 * row["retention_score"] for row in rows], "s-", label="retention")
    if max_drop is not None:
        floor = 100 * next(row["retention_score"] for row in rows if row["alpha"] == 0) - max_drop
        axis.axhline(floor, color="gray", linestyle=":", label=f"retention floor (alpha=0 - {max_drop:g} points)")
    axis.axvline(chosen, color="black", linestyle="--", label=f"chosen alpha = {chosen:g}")
    axis.set_xlabel("alpha (0: initial, 1: fine-tuned)")
    axis.set_ylabel("score (%)")
    axis.set_title("WiSE-FT: (1 - alpha) initial + alpha fine-tuned")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
