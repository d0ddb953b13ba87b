"""Atomic checkpoints: weights as safetensors, optimizer/schedule/loop/RNG state as a tensors-only pickle.

A checkpoint is a directory ``checkpoints/step_00000100/`` with ``model.safetensors``, ``state.pt``
(optimizer, scheduler, train state), ``data_rank{R}.json`` (each rank's data position),
``rng_rank{R}.pt`` (each rank's torch and Python generators, and its own GPU's),
``sync_rank{R}.json`` (a digest of each rank's weights: if replicas diverged, every rank raises and
nothing is saved) and ``config.yaml`` (the resolved run config). Reading is ``clipforge.models.checkpoint``,
the one reader every command shares (resume, eval, export, ``model.init_from``). A checkpoint is written
under a hidden temporary name, every file fsynced, then renamed: a crash or kill never leaves a partial
directory under a final name.
``latest`` is a symlink to the newest one, replaced atomically. ``manifest.json`` (written last)
records every file's size and SHA-256; loading verifies them, so a truncated or corrupted
checkpoint (a full disk, a bad copy) is detected and named, and ``latest_intact`` falls back to the
previous one. Loading uses safetensors and ``torch.load(weights_only=True)``: no arbitrary object
is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from clipforge.models.checkpoint import REQUIRED_FILES, CorruptCheckpoint, read_weights, sha256, verify

log = logging.getLogger(__name__)

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, write) -> None:
    write(path)
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())


def rng_state(device: str | torch.device) -> dict[str, Any]:
    """This rank's generators: torch's CPU one, Python's, and under ``cuda_device`` (a uint8 tensor) the one of
    ``device`` when it is a GPU. Other GPUs' generators belong to other ranks: saving them all made a resume with
    fewer visible GPUs fail, and a CPU rank on a GPU host would initialise CUDA just to read them."""
    device = torch.device(device)
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: str | torch.device) -> None:
    """Restore ``rng_state``'s generators; the CUDA one only onto a GPU ``device`` (a GPU run resumed on a CPU
    has no generator to give it to). Older checkpoints hold every visible GPU's state as a list under ``cuda``:
    the entry of ``device``'s index is taken, if there is one."""
    device = torch.device(device)
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type != "cuda":
        return
    cuda_state = state.get("cuda_device")
    if cuda_state is None and "cuda" in state:
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda_state = state["cuda"][index] if index < len(state["cuda"]) else None
    if cuda_state is None:
        log.warning("the checkpoint holds no CUDA generator state for %s; it keeps this run's seed", device)
        return
    torch.cuda.set_rng_state(cuda_state, device)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters (not buffers: BatchNorm running statistics legitimately differ between
    data-parallel ranks after a forward pass; DDP re-broadcasts rank 0's before the next one)."""
    digest = hashlib.sha256()
    for name, tensor in model.named_parameters():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, directory: str | Path, keep_last: int = 3, rank: int = 0) -> None:
        self.directory, self.keep_last, self.rank = Path(directory), keep_last, rank

    def save(self, step: int, model: torch.nn.Module, state: dict[str, Any], data_state: dict[str, Any],
             config_yaml: str) -> Path:
        """Collective when distributed: every rank contributes its data position."""
        final = self.directory / f"step_{step:08d}"
        temporary = self.directory / f".step_{step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        _barrier()
        _write_synced(temporary / f"data_rank{self.rank}.json",
                      lambda p: p.write_text(json.dumps(data_state, sort_keys=True)))
        state = dict(state)
        if "rng" in state:  # every rank's own generators (dropout, patch-dropout masks differ between ranks)
            rng = state.pop("rng")
            _write_synced(temporary / f"rng_rank{self.rank}.pt", lambda p: torch.save(rng, p))
        _write_synced(temporary / f"sync_rank{self.rank}.json",
                      lambda p: p.write_text(json.dumps({"weights_sha256": weights_digest(model)})))
        _barrier()
        self._check_ranks_agree(temporary)  # on every rank, so that all of them raise, none waits for rank 0
        if self.rank == 0:
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            _write_synced(temporary / "model.safetensors", lambda p: save_file(weights, str(p)))
            _write_synced(temporary / "state.pt", lambda p: torch.save(state, p))
            _write_synced(temporary / "config.yaml", lambda p: p.write_text(config_yaml))
            files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)}
                     for f in sorted(temporary.iterdir()) if f.is_file()}
            _write_synced(temporary / "manifest.json",
                          lambda p: p.write_text(json.dumps({"step": step, "files": files}, indent=1)))
            _fsync_dir(temporary)
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
            link = self.directory / ".latest.tmp"
            link.unlink(missing_ok=True)
            link.symlink_to(final.name)
            os.replace(link, self.directory / "latest")
            _fsync_dir(self.directory)
            self._prune()
        _barrier()
        return final

    @staticmethod
    def _check_ranks_agree(directory: Path) -> None:
        """Data parallelism keeps every rank's weights identical; a checkpoint is where that is checked."""
        digests = {f.name: json.loads(f.read_text())["weights_sha256"] for f in sorted(directory.glob("sync_rank*"))}
        if len(set(digests.values())) > 1:
            raise RuntimeError(f"ranks hold different weights at this checkpoint ({digests}); data-parallel replicas "
                               f"diverged — every rank refuses to write {directory.name}")

    def _prune(self) -> None:
        complete = self.complete()
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.glob("step_*")
                 if p.is_dir() and all((p / f).is_file() for f in REQUIRED_FILES)]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        complete = self.complete()
        return complete[-1] if complete else None

    def latest_intact(self) -> Path | None:
        """The newest checkpoint whose files match their manifest; corrupt ones are skipped with a warning. When
        there are checkpoints and every one is corrupt, that is a ``CorruptCheckpoint`` naming each problem: a
        fresh start would silently throw the run away."""
        problems = []
        for candidate in reversed(self.complete()):
            try:
                verify(candidate)
                return candidate
            except CorruptCheckpoint as exn:
                log.warning("skipping corrupt checkpoint: %s", exn)
                problems.append(str(exn))
        if problems:
            raise CorruptCheckpoint(f"every checkpoint in {self.directory} is corrupt, so there is nothing intact to "
                                    f"resume from: {'; '.join(problems)}. Restore one, resume from a copy with "
                                    "--resume DIR, or start afresh with another train.output_dir")
        return None


def load_checkpoint(path: str | Path, model: torch.nn.Module, rank: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model``; return (state, this rank's data position). Nothing arbitrary is unpickled."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    weights = read_weights(path)  # the manifest is verified first
    model.load_state_dict(weights, strict=True)
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exn:  # verified, yet unreadable (or refused by weights_only): never load it otherwise
        raise CorruptCheckpoint(f"checkpoint {path}: state.pt does not load with weights_only=True ({exn})") from None
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        state["rng"] = torch.load(rng_file, map_location="cpu", weights_only=True)
    data_file = path / f"data_rank{rank}.json"
    if not data_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no data position for rank {rank} ({data_file.name}); "
                                "was it written with a different world size?")
    return state, json.loads(data_file.read_text())
