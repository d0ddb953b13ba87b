"""Atomic checkpoints of the restart state (``clipforge.train.state``): a directory the checkpointer fills by
iterating the Stateful pieces.

``checkpoints/step_00000100/`` holds, by kind of piece:

* sharded (the model and the optimizer): under FSDP, ``torch.distributed.checkpoint`` shards, one
  ``__R_0.distcp`` per rank plus ``.metadata``, each rank writing its own; under DDP or one process
  ``model.safetensors`` (rank 0; the replicas are identical) and the optimizer inside ``state.pt``;
* replicated (schedule, train step, fp16 scaler, queue): ``state.pt``, a tensors-only pickle, rank 0;
* per rank (data position, generators): ``NAME_rank{R}.json`` or ``NAME_rank{R}.pt``;

plus ``sync_rank{R}.json`` (DDP: a digest of each rank's weights; if replicas diverged, every rank raises and
nothing is saved), ``config.yaml`` (the resolved run config) and ``manifest.json``, written last, with every file's
size and SHA-256. A checkpoint is written under a hidden temporary name unique to this writer
(``.step_N.ID.tmp``), every file fsynced, checked complete, then renamed: a crash or kill (during the DCP write
too), or a second trainer writing into the same folder, never leaves a partial directory under a final name.
``latest`` is a symlink to the newest one, replaced atomically; ``latest_intact`` falls back past a corrupt one. A
write that fails (a full disk, a read-only or unwritable folder) removes its temporary directory and raises
``CheckpointWriteError``, one line naming the folder and, for a full disk, the space needed and free; the previous
checkpoint stays ``latest``.

Reading goes through ``clipforge.checkpoints`` (the manifest verified first; DCP metadata through a restricted
unpickler; ``torch.load(weights_only=True)``): no arbitrary object is ever unpickled. Checkpoints written before
the restart state was iterated (``data_rank{R}.json``, ``state.pt`` with ``step``/``optimizer``/``scheduler``)
still resume.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from clipforge.checkpoints import (
    CorruptCheckpoint,
    check_complete,
    is_sharded,
    read_metadata,
    read_weights,
    sha256,
    storage_reader,
    verify,
    with_process_umask,
)
from clipforge.train.parallel import is_sharded as model_is_sharded
from clipforge.train.parallel import unwrap
from clipforge.train.state import PER_RANK, REPLICATED, SHARDED, Piece

log = logging.getLogger(__name__)


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (no space, a read-only or unwritable folder); nothing was published."""


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


def _torch_save(value: Any, path: Path) -> None:
    """``torch.save`` through a Python file: a failed write raises ``OSError`` with its errno (saved to a path name,
    torch's writer turns a full disk into ``RuntimeError: ... unexpected pos``)."""
    with open(path, "wb") as stream:
        torch.save(value, stream)


def _save_safetensors(weights: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file``, its I/O errors raised as ``OSError`` (it reports them as a string)."""
    from safetensors import SafetensorError

    try:
        save_file(weights, str(path))
    except SafetensorError as exn:
        found = re.search(r"os error (\d+)", str(exn))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exn


def _nbytes(value: Any) -> int:
    """Bytes of the tensors in a (nested) state dict, at their full size (a DTensor counts all its shards)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(item) for item in value)
    return 0


