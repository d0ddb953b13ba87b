"""Why a checkpoint could not be written, in one line: ``write_failure`` turns the error of a failed write (a full
disk or quota, a read-only or unwritable folder; also when it hides in a rank's failure inside
``torch.distributed.checkpoint``'s ``CheckpointException``) into a ``CheckpointWriteError`` naming the folder and,
for a full disk, the filesystem and the space needed and free."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (no space, a read-only or unwritable folder); nothing was published."""


def nbytes(value: Any) -> int:
    """Bytes of the tensors in a (nested) state dict, at their full size (a DTensor counts all its shards)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(nbytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(item) for item in value)
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


def write_failure(
    exn: BaseException, step: int, temporary: Path, needed: int, directory: Path, latest: Callable[[], Path | None]
) -> BaseException:
    """``exn``, raised writing the checkpoint of ``step`` (``needed`` bytes) into ``directory`` through its
    ``temporary`` directory, as the one-line ``CheckpointWriteError`` when an OS error caused it, or when ``needed``
    exceeds the free space (call it after the partial copy was removed: the free space is what the next try would
    have); any other error as it is. ``latest``: the checkpoint that stays latest."""
    if isinstance(exn, (KeyboardInterrupt, SystemExit)):
        return exn
    cause = _os_error(exn)
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    full = cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT)
    if cause is None and not (free is not None and needed > free):  # a writer that hid the errno, or a bug
        return exn
    latest_path = latest()
    kept = f"{latest_path.name} stays latest" if latest_path else "no checkpoint was written before it"
    if cause is None or full:
        what = os.strerror(cause.errno) if cause is not None else "not enough space"
        mount = _mount_point(directory)
        space = (
            f"it needs about {_size(needed)}, {_size(free)} is free ({needed:,} vs {free:,} bytes)"
            if free is not None
            else f"it needs about {_size(needed)}"
        )
        return CheckpointWriteError(
            f"checkpoint of step {step} not written to {directory}: {what} on the filesystem at {mount}; "
            f"{space}. Its partial copy was removed and {kept}; free space (or set checkpoint.keep_last lower, or "
            "train.output_dir elsewhere) and run again with --resume auto"
        )
    path = cause.filename or temporary
    reason = cause.strerror or str(cause)
    return CheckpointWriteError(
        f"checkpoint of step {step} not written to {directory}: {reason} ({path}). Its partial copy was "
        f"removed and {kept}; make the folder writable (or set train.output_dir elsewhere) and run again with "
        "--resume auto"
    )
