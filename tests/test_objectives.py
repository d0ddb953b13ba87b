"""The objective contract: a new objective with its own batch field, the image patch tokens and a trainable head is
one file (tests/objective_example.py) plus the registration line below; it trains, its head is checkpointed and
resumes bit-identically, exports leave it out, and its gradients on 2 gloo ranks equal one process."""

from __future__ import annotations

import pytest
import torch
from objective_example import mean_colour
from ranks import run_ranks
from small_runs import records, small_run_config

from clipforge.checkpoints import read_weights
from clipforge.losses import ClipLoss, ObjectiveContext, Objectives, build_objectives
from clipforge.losses.clip import ClipObjective
from clipforge.losses.config import TERMS, LossConfig, TermConfig
from clipforge.model_loading import load_weights
from clipforge.models import ModelConfig, build_model
from clipforge.train.loop import train

TERMS["mean_colour"] = "objective_example:build"  # the one registration line

LOCAL_BATCH = 6


def run_config(synth_data, tiny_model_json, out, *extra):
    terms = "loss.terms=[{name: mean_colour, weight: 2.0}]"
    return small_run_config(synth_data, tiny_model_json, out, terms, *extra, batch_size=32, shuffle_buffer=100)


def test_the_set_sums_terms_and_declares_the_union_of_needs(tiny_model_json):
    built = build_model(ModelConfig(name=tiny_model_json))
    context = ObjectiveContext(model=built.model)
    objectives = build_objectives(LossConfig(positives="caption", terms=[TermConfig(name="mean_colour")]), context)
    assert [type(m).__name__ for m in objectives.members] == ["ClipObjective", "Weighted"]
    assert objectives.model_outputs == ("image_tokens",)
    names = [field if isinstance(field, str) else field.name for field in objectives.batch_fields]
    assert names == ["caption_ids", "mean_colour"]
    with pytest.raises(ValueError, match="two objectives return the same term name"):
        Objectives([ClipObjective(ClipLoss()), ClipObjective(ClipLoss())])
    with pytest.raises(ValueError, match=r"loss.terms: unknown objective 'nope' \(known: .*mean_colour"):
        TermConfig(name="nope")
    with pytest.raises(ValueError, match=r"loss.terms\[0\] \(mean_colour\): unknown options \['depth'\]"):
        build_objectives(LossConfig(terms=[TermConfig(name="mean_colour", options={"depth": 2})]), context)


def test_a_new_objective_trains_checkpoints_resumes_exactly_and_stays_out_of_exports(
    synth_data, tiny_model_json, tmp_path
):
    common = ("train.steps=6", "checkpoint.every=3", "checkpoint.keep_last=5")
    full = run_config(synth_data, tiny_model_json, tmp_path / "full", *common)
    train(full)
    logged = [r["train/mean_colour"] for r in records(tmp_path / "full") if "train/mean_colour" in r]
    assert len(logged) == 6 and all(value > 0 for value in logged)
    checkpoints = tmp_path / "full" / "checkpoints"
    weights = read_weights(checkpoints / "latest")
    assert weights["objectives.members.1.member.head.weight"].shape == (3, 64)

    import shutil

    (tmp_path / "partial" / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoints / "step_00000003", tmp_path / "partial" / "checkpoints" / "step_00000003")
    train(run_config(synth_data, tiny_model_json, tmp_path / "partial", *common, "checkpoint.resume=latest"))
    resumed = read_weights(tmp_path / "partial" / "checkpoints" / "latest")
    assert weights.keys() == resumed.keys()
    assert all(torch.equal(weights[name], resumed[name]) for name in weights)
    by_step = {r["step"]: r["train/mean_colour"] for r in records(tmp_path / "partial") if "train/mean_colour" in r}
    assert by_step == {
        r["step"]: r["train/mean_colour"]
        for r in records(tmp_path / "full")
        if r["step"] > 3 and "train/mean_colour" in r
    }

    plain = build_model(ModelConfig(name=tiny_model_json)).model
    load_weights(plain, str(checkpoints / "latest"))  # strict: the model alone, no objectives.* keys
    assert not any(name.startswith("objectives") for name in plain.state_dict())


def test_a_term_that_starts_later_is_zero_until_then(synth_data, tiny_model_json, tmp_path):
    cfg = run_config(
        synth_data,
        tiny_model_json,
        tmp_path / "run",
        "train.steps=4",
        "loss.terms=[{name: mean_colour, weight: 2.0, start: 0.5}]",
    )
    train(cfg)
    values = {r["step"]: r["train/mean_colour"] for r in records(tmp_path / "run") if "train/mean_colour" in r}
    assert values[1] == values[2] == 0.0 and values[3] > 0 and values[4] > 0


def _batch(world_size: int):
    generator = torch.Generator().manual_seed(3)
    size = LOCAL_BATCH * world_size
    images = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    texts = torch.randint(1, 400, (size, 24), generator=generator)
    texts[:, -1] = 49407  # end of text
    colours = torch.stack([mean_colour(image, "") for image in images])
    return images.float() / 127.5 - 1, texts, colours


def _gradients(model_json: str, rank: int, world_size: int, local: slice, distributed: bool, ranks: int = 2):
    from clipforge.distributed import DistInfo
    from clipforge.train.config import ParallelConfig, SpeedConfig
    from clipforge.train.optim import OptimConfig, build_optimizer
    from clipforge.train.parallel import attach_objectives, prepare_model
    from clipforge.train.step import build_step

    torch.manual_seed(0)
    built = build_model(ModelConfig(name=model_json))
    cfg = LossConfig(terms=[TermConfig(name="mean_colour", weight=2.0)])
    objectives = build_objectives(cfg, ObjectiveContext(rank=rank, world_size=world_size, model=built.model))
    attach_objectives(built.model, objectives)
    info = DistInfo(rank=rank, world_size=world_size, local_world_size=world_size) if distributed else DistInfo()
    prepared = prepare_model(
        built.model,
        model_cfg=ModelConfig(name=model_json),
        speed=SpeedConfig(),
        parallel=ParallelConfig(),
        precision="fp32",
        learn_temperature=True,
        dist_info=info,
        every_token=True,
    )
    optimizer = build_optimizer(OptimConfig(), built.model)
    step = build_step(
        prepared.model,
        objectives,
        optimizer,
        None,
        device="cpu",
        precision="fp32",
        grad_clip_norm=None,
        max_logit_scale=100.0,
    )
    images, texts, colours = _batch(ranks)  # the global batch of 2 ranks; this process's part of it
    out = step.backward({"images": images[local], "texts": texts[local], "mean_colour": colours[local]})
    return float(out["terms"]["mean_colour"]), {
        n: p.grad.clone() for n, p in built.model.named_parameters() if p.grad is not None
    }


def _rank_worker(rank, world_size, model_json):
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return _gradients(model_json, rank, world_size, local, distributed=True)


def test_two_gloo_ranks_equal_one_process(tiny_model_json, tmp_path):
    (_, distributed), _ = run_ranks(_rank_worker, 2, tmp_path / "ranks", tiny_model_json, timeout=240)
    _, reference = _gradients(tiny_model_json, 0, 1, slice(None), distributed=False)
    assert "objectives.members.1.member.head.weight" in reference and reference.keys() == distributed.keys()
    for name, grad in reference.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert (distributed[name] - grad).abs().max() <= 1e-5 * scale, name