def _os_error(exn: BaseException) -> OSError | None:
    """The ``OSError`` behind a failed write: ``exn`` itself, its cause or context, or a rank's failure inside a
    ``torch.distributed.checkpoint`` ``CheckpointException``."""
    seen: list[BaseException] = [exn]
    while seen:
        current = seen.pop(0)
        if isinstance(current, OSError):
            return current
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            seen.extend(item[0] if isinstance(item, tuple) else item for item in failures.values())
        seen.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _size(count: int) -> str:
    """``count`` bytes in binary units, e.g. '47.2 MiB'."""
    value, unit = float(count), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{count} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters (not buffers: BatchNorm running statistics legitimately differ between
    data-parallel ranks after a forward pass; DDP re-broadcasts rank 0's before the next one)."""
    digest = hashlib.sha256()
    for name, tensor in model.named_parameters():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _is_complete(path: Path) -> bool:
    try:
        check_complete(path)
        return True
    except CorruptCheckpoint:
        return False


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """Writes and reads the checkpoints of one run directory. With ``asynchronous`` (``checkpoint.async_save``) the
    model and optimizer are copied in memory and written in the background by ``torch.distributed.checkpoint``'s
    ``async_save`` (on a process group of its own, so its collectives never interleave with the step's), and the
    next step starts while they are written; rank 0 publishes the checkpoint (manifest, rename, ``latest``) once
    every rank's shards are on disk. A write that fails or is killed publishes nothing: ``latest`` keeps pointing at
    the previous checkpoint. ``wait`` blocks until the pending checkpoint is published and raises its error."""

    def __init__(self, directory: str | Path, keep_last: int = 3, rank: int = 0, asynchronous: bool = False) -> None:
        self.directory, self.keep_last, self.rank = Path(directory), keep_last, rank
        self.asynchronous = asynchronous
        self._group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None
        self._pending: Future | None = None
        self._published: Future | None = None
        self._writer: str | None = None
        self._attempt: tuple[int, Path, int] = (0, self.directory, 0)  # step, temporary directory, bytes

    def save(self, step: int, pieces: dict[str, Piece], config_yaml: str) -> Path:
        """Write every piece of ``pieces`` (``clipforge.train.state.restart_state``); collective when distributed.
        Asynchronous: returns once the model and optimizer are copied, before they are written (see ``wait``).
        A failed write removes what it wrote and raises ``CheckpointWriteError`` for an OS error (no space, a
        read-only or unwritable folder), the original error otherwise."""
        self.wait()
        final = self.directory / f"step_{step:08d}"
        temporary = self.directory / f".step_{step:08d}.{self._writer_id()}.tmp"
        self._attempt = (step, temporary, 0)
        try:
            self._write(step, pieces, config_yaml, temporary, final)
        except BaseException as exn:  # a second Ctrl-C too: no partial copy stays behind
            pending, self._pending, self._published = self._pending, None, None
            if pending is not None:  # the background write into the folder that is about to go: let it end first
                with contextlib.suppress(BaseException):
                    pending.result()
            if self.rank == 0:
                shutil.rmtree(temporary, ignore_errors=True)
            failure = self._failure(exn)
            if failure is exn:
                raise
            raise failure from exn
        return final

    def _write(self, step: int, pieces: dict[str, Piece], config_yaml: str, temporary: Path, final: Path) -> None:
        model = pieces["model"].stateful.model
        sharded = model_is_sharded(model)
        every_rank_writes_shards = sharded or self.asynchronous  # a collective; replicas are deduplicated
        # every rank's own (data positions and generators differ between ranks); then what rank 0 writes alone
        per_rank = {name: piece.stateful.state_dict() for name, piece in pieces.items() if piece.kind == PER_RANK}
        state = {name: piece.stateful.state_dict() for name, piece in pieces.items() if piece.kind == REPLICATED}
        tensors = (
            {name: piece.stateful.state_dict() for name, piece in pieces.items() if piece.kind == SHARDED}
            if every_rank_writes_shards or self.rank == 0
            else {}
        )
        self._attempt = (step, temporary, _nbytes(per_rank) + _nbytes(state) + _nbytes(tensors))
        if self.rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        _barrier()
        for name, value in per_rank.items():
            _write_per_rank(temporary, name, self.rank, value)
        if not sharded:
            _write_synced(
                temporary / f"sync_rank{self.rank}.json",
                lambda p: p.write_text(json.dumps({"weights_sha256": weights_digest(unwrap(model))})),
            )
        _barrier()
        self._check_ranks_agree(temporary)  # on every rank, so that all of them raise, none waits for rank 0
        if every_rank_writes_shards:
            self._write_shards(temporary, tensors)
        elif self.rank == 0:
            weights = tensors.pop("model")
            state.update(tensors)  # the optimizer, beside the replicated pieces
            _write_synced(temporary / "model.safetensors", lambda p: _save_safetensors(weights, p))
            with_process_umask(temporary / "model.safetensors")
        if self.rank == 0:
            _write_synced(temporary / "state.pt", lambda p: _torch_save(state, p))
            _write_synced(temporary / "config.yaml", lambda p: p.write_text(config_yaml))
        if self._pending is not None:  # rank 0 publishes when the background write is done, on every rank
            if self.rank == 0:
                published = self._published = Future()
                self._pending.add_done_callback(
                    lambda written: self._publish_after(written, published, temporary, final, step)
                )
            return
        _barrier()
        if self.rank == 0:
            self._publish(temporary, final, step)
        _barrier()

    def _writer_id(self) -> str:
        """A name for this writer's temporary directories, the same on every rank (agreed at the first save): two
        trainers that somehow write into one folder never write into, or remove, each other's."""
        if self._writer is None:
            agreed = [uuid.uuid4().hex[:12]]
            if dist.is_initialized():
                dist.broadcast_object_list(agreed, src=0)
            self._writer = agreed[0]
        return self._writer

    def _failure(self, exn: BaseException) -> BaseException:
        """``exn`` as the one-line ``CheckpointWriteError`` when an OS error caused it (after the partial copy was
        removed: the free space is what the next try would have); any other error as it is."""
        if isinstance(exn, (KeyboardInterrupt, SystemExit)):
            return exn
        step, temporary, needed = self._attempt
        cause = _os_error(exn)
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            free = None
        full = cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT)
        if cause is None and not (free is not None and needed > free):  # a writer that hid the errno, or a bug
            return exn
        latest = self.latest()
        kept = f"{latest.name} stays latest" if latest else "no checkpoint was written before it"
        if cause is None or full:
            what = os.strerror(cause.errno) if cause is not None else "not enough space"
            mount = _mount_point(self.directory)
            space = (
                f"it needs about {_size(needed)}, {_size(free)} is free ({needed:,} vs {free:,} bytes)"
                if free is not None
                else f"it needs about {_size(needed)}"
            )
            return CheckpointWriteError(
                f"checkpoint of step {step} not written to {self.directory}: {what} on the filesystem at {mount}; "
                f"{space}. Its partial copy was removed and {kept}; free space (or set checkpoint.keep_last lower, or "
                "train.output_dir elsewhere) and run again with --resume auto"
            )
        path = cause.filename or temporary
        reason = cause.strerror or str(cause)
        return CheckpointWriteError(
            f"checkpoint of step {step} not written to {self.directory}: {reason} ({path}). Its partial copy was "
            f"removed and {kept}; make the folder writable (or set train.output_dir elsewhere) and run again with "
            "--resume auto"
        )

    def _write_shards(self, temporary: Path, tensors: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        writer = dcp.FileSystemWriter(str(temporary), sync_files=True)
        if not self.asynchronous:
            dcp.save(tensors, storage_writer=writer)
            return
        with warnings.catch_warnings():  # one process: "torch.distributed is ... uninitialized, assuming ..."
            warnings.simplefilter("ignore", UserWarning)
            self._pending = dcp.async_save(tensors, storage_writer=writer, process_group=self._group)

    def _publish_after(self, written: Future, published: Future, temporary: Path, final: Path, step: int) -> None:
        """Rank 0, in the background writer's thread: publish the checkpoint if every rank's write succeeded."""
        try:
            written.result()
            self._publish(temporary, final, step)
            published.set_result(final)
        except BaseException as exn:  # noqa: BLE001 — handed to wait(), which raises it in the training thread
            shutil.rmtree(temporary, ignore_errors=True)
            failure = self._failure(exn)
            if failure is not exn:
                failure.__cause__ = exn
            log.error("background checkpoint of step %d failed: %s", step, " ".join(str(failure).split())[:500])
            published.set_exception(failure)

    def wait(self) -> None:
        """Block until the pending asynchronous checkpoint (if any) is written and published; raise its error
        (``CheckpointWriteError`` for an OS error, as ``save``)."""
        pending, published, self._pending, self._published = self._pending, self._published, None, None
        if pending is None:
            return
        try:
            if published is not None:  # rank 0: the error, if any, as the publishing callback made it
                published.result()
                return
            try:
                pending.result()
            except BaseException as exn:
                failure = self._failure(exn)
                if failure is exn:
                    raise
                raise failure from exn
        finally:
            _barrier()  # no rank starts the next checkpoint before rank 0 has published this one

    def _publish(self, temporary: Path, final: Path, step: int) -> None:
        """Rank 0: the manifest (written last), then the rename to the final name and ``latest``, atomically. A
        temporary directory that lacks a file of its layout is never published (the rename is where it would
        become a checkpoint)."""
        files = {
            f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in sorted(temporary.iterdir()) if f.is_file()
        }
        _write_synced(
            temporary / "manifest.json",
            lambda p: p.write_text(json.dumps({"step": step, "files": files}, indent=1)),
        )
        _fsync_dir(temporary)
        try:
            check_complete(temporary)
        except CorruptCheckpoint as exn:
            raise CheckpointWriteError(
                f"checkpoint of step {step} not published: {exn}; is another trainer writing into {self.directory}?"
            ) from None
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        link = self.directory / f".latest.{self._writer_id()}.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(final.name)
        os.replace(link, self.directory / "latest")
        _fsync_dir(self.directory)
        self._prune()

    def discard_partial(self) -> list[Path]:
        """Rank 0 of the run that holds the run directory's lock: remove the temporary directories of checkpoints
        that were never finished (a kill mid-write); returns them."""
        found = sorted(self.directory.glob(".step_*.tmp")) if self.directory.is_dir() else []
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
        for link in self.directory.glob(".latest.*tmp") if self.directory.is_dir() else []:
            link.unlink(missing_ok=True)
        return found

    def load(self, path: str | Path, pieces: dict[str, Piece]) -> None:
        """Restore every piece from the checkpoint at ``path`` (verified against its manifest first)."""
        path = Path(path).resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        check_complete(path)
        verify(path)
        state = _read_state(path)
        state.update(_legacy_names(state))
        sharded = {name: piece for name, piece in pieces.items() if piece.kind == SHARDED}
        if is_sharded(path):
            import torch.distributed.checkpoint as dcp

            loaded = _templates(sharded, set(read_metadata(path).state_dict_metadata))
            try:
                with warnings.catch_warnings():  # one process: "torch.distributed is ... uninitialized, assuming ..."
                    warnings.simplefilter("ignore", UserWarning)
                    dcp.load(loaded, storage_reader=storage_reader(path))
            except Exception as exn:  # the storage layer raises its own types for a bad or foreign shard
                raise CorruptCheckpoint(
                    f"checkpoint {path}: its shards do not load into this run's model and "
                    f"optimizer ({type(exn).__name__}: {exn})"
                ) from None
            state.update(loaded)
        else:
            state["model"] = read_weights(path)
        for name, piece in pieces.items():
            if piece.kind == PER_RANK:
                states = _read_all_ranks(path, name)
                if hasattr(piece.stateful, "load_state_dicts") and states:
                    _loading(path, piece.stateful.load_state_dicts, states)
                    continue
                found = states[self.rank] if self.rank < len(states) else None
            else:
                found = state.get(name)
            if found is None:
                if not piece.required:
                    continue
                raise ValueError(
                    f"checkpoint {path} holds no {name!r} state for rank {self.rank}: it was written by "
                    f"a run with other settings (another world size, or without this {name})"
                )
            _loading(path, piece.stateful.load_state_dict, found)

    @staticmethod
    def _check_ranks_agree(directory: Path) -> None:
        """Data parallelism keeps every rank's weights identical; a checkpoint is where that is checked."""
        digests = {f.name: json.loads(f.read_text())["weights_sha256"] for f in sorted(directory.glob("sync_rank*"))}
        if len(set(digests.values())) > 1:
            _barrier()  # every rank finds the same, and has read the files before rank 0 removes them
            raise RuntimeError(
                f"ranks hold different weights at this checkpoint ({digests}); data-parallel replicas "
                f"diverged — every rank refuses to write {directory.name}"
            )

    def _prune(self) -> None:
        complete = self.complete()
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.glob("step_*") if p.is_dir() and _is_complete(p)]
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
            raise CorruptCheckpoint(
                f"every checkpoint in {self.directory} is corrupt, so there is nothing intact to "
                f"resume from: {'; '.join(problems)}. Restore one, resume from a copy with "
                "--resume DIR, or start afresh with another train.output_dir"
            )
        return None


