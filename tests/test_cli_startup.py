"""The commands a user types first start without importing torch (issue "A user's first hour": 10–13 s per command).

Each command runs in a fresh interpreter, as the console script runs it, and reports which heavy packages it
imported; the figure itself (well under 1.5 s on a 2-core CPU) comes from bench/cli_startup.py and
docs/benchmarks.md. What keeps it there is asserted here: a config module, the shard reader or the error report that
pulls in torch (~1 s), open_clip/torchvision (~1 s more) or transformers fails this test, not just the figure.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "open_clip", "transformers", "webdataset")  # webdataset imports torch

PROBE = """
import json, sys
from clipforge.cli import main
try:
    code = main(sys.argv[2:])
except SystemExit as exit:  # --help
    code = exit.code
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv[1])))
print("\\nPROBE " + json.dumps({"code": code, "heavy": heavy}))
"""


def run_cli(*arguments: str) -> tuple[int, list[str], str]:
    """Exit code, heavy packages imported, and stdout + stderr of ``clipforge ARGUMENTS`` in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(HEAVY), *arguments], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.rsplit("PROBE ", 1)[1])
    return report["code"], report["heavy"], done.stdout + done.stderr


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from clipforge.data.shards import SyntheticSpec, write_synthetic

    out = tmp_path_factory.mktemp("synth")
    spec = SyntheticSpec(
        out=str(out),
        num_samples=8,
        samples_per_shard=4,
        num_eval_samples=2,
        num_retrieval_samples=2,
        num_eval_train_samples=0,
        num_workers=1,
    )
    write_synthetic(spec, progress=False)
    return out / "train"


@pytest.mark.parametrize(
    "arguments",
    [
        ["--help"],
        ["train", "--help"],
        ["eval", "--help"],
        ["export", "--help"],
        ["prep", "inspect", "--help"],
        ["wise-ft", "--help"],
        ["plan", "--help"],
    ],
    ids=" ".join,
)
def test_help_imports_no_torch(arguments):
    code, heavy, output = run_cli(*arguments)
    assert code == 0 and "usage: clipforge" in output
    assert heavy == [], f"clipforge {' '.join(arguments)} imported {heavy}"


def test_train_help_still_lists_every_config_key():
    code, _, output = run_cli("train", "--help")
    assert code == 0
    for key in ("data.batch_size", "model.name", "loss.kind", "optim.lr", "train.precision", "eval.suite"):
        assert key in output, key
    assert "logging.log_every" in output and "health.every_n_steps" in output


def test_prep_inspect_reads_shards_without_torch(shards):
    code, heavy, output = run_cli("prep", "inspect", str(shards), "--no-write", "--quiet", "--workers", "1")
    assert code == 0 and '"valid": 8' in output and '"ok": true' in output
    assert heavy == [], f"prep inspect imported {heavy}"


def test_a_user_error_is_reported_without_importing_torch(tmp_path):
    code, heavy, output = run_cli("prep", "inspect", str(tmp_path / "missing"), "--no-write")
    assert code == 2 and "clipforge prep: error:" in output and "no such shard or directory" in output
    assert heavy == [], f"the error report imported {heavy}"


def test_submit_dry_run_validates_the_config_without_torch(shards, tmp_path):
    """A bad config is refused before torch is imported. A valid one then gets the run's own checks for the job's
    world size (shards, sample counts, suite, checkpoints: clipforge.train.preflight), which import the trainer."""
    code, heavy, output = run_cli(
        "submit", "configs/demo.yaml", "--gpus-per-node", "0", "--dry-run", "--set", "loss.kind=x"
    )
    assert code == 2 and "loss.kind" in output
    assert heavy == [], f"submit --dry-run imported {heavy} to refuse a config"
    data = [f"data.sources=[{{urls: '{shards}/{{00000..00001}}.tar'}}]", "data.batch_size=4", "eval.suite=null"]
    code, _, output = run_cli(
        "submit",
        "configs/demo.yaml",
        "--gpus-per-node",
        "0",
        "--dry-run",
        "--set",
        f"train.output_dir={tmp_path}/run",
        *(item for override in data for item in ("--set", override)),
    )
    assert code == 0 and "#SBATCH --nodes=1" in output, output[-2000:]


def test_train_refuses_a_bad_override_before_importing_torch():
    code, heavy, output = run_cli("train", "configs/demo.yaml", "--set", "optim.learning_rate=1")
    assert code == 2 and "clipforge train: error: --set 'optim.learning_rate=1'" in output
    assert heavy == [], f"refusing an unknown key imported {heavy}"
    code, heavy, output = run_cli("train", "configs/demo.yaml", "--set", "data.sources=[{urls: d/{0..9}.tar}]")
    assert code == 2 and "not valid YAML at character" in output and "Traceback" not in output
    assert heavy == []
