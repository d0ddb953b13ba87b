"""Structural rules from DESIGN.md: imports flow one way; model code knows nothing of distribution."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clipforge"
LIBRARY = (
    "models",
    "losses",
    "data",
    "evaluation",
    "eval_config",
    "export",
    "distributed",
    "health",
    "health_config",
    "checkpoints",
)
APPLICATION = ("clipforge.train", "clipforge.cli", "clipforge.launch", "clipforge.config")


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def library_files():
    for name in LIBRARY:
        target = PACKAGE / name
        yield from (target.rglob("*.py") if target.is_dir() else [target.with_suffix(".py")])


def test_library_never_imports_the_application():
    checked = 0
    for path in library_files():
        if not path.exists():
            continue
        checked += 1
        bad = {n for n in imports(path) if n.startswith(APPLICATION)}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"
    assert checked >= 10


def test_models_know_nothing_of_distribution():
    for path in (PACKAGE / "models").rglob("*.py"):
        bad = {n for n in imports(path) if n.startswith(("torch.distributed", "torch.nn.parallel", "clipforge.losses"))}
        assert not bad, f"{path.name} imports {bad}"


def test_only_distributed_reads_launch_environment():
    for path in PACKAGE.rglob("*.py"):
        if path.name == "distributed.py":
            continue
        text = path.read_text()
        for variable in ("SLURM_PROCID", '"RANK"', "LOCAL_RANK", '"WORLD_SIZE"'):
            assert variable not in text, f"{path.relative_to(PACKAGE)} reads {variable}"


def test_losses_never_sync_with_the_host():
    """No .item()/.cpu()/.tolist() in the loss: the distributed path adds only its collectives."""
    for path in (PACKAGE / "losses").glob("*.py"):
        text = path.read_text()
        for call in (".item()", ".cpu()", ".tolist()", ".numpy()"):
            assert call not in text, f"{path.name}: {call}"


def test_ruff_check_and_format_are_clean():
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    folders = ["src", "tests", "bench", "data_prep", "eval", "slurm", "examples"]
    for command in (["check"], ["format", "--check"]):
        done = subprocess.run([ruff, *command, *folders], cwd=PACKAGE.parents[1], capture_output=True, text=True)
        assert done.returncode == 0, f"ruff {' '.join(command)}: " + done.stdout[-3000:]