def _templates(sharded: dict[str, Piece], saved: set[str]) -> dict[str, Any]:
    """What each sharded piece is read into: its ``template`` of the entries the checkpoint holds (the optimizer's,
    whose template would otherwise ask for the state of a parameter that had none when it was written), or its
    ``state_dict``."""
    loaded = {}
    for name, piece in sharded.items():
        template = getattr(piece.stateful, "template", None)
        if template is None:
            loaded[name] = piece.stateful.state_dict()
        else:
            loaded[name] = template({key[len(name) + 1 :] for key in saved if key.startswith(name + ".")})
    return loaded


def _loading(path: Path, load, state) -> None:
    try:
        load(state)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _legacy_names(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint from before the restart state was iterated: ``step`` and ``scheduler`` at the top of state.pt."""
    renamed = {}
    if "train" not in state and "step" in state:
        renamed["train"] = {"step": state["step"]}
    if "schedule" not in state and "scheduler" in state:
        renamed["schedule"] = state["scheduler"]
    return renamed


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exn:  # verified, yet unreadable (or refused by weights_only): never load it otherwise
        raise CorruptCheckpoint(f"checkpoint {path}: state.pt does not load with weights_only=True ({exn})") from None


def _write_per_rank(directory: Path, name: str, rank: int, value: dict[str, Any]) -> None:
    """JSON where the state is plain (a data position reads as text), a tensors-only pickle otherwise."""
    try:
        text = json.dumps(value, sort_keys=True)
    except TypeError:
        _write_synced(directory / f"{name}_rank{rank}.pt", lambda p: _torch_save(value, p))
    else:
        _write_synced(directory / f"{name}_rank{rank}.json", lambda p: p.write_text(text))


def _read_all_ranks(path: Path, name: str) -> list[dict[str, Any]]:
    """Every rank's saved ``name`` state, by rank (rank 0 up to the first rank with none)."""
    states = []
    while (found := _read_per_rank(path, name, len(states))) is not None:
        states.append(found)
    return states


def _read_per_rank(path: Path, name: str, rank: int) -> dict[str, Any] | None:
    if (path / f"{name}_rank{rank}.json").is_file():
        return json.loads((path / f"{name}_rank{rank}.json").read_text())
    if (path / f"{name}_rank{rank}.pt").is_file():
        try:
            return torch.load(path / f"{name}_rank{rank}.pt", map_location="cpu", weights_only=True)
        except Exception as exn:
            raise CorruptCheckpoint(
                f"checkpoint {path}: {name}_rank{rank}.pt does not load with weights_only=True ({exn})"
            ) from None
    return None
