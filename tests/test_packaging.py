"""The built wheel carries what the library reads at run time: the model JSONs and the SLURM templates.

The wheel is built from a copy of the sources (so the checkout gains no build/ or egg-info) and unpacked into
a folder that is the only place clipforge can be imported from; the demo architectures are then built from a
directory that holds no checkout at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_wheel_builds_the_shipped_architectures_outside_the_checkout(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("clipforge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).name for n in names if n.startswith("clipforge/models/configs/"))
    assert shipped == sorted(p.name for p in (ROOT / "configs" / "models").glob("*.json"))
    assert {"clipforge/templates/train.sbatch", "clipforge/templates/eval.sbatch"} <= set(names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import clipforge, sys\n"
        "from clipforge.models.builder import ModelConfig, build_model\n"
        "for name in ('tiny-rn-64', 'tiny-vit-64'):\n"
        "    built = build_model(ModelConfig(name=name))\n"
        "    print(name, sum(p.numel() for p in built.model.parameters()))\n"
        "print(clipforge.__file__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split("\n")
    assert Path(lines[-2]).is_relative_to(site), lines[-2]  # imported from the unpacked wheel, not the checkout
    assert lines[0].startswith("tiny-rn-64 ") and int(lines[0].split()[1]) > 0
    assert lines[1].startswith("tiny-vit-64 ") and int(lines[1].split()[1]) > 0
