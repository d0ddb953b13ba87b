"""The shipped recipes load, say what hardware they are for, and --dry-run reports what they train."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clipforge.cli import main
from clipforge.train.config import load_config
from clipforge.train.preflight import dry_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_the_recipes_an_openclip_user_expects_are_there():
    assert {"demo.yaml", "vit-b-32.yaml", "vit-b-16.yaml", "siglip-vit-b-16.yaml"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_states_its_hardware(name):
    cfg = load_config(CONFIGS / name)
    header = "".join(line for line in (CONFIGS / name).read_text().splitlines(keepends=True) if line.startswith("#"))
    assert any(word in header for word in ("GPU", "CPU", "H100", "A100")), f"{name} does not say what it is meant for"
    assert cfg.train.steps > 0


@pytest.mark.parametrize(
    "name,parameters,image_gflops,text_gflops",
    [
        # published: OpenAI CLIP ViT-B/32 151.28M parameters, 4.4 GMACs image / 2.9 GMACs text (open_clip's profile)
        ("vit-b-32.yaml", 151_277_313, 2 * 4.41, 2 * 2.91),
        # ViT-B/16: 149.62M parameters, 17.58 GMACs image (timm/open_clip profile)
        ("vit-b-16.yaml", 149_620_737, 2 * 17.58, 2 * 2.91),
    ],
)
def test_dry_run_counts_parameters_and_flops_like_the_published_figures(name, parameters, image_gflops, text_gflops):
    # the recipes' data is not here; the published figures are every token's, the pooled last block runs fewer
    summary = dry_run(load_config(CONFIGS / name, ["speed.pooled_last_block=false"]), check_inputs=False)
    pooled = dry_run(load_config(CONFIGS / name), check_inputs=False)
    for tower in ("image", "text"):  # 5/6 of one block's matmuls of 12 (attention and the patch embedding aside)
        saved = 1 - pooled[f"{tower}_forward_gflops_per_sample"] / summary[f"{tower}_forward_gflops_per_sample"]
        assert saved == pytest.approx(5 / 6 / 12, abs=0.004), tower
    assert summary["parameters"] == parameters
    assert summary["image_forward_gflops_per_sample"] == pytest.approx(image_gflops, rel=0.06)
    assert summary["text_forward_gflops_per_sample"] == pytest.approx(text_gflops, rel=0.06)
    # forward + backward = 3 forwards, less the patch embedding's input gradient (pixels need none): under 1%
    assert summary["train_gflops_per_sample"] == pytest.approx(
        3 * (summary["image_forward_gflops_per_sample"] + summary["text_forward_gflops_per_sample"]), rel=0.01
    )
    assert summary["train_gflops_per_sample"] < 3 * (
        summary["image_forward_gflops_per_sample"] + summary["text_forward_gflops_per_sample"]
    )


def test_dry_run_from_the_command_line_prints_counts_then_config_on_request(capsys, tmp_path, synth_data, synth_suite):
    out_dir = tmp_path / "never"
    shards = f"[{{urls: '{synth_data}/train/00000.tar::{synth_data}/train/00001.tar'}}]"
    arguments = [
        "train",
        str(CONFIGS / "demo.yaml"),
        "--dry-run",
        "--set",
        f"train.output_dir={out_dir}",
        "--set",
        f"data.sources={shards}",
        "--set",
        f"eval.suite={synth_suite}",
    ]
    assert main(arguments) == 0
    out = capsys.readouterr().out
    assert re.search(r"shards +2\n", out) and re.search(r"resume_from +none \(fresh start\)", out), out[-800:]
    assert out.startswith("architecture ")  # the summary first, not the config
    assert "parameters                       8,500,249" in out and "train_gflops_per_sample" in out
    assert "model:\n  name: tiny-rn-64" not in out and "--print-config" in out
    assert not out_dir.exists()  # nothing was started
    assert main([*arguments, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "model:\n  name: tiny-rn-64" in out and f"output_dir: {out_dir}" in out
    assert out.index("train_gflops_per_sample") < out.index("model:\n  name: tiny-rn-64")


def test_dry_run_refuses_what_the_run_would_refuse(capsys, tmp_path, synth_data, synth_suite):
    """Too few shards for the readers, a missing resume target, a suite that does not exist: refused before any
    step, by the dry run as by the run."""
    base = [
        "train",
        str(CONFIGS / "demo.yaml"),
        "--dry-run",
        "--set",
        f"train.output_dir={tmp_path / 'run'}",
        "--set",
        f"eval.suite={synth_suite}",
    ]
    one_shard = f"data.sources=[{{urls: '{synth_data}/train/00000.tar'}}]"
    cases = {
        "shards cannot feed world_size × num_workers = 2 readers": [one_shard, "data.num_workers=2"],
        "checkpoint.resume: checkpoint .*nowhere does not exist": [
            one_shard,
            "data.num_workers=1",
            f"checkpoint.resume={tmp_path / 'nowhere'}",
        ],
        "suite .*missing.yaml": [one_shard, "data.num_workers=1", f"eval.suite={tmp_path / 'missing.yaml'}"],
    }
    for expected, overrides in cases.items():
        assert main([*base, *[item for o in overrides for item in ("--set", o)]]) == 2, expected
        assert re.search(expected, capsys.readouterr().err), expected


def test_the_siglip2_recipe_has_the_papers_settings_and_charges_its_late_terms_from_their_start():
    cfg = load_config(CONFIGS / "siglip2-vit-b-16.yaml")
    assert cfg.loss.kind == "siglip" and cfg.data.batch_size * 64 == 32_768  # 64 GPUs, as its header says
    terms = {term.name: term for term in cfg.loss.terms}
    assert terms["locca"].weight == 1.0 and terms["locca"].start == 0
    late = terms["self_distillation"]
    assert (late.weight, late.start, late.options["masked_weight"], late.options["local_crops"]) == (1.0, 0.8, 0.25, 8)
    summary = dry_run(cfg, check_inputs=False)
    assert summary["image_size"] == [256, 256] and summary["context_length"] == 64
    assert summary["loss_terms"].split(", ") == [
        "contrastive", "locca_caption", "locca_referring", "locca_grounded", "self_distillation", "masked_prediction"
    ]  # fmt: skip
    # the full step carries the teacher and the student's views; the run's total charges them for its last 20% only
    plain = dry_run(load_config(CONFIGS / "siglip2-vit-b-16.yaml", ["loss.terms=[]"]), check_inputs=False)
    full, base = summary["train_gflops_per_sample"], plain["train_gflops_per_sample"]
    samples = cfg.data.batch_size * cfg.train.steps / 1e6  # one process's batch × steps; PFLOPs = GFLOPs × 1e6
    assert full > 3 * base
    locca_only = dry_run(
        load_config(CONFIGS / "siglip2-vit-b-16.yaml", ["loss.terms=[{name: locca, options: {depth: 4}}]"]),
        check_inputs=False,
    )["train_gflops_per_sample"]
    expected = locca_only + 0.2 * (full - locca_only)
    assert summary["train_pflops_total"] == pytest.approx(expected * samples, rel=1e-6)
