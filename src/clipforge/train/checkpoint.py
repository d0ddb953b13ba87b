"""Atomic checkpoints of the restart state (``clipforge.train.state``): a directory the checkpointer fills by
iterating the Stateful pieces.

``checkpoints/step_00000100/`` holds, by kind of piece:

* sharded (the model and the optimizer): ``torch.distributed.checkpoint`` (DCP) files, ``.metadata`` plus one
  ``__R_0.distcp`` per rank that wrote: under FSDP each rank its shards, under DDP or one process rank 0 the whole
  tensors (the replicas are identical; rank 0's buffers are those DDP broadcasts). One layout for every strategy,
  world size and ``asynchronous``: DCP is what FSDP's shards and ``async_save`` need, and it reads the files of
  any world size or strategy into this run's;
* replicated (schedule, train step, fp16 scaler, the objectives' state): ``state.pt``, a tensors-only pickle, rank 0;
* per rank (data position, generators): ``NAME_rank{R}.json`` or ``NAME_rank{R}.pt``;

plus ``sync_rank{R}.json`` (DDP: a digest of each rank's weights; if replicas diverged, every rank raises and
nothing is saved), ``config.yaml`` and ``manifest.json``, written last, with the layout's ``format`` and every
file's size and SHA-256. A checkpoint is written under a hidden temporary name unique to this writer
(``.step_N.ID.tmp``), every file fsynced, checked complete, then renamed: a crash or kill (during the DCP write
too), or a second trainer writing into the same folder, never leaves a partial directory under a final name.
``latest`` is a symlink to the newest one, replaced atomically; ``latest_intact`` falls back past a corrupt one. A
write that fails (a full disk, a read-only or unwritable folder) removes its temporary directory and raises
``CheckpointWriteError``, one line naming the folder (``clipforge.train.checkpoint_failure``); the previous
checkpoint stays ``latest``.

Reading goes through ``clipforge.checkpoints`` (the manifest verified first; DCP metadata and entries through
restricted unpicklers; ``torch.load(weights_only=True)``): no arbitrary object is ever unpickled. A checkpoint
whose manifest has no ``format`` is read through ``checkpoint_read.upgrade``, the one place that knows the other
layouts and names such a checkpoint may have.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from clipforge.checkpoints import (
    FORMAT,
    CorruptCheckpoint,
    check_complete,
    is_complete,
    load_dcp,
    manifest_format,
    read_metadata,
    sha256,
    verify,
)
from clipforge.train.checkpoint_failure import CheckpointWriteError, nbytes, write_failure
from clipforge.train.checkpoint_read import Saved, read_ranks, read_state, upgrade
from clipforge.train.parallel import is_sharded, unwrap
from clipforge.train.state import PER_RANK, REPLICATED, SHARDED, Piece

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)
# DCP warns at every save and load in one process (in the background writer's thread too) that it assumes one process
warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized", UserWarning)


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


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters (not buffers: BatchNorm running statistics legitimately differ between
    data-parallel ranks after a forward pass; DDP re-broadcasts rank 0's before the next one)."""
    digest = hashlib.sha256()
    for name, tensor in model.named_parameters():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Checkpointer:
    """Writes and reads the checkpoints of one run directory. ``mesh``: the run's one-dimensional device mesh, whose
    group's ranks write and read together (``rank`` is this process's place in it); None: the default process
    group, or one process. With ``asynchronous`` (``checkpoint.async_save``) the model and optimizer are copied in
    memory and written in the background by ``torch.distributed.checkpoint``'s ``async_save`` (on a gloo group of
    its own, so its collectives never interleave with the step's), and the next step starts while they are
    written; rank 0 publishes the checkpoint (manifest, rename, ``latest``) once every rank's files are on disk. A
    write that fails or is killed publishes nothing: ``latest`` keeps pointing at the previous checkpoint. ``wait``
    blocks until the pending checkpoint is published and raises its error."""

    def __init__(
        self,
        directory: str | Path,
        keep_last: int = 3,
        rank: int = 0,
        asynchronous: bool = False,
        *,
        mesh: DeviceMesh | None = None,
    ) -> None:
        self.directory, self.keep_last, self.rank = Path(directory), keep_last, rank
        self.asynchronous = asynchronous
        self._group = None if mesh is None else mesh.get_group()
        ranks = None if self._group is None else dist.get_process_group_ranks(self._group)
        self._async_group = dist.new_group(ranks, backend="gloo") if asynchronous and dist.is_initialized() else None
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
            failure = write_failure(exn, *self._attempt, self.directory, self.latest)
            if failure is exn:
                raise
            raise failure from exn
        return final

    def _write(self, step: int, pieces: dict[str, Piece], config_yaml: str, temporary: Path, final: Path) -> None:
        model = pieces["model"].stateful.model
        # every rank's own (data positions and generators differ between ranks), the DCP files' (written by every
        # rank together), then what rank 0 writes alone
        per_rank = {name: piece.stateful.state_dict() for name, piece in pieces.items() if piece.kind == PER_RANK}
        tensors = {name: piece.stateful.state_dict() for name, piece in pieces.items() if piece.kind == SHARDED}
        state = {name: piece.stateful.state_dict() for name, piece in pieces.items() if piece.kind == REPLICATED}
        self._attempt = (step, temporary, nbytes(per_rank) + nbytes(state) + nbytes(tensors))
        if self.rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        self._barrier()
        for name, value in per_rank.items():
            _write_per_rank(temporary, name, self.rank, value)
        if not is_sharded(model):
            _write_synced(
                temporary / f"sync_rank{self.rank}.json",
                lambda p: p.write_text(json.dumps({"weights_sha256": weights_digest(unwrap(model))})),
            )
        self._barrier()
        self._check_ranks_agree(temporary)  # on every rank, so that all of them raise, none waits for rank 0
        self._write_shards(temporary, tensors)
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
        self._barrier()
        if self.rank == 0:
            self._publish(temporary, final, step)
        self._barrier()

    def _writer_id(self) -> str:
        """A name for this writer's temporary directories, the same on every rank (agreed at the first save): two
        trainers that somehow write into one folder never write into, or remove, each other's."""
        if self._writer is None:
            agreed = [uuid.uuid4().hex[:12]]
            if self._distributed:
                dist.broadcast_object_list(agreed, group=self._group, group_src=0)
            self._writer = agreed[0]
        return self._writer

    def _write_shards(self, temporary: Path, tensors: dict[str, Any]) -> None:
        """The DCP files, by every rank together. A tensor every rank holds whole (DDP's model and optimizer, FSDP's
        unsharded scalars) is written once, by the lowest rank: rank 0's buffers are the ones DDP broadcasts."""
        import torch.distributed.checkpoint as dcp

        options = dict(
            storage_writer=dcp.FileSystemWriter(str(temporary), sync_files=True),
            planner=dcp.DefaultSavePlanner(dedup_save_to_lowest_rank=True),
            no_dist=not self._distributed,
        )
        if self.asynchronous:
            self._pending = dcp.async_save(tensors, process_group=self._async_group, **options)
        else:
            dcp.save(tensors, process_group=self._group, **options)

    def _publish_after(self, written: Future, published: Future, temporary: Path, final: Path, step: int) -> None:
        """Rank 0, in the background writer's thread: publish the checkpoint if every rank's write succeeded."""
        try:
            written.result()
            self._publish(temporary, final, step)
            published.set_result(final)
        except BaseException as exn:  # noqa: BLE001 — handed to wait(), which raises it in the training thread
            shutil.rmtree(temporary, ignore_errors=True)
            failure = write_failure(exn, *self._attempt, self.directory, self.latest)
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
                failure = write_failure(exn, *self._attempt, self.directory, self.latest)
                if failure is exn:
                    raise
                raise failure from exn
        finally:
            self._barrier()  # no rank starts the next checkpoint before rank 0 has published this one

    def _publish(self, temporary: Path, final: Path, step: int) -> None:
        """Rank 0: the manifest (written last), then the rename to the final name and ``latest``, atomically. A
        temporary directory that lacks a file of its layout is never published (the rename is where it would
        become a checkpoint)."""
        files = {
            f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in sorted(temporary.iterdir()) if f.is_file()
        }
        _write_synced(
            temporary / "manifest.json",
            lambda p: p.write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1)),
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
        saved = self._read(path, pieces) if manifest_format(path) == FORMAT else upgrade(path, pieces, self._read)
        for name, piece in pieces.items():
            if piece.kind == PER_RANK:
                states = saved.ranks.get(name, [])
                if hasattr(piece.stateful, "load_state_dicts") and states:
                    _loading(path, piece.stateful.load_state_dicts, states)
                    continue
                found = states[self.rank] if self.rank < len(states) else None
            else:
                found = saved.state.get(name)
            if found is None:
                if not piece.required:
                    continue
                raise ValueError(
                    f"checkpoint {path} holds no {name!r} state for rank {self.rank}: it was written by "
                    f"a run with other settings (another world size, or without this {name})"
                )
            if piece.kind == SHARDED:
                _loading(path, lambda value, piece=piece: piece.stateful.load_state_dict(value, saved.whole), found)
            else:
                _loading(path, piece.stateful.load_state_dict, found)

    def _read(self, path: Path, pieces: dict[str, Piece]) -> Saved:
        """The restart state of a DCP checkpoint: the sharded pieces read into this run's form (``_templates``)."""
        state = read_state(path)
        sharded = {name: piece for name, piece in pieces.items() if piece.kind == SHARDED}
        saved = set(read_metadata(path).state_dict_metadata)
        missing = [name for name in sharded if not any(key.split(".", 1)[0] == name for key in saved)]
        if missing:  # e.g. clipforge wise-ft's output: weights to start from, not a run to continue
            raise ValueError(f"checkpoint {path} holds no {' and no '.join(missing)}: start from it (model.init_from)")
        loaded = _templates(sharded, saved)
        into = " into this run's model and optimizer"
        load_dcp(path, loaded, into, process_group=self._group, no_dist=not self._distributed)
        return Saved({**state, **loaded}, read_ranks(path, pieces))

    @property
    def _distributed(self) -> bool:
        return dist.is_initialized()

    def _barrier(self) -> None:
        if self._distributed:
            dist.barrier(group=self._group)

    def _check_ranks_agree(self, directory: Path) -> None:
        """Data parallelism keeps every rank's weights identical; a checkpoint is where that is checked."""
        digests = {f.name: json.loads(f.read_text())["weights_sha256"] for f in sorted(directory.glob("sync_rank*"))}
        if len(set(digests.values())) > 1:
            self._barrier()  # every rank finds the same, and has read the files before rank 0 removes them
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
        found = [p for p in self.directory.glob("step_*") if p.is_dir() and is_complete(p)]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        return next(reversed(self.complete()), None)

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


def _write_per_rank(directory: Path, name: str, rank: int, value: dict[str, Any]) -> None:
    """JSON where the state is plain (a data position reads as text), a tensors-only pickle otherwise."""
    try:
        text = json.dumps(value, sort_keys=True)
    except TypeError:
        _write_synced(directory / f"{name}_rank{rank}.pt", lambda p: _torch_save(value, p))
    else:
        _write_synced(directory / f"{name}_rank{rank}.json", lambda p: p.write_text(text))
