"""WiSE-FT: the interpolation against hand arithmetic, the rule on a hand-made table, and ``clipforge wise-ft`` end to
end on two tiny checkpoints (different seeds) whose written checkpoint exports and evaluates to the chosen model."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from eval_fixtures import assert_valid_png

from clipforge.checkpoints import read_model_weights
from clipforge.cli import main
from clipforge.config import to_yaml
from clipforge.evaluation.wise_ft import check_alphas, choose_alpha, endpoints, interpolate
from clipforge.models import build_model
from clipforge.train.config import load_config


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: equal bits, not merely equal values (-0.0 and 0.0 differ here)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])) for k in a)


def tiny_checkpoint(model_json: str, seed: int, run_dir: Path) -> Path:
    from checkpointing import save_checkpoint

    cfg = load_config(None, ["data.train_urls=data/{0..1}.tar", f"model.name={model_json}"])
    torch.manual_seed(seed)
    built = build_model(cfg.model)
    return save_checkpoint(run_dir / "checkpoints", built.model, 3, to_yaml(cfg))


@pytest.fixture(scope="module")
def pair(tiny_model_json, tmp_path_factory) -> tuple[Path, Path]:
    """Two checkpoints of the tiny ViT with different weights (seeds 0 and 1), as the trainer writes them."""
    root = tmp_path_factory.mktemp("wise")
    return tiny_checkpoint(tiny_model_json, 0, root / "initial"), tiny_checkpoint(tiny_model_json, 1, root / "ft")


@pytest.fixture(scope="module")
def suites(synth_data, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("wise_suites")
    made = []
    for name in ("shapes", "colors"):
        path = root / f"{name}.yaml"
        entry = f"  - {{name: {name}, task: zeroshot_classification, path: {synth_data / 'eval' / name}}}\n"
        path.write_text(f"name: {name}\ndatasets:\n{entry}")
        made.append(path)
    return made[0], made[1]


def test_alpha_0_and_1_are_the_endpoints_bit_for_bit_and_0_5_the_hand_average(pair, tmp_path):
    theta0, theta1, _ = endpoints(str(pair[0]), str(pair[1]))
    assert bit_equal(theta0, read_model_weights(pair[0])) and bit_equal(theta1, read_model_weights(pair[1]))
    # the initial model as an open_clip folder (model.init_from's source) gives the same weights
    assert main(["export", str(pair[0]), "--format", "open_clip", "--out", str(tmp_path / "initial")]) == 0
    assert bit_equal(endpoints(str(tmp_path / "initial"), str(pair[1]))[0], theta0)
    assert not torch.equal(theta0["visual.proj"], theta1["visual.proj"])  # two different models
    assert bit_equal(interpolate(theta0, theta1, 0.0), theta0)
    assert bit_equal(interpolate(theta0, theta1, 1.0), theta1)
    half = interpolate(theta0, theta1, 0.5)
    assert bit_equal(half, {key: (theta0[key] + theta1[key]) / 2 for key in theta0})  # fp32: halving is exact

    # by hand: a -0.0 survives at the endpoints, fp16 is mixed in fp32, integer buffers are the fine-tuned ones
    start = {"w": torch.tensor([-0.0, 1.0]), "h": torch.tensor([1.0, 2.0], dtype=torch.float16), "n": torch.tensor(3)}
    end = {"w": torch.tensor([0.0, 3.0]), "h": torch.tensor([2.0, 6.0], dtype=torch.float16), "n": torch.tensor(9)}
    assert bit_equal(interpolate(start, end, 0), start) and bit_equal(interpolate(start, end, 1), end)
    mixed = interpolate(start, end, 0.25)
    assert mixed["w"].tolist() == [0.0, 1.5] and mixed["n"].item() == 9
    assert mixed["h"].dtype == torch.float16 and mixed["h"].tolist() == [1.25, 3.0]


def test_the_chosen_alpha_follows_the_rule_on_a_hand_made_table():
    def table(*rows):
        return [{"alpha": a, "target_score": t, "retention_score": r} for a, t, r in rows]

    rows = table((0.0, 0.50, 0.700), (0.25, 0.60, 0.695), (0.5, 0.70, 0.690), (0.75, 0.80, 0.650), (1.0, 0.90, 0.60))
    assert choose_alpha(rows, 1.0) == 0.5  # 0.75 and 1 lose more than a point of retention
    assert choose_alpha(rows, 0.5) == 0.25  # 0.5 loses exactly 1.0 point
    assert choose_alpha(rows, 10.0) == 1.0
    assert choose_alpha(rows, 0.0) == 0.0  # only alpha=0 keeps everything
    tie = table((0.0, 0.5, 0.7), (0.3, 0.8, 0.7), (0.6, 0.8, 0.7))
    assert choose_alpha(tie, 1.0) == 0.3  # a tie goes to the smaller alpha
    with pytest.raises(ValueError, match="alpha=0"):
        choose_alpha(table((0.5, 0.5, 0.5)), 1.0)
    with pytest.raises(ValueError, match="0 must be among them"):
        check_alphas([0.5, 1.0])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        check_alphas([0.0, 1.5])


def test_wise_ft_command_end_to_end_writes_a_checkpoint_that_exports_and_evaluates_to_the_chosen_model(
    pair, suites, tmp_path, capsys
):
    out = tmp_path / "wise"
    common = ["--workers", "0", "--batch-size", "128", "--device", "cpu"]
    command = ["wise-ft", str(pair[0]), str(pair[1]), "--target", str(suites[0]), "--retention", str(suites[1])]
    assert main([*command, "--alphas", "0,0.5,1", "--max-retention-drop", "2", "--out", str(out), *common]) == 0
    report = json.loads((out / "wise_ft.json").read_text())
    rows = report["alphas"]
    assert [row["alpha"] for row in rows] == [0.0, 0.5, 1.0]
    for row in rows:
        assert row["target_score"] == row["target"]["shapes/acc1"]
        assert row["retention_score"] == row["retention"]["colors/acc1"]
    floor = rows[0]["retention_score"] - 0.02  # the rule, by hand
    allowed = [row for row in rows if row["retention_score"] >= floor - 1e-12]
    best = max(row["target_score"] for row in allowed)
    assert report["chosen_alpha"] == min(row["alpha"] for row in allowed if row["target_score"] == best)
    assert "max_retention_drop" in report["rule"] and report["max_retention_drop"] == 2.0
    assert_valid_png(out / "wise_ft.png")
    chosen = report["chosen_alpha"]
    theta0, theta1 = read_model_weights(pair[0]), read_model_weights(pair[1])
    assert bit_equal(read_model_weights(out / "checkpoint"), interpolate(theta0, theta1, chosen))

    # clipforge export takes it, and open_clip's own loader reads the chosen model back
    assert main(["export", str(out / "checkpoint"), "--format", "open_clip", "--out", str(tmp_path / "exp")]) == 0
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'exp'}")
    assert bit_equal(model.state_dict(), interpolate(theta0, theta1, chosen))
    # clipforge eval of it gives the sweep's numbers for the chosen alpha
    assert main(["eval", str(out / "checkpoint"), "--suite", str(suites[0]), "--out", str(tmp_path / "ev"), *common[:4],
                 "--quiet", "--no-plots"]) == 0  # fmt: skip
    (evaluated,) = (tmp_path / "ev").glob("shapes_*.json")
    chosen_row = next(row for row in rows if row["alpha"] == chosen)
    assert json.loads(evaluated.read_text())["shapes"]["acc1"] == chosen_row["target"]["shapes/acc1"]

    # the sweep's α=0 and α=1 rows are what clipforge eval gives the endpoints
    assert main(["eval", str(pair[1]), "--suite", str(suites[1]), "--out", str(tmp_path / "ev1"), *common[:4],
                 "--quiet", "--no-plots"]) == 0  # fmt: skip
    (evaluated,) = (tmp_path / "ev1").glob("colors_*.json")
    assert json.loads(evaluated.read_text())["colors"]["acc1"] == rows[-1]["retention"]["colors/acc1"]


def test_an_export_only_checkpoint_is_refused_by_resume(pair, tmp_path):
    from checkpointing import load_checkpoint

    from clipforge.cli.wise_ft import write_checkpoint

    theta0, theta1, built = endpoints(str(pair[0]), str(pair[1]))
    built.model.load_state_dict(interpolate(theta0, theta1, 0.5))
    written = write_checkpoint(built.model, {"model": {"name": "x"}}, 3, tmp_path / "checkpoint")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint"]  # no staging folder left behind
    # refused (as a checkpoint whose files lack the optimizer), never resumed with a fresh optimizer and schedule
    with pytest.raises(ValueError, match="optimizer"):
        load_checkpoint(written, built.model)


def test_an_initial_model_of_another_architecture_is_refused_in_one_line(
    pair, suites, tiny_model_json, tmp_path, capsys
):
    other = json.loads(Path(tiny_model_json).read_text())
    other["vision_cfg"]["width"] = 32
    other_json = tmp_path / "other-tiny.json"
    other_json.write_text(json.dumps(other))
    initial = tiny_checkpoint(str(other_json), 0, tmp_path / "other")
    command = ["wise-ft", str(initial), str(pair[1]), "--target", str(suites[0]), "--retention", str(suites[1])]
    assert main([*command, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "different architectures: visual.class_embedding is (32,) in the initial model, (64,)" in error
