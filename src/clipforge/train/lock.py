"""The run directory's lock: one ``clipforge train`` writes a ``train.output_dir`` at a time.

``RUN_DIR/train.lock`` is a small JSON file naming its holder: host, pid, start time, and the launch it belongs to
(SLURM job and restart count, torchrun rendezvous and restart count). Rank 0 takes it before it writes anything into
the run directory and removes it when the run ends, on errors and on the pre-emption exit too; the other ranks never
touch it (they stop with rank 0 when it cannot take it).

What it relies on, so that it holds on the shared filesystems of clusters (NFS, Lustre), where ``flock``/``fcntl``
locks are not always honoured or not seen by other clients: the record is written and fsynced under a private name,
then hard-linked to ``train.lock``. ``link`` fails when the name exists, atomically on NFS (v2 on) and Lustre as
on a local disk; a link whose reply was lost is recognised by the private file's link count. No lock daemon, no
clock agreement between hosts. The holder touches the file every ``HEARTBEAT_S`` seconds, so a trainer that meets
the lock can say how long ago its holder was last seen.

A lock is stale, and taken over with a warning, when:

* its holder ran on this host (same hostname and pid namespace) and that process is gone (a pid reused by another
  process is recognised by its start time);
* its holder was an earlier attempt of this same job: the same SLURM job with a lower ``SLURM_RESTART_COUNT``
  (SLURM ends every task of a job before it requeues it), or the same torchrun rendezvous with a lower
  ``TORCHELASTIC_RESTART_COUNT`` (torchrun stops every worker before it restarts them).

A holder on another host cannot be checked from here (a stopped heartbeat may be a suspended job or a slow
filesystem), so taking over its lock is explicit: ``clipforge train --take-over-lock``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from clipforge.distributed import DistInfo, make_agreement

log = logging.getLogger("clipforge.train")

LOCK_NAME = "train.lock"
HEARTBEAT_S = 30.0


class RunLocked(ValueError):
    """Another trainer holds the run directory's lock (the message names it and how to take over a dead one)."""


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name before ")" may hold spaces


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True)
class Holder:
    """Who holds (or wants) a run directory's lock."""

    host: str
    pid: int
    started: str  # ISO 8601, local time with its offset
    token: str  # unique to one acquisition
    pid_namespace: str | None = None
    process_start: int | None = None
    slurm_job: str | None = None
    slurm_restart: int = 0
    elastic_run: str | None = None
    elastic_restart: int = 0

    @classmethod
    def this_process(cls, env: Mapping[str, str]) -> Holder:
        elastic_run = env.get("TORCHELASTIC_RUN_ID")
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            token=uuid.uuid4().hex,
            pid_namespace=_pid_namespace(),
            process_start=_process_start(os.getpid()),
            slurm_job=env.get("SLURM_JOB_ID") or None,
            slurm_restart=int(env.get("SLURM_RESTART_COUNT") or 0),
            elastic_run=elastic_run if elastic_run not in (None, "", "none") else None,
            elastic_restart=int(env.get("TORCHELASTIC_RESTART_COUNT") or 0),
        )

    @classmethod
    def parse(cls, text: str) -> Holder:
        fields = json.loads(text)
        return cls(**{name: fields.get(name) for name in cls.__dataclass_fields__ if name in fields})

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"host {self.host}, pid {self.pid}, started {self.started}{job}"

    def alive(self, me: Holder) -> bool | None:
        """Whether the holder's process still runs; None when it ran on another host (it cannot be checked)."""
        if self.host != me.host or (self.pid_namespace and me.pid_namespace and self.pid_namespace != me.pid_namespace):
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: it exists
            pass
        started = _process_start(self.pid)
        return not (self.process_start and started and started != self.process_start)

    def earlier_attempt_of(self, me: Holder) -> bool:
        """The holder was an earlier attempt of ``me``'s job: a SLURM requeue or a torchrun restart of it."""
        job, my_job = (self.slurm_job, self.elastic_run), (me.slurm_job, me.elastic_run)
        if job != my_job or my_job == (None, None):
            return False
        return (self.slurm_restart, self.elastic_restart) < (me.slurm_restart, me.elastic_restart)


class RunLock:
    """``RUN_DIR/train.lock``, held from ``acquire`` to ``release`` (see the module docstring for the rules)."""

    def __init__(self, run_dir: str | Path, env: Mapping[str, str], take_over: bool = False) -> None:
        self.run_dir, self.take_over = Path(run_dir), take_over
        self.path = self.run_dir / LOCK_NAME
        self.me = Holder.this_process(env)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise ``RunLocked`` naming its holder; an unusable folder is a ``ValueError``."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(3):  # a lock removed or taken over by someone else meanwhile: look again
                if self._create():
                    break
                self._move_stale_aside()
            else:
                raise RunLocked(f"{self.path}: could not take the lock after three tries (another trainer is racing)")
        except OSError as exn:
            reason = f"{exn.strerror} ({exn.filename})" if exn.strerror and exn.filename else str(exn)
            raise ValueError(f"train.output_dir {self.run_dir}: cannot take the run's lock: {reason}") from None
        self._heartbeat = threading.Thread(target=self._beat, name="clipforge-run-lock", daemon=True)
        self._heartbeat.start()
        return self

    def release(self) -> None:
        """Remove the lock if it is still ours (a lock taken over by another trainer is left to it)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self._holder_token() == self.me.token:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        """Write our record under a private name, then hard-link it to the lock's name: False if that exists."""
        private = self.path.with_name(f"{LOCK_NAME}.{self.me.token}")
        with open(private, "x") as stream:
            stream.write(json.dumps(asdict(self.me), indent=1) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            return private.stat().st_nlink == 2  # NFS: the link was made but its reply was lost
        finally:
            private.unlink()

    def _move_stale_aside(self) -> None:
        """If the lock's holder is dead (or ``take_over``), move its lock aside; else raise ``RunLocked``."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return  # released meanwhile
        try:
            holder = Holder.parse(text)
        except (ValueError, TypeError) as exn:
            holder, unreadable = None, exn
        if holder is None:
            if not self.take_over:
                raise RunLocked(
                    f"{self.run_dir} is locked by {self.path}, whose holder cannot be read ({unreadable}); if no "
                    "trainer runs there, take it over with --take-over-lock"
                )
            reason = "its record is unreadable; --take-over-lock"
        elif holder.earlier_attempt_of(self.me):
            reason = f"an earlier attempt of this job ({holder.describe()})"
        elif holder.alive(self.me) is False:
            reason = f"its holder ({holder.describe()}) is no longer running"
        elif self.take_over:
            reason = f"held by {holder.describe()}; --take-over-lock"
        else:
            raise RunLocked(self._refusal(holder))
        aside = self.path.with_name(f"{LOCK_NAME}.{self.me.token}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_text() != text:  # another trainer took the lock between our read and the rename
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)  # give it back, and look again
                return
        finally:
            aside.unlink()
        log.warning("taking over the lock of %s: %s", self.run_dir, reason)

    def _refusal(self, holder: Holder) -> str:
        try:
            seen = f"{time.time() - self.path.stat().st_mtime:.0f} s ago"
        except OSError:
            seen = "unknown"
        alive = holder.alive(self.me)
        where = (
            "it is running on this host"
            if alive
            else f"on another host it cannot be checked from here; it last touched the lock {seen}"
        )
        return (
            f"{self.run_dir} is in use by another clipforge train ({holder.describe()}; {where}): wait for it to "
            f"end, or, if it is dead, take the run over with --take-over-lock (lock file {self.path})"
        )

    def _holder_token(self) -> str | None:
        try:
            return Holder.parse(self.path.read_text()).token
        except (OSError, ValueError, TypeError):
            return None

    def _beat(self) -> None:
        """Touch the lock every HEARTBEAT_S while it is ours; say so once if another trainer took it over."""
        while not self._stop.wait(HEARTBEAT_S):
            if self._holder_token() != self.me.token:
                log.error(
                    "the lock %s was taken over by another trainer (--take-over-lock?): two trainers now write %s",
                    self.path,
                    self.run_dir,
                )
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)


def check_unlocked(run_dir: str | Path, env: Mapping[str, str]) -> None:
    """Raise ``RunLocked`` when ``acquire`` would refuse the lock of ``run_dir`` (a live holder, or one on another
    host), taking nothing: the pre-flight of ``--dry-run`` and ``clipforge submit``."""
    lock = RunLock(run_dir, env)
    try:
        text = lock.path.read_text()
    except FileNotFoundError:
        return
    except OSError as exn:
        raise ValueError(f"train.output_dir {lock.run_dir}: cannot read the run's lock: {exn}") from None
    try:
        holder = Holder.parse(text)
    except (ValueError, TypeError) as exn:
        raise RunLocked(
            f"{lock.run_dir} is locked by {lock.path}, whose holder cannot be read ({exn}); if no trainer runs "
            "there, take it over with --take-over-lock"
        ) from None
    if holder.earlier_attempt_of(lock.me) or holder.alive(lock.me) is False:
        return  # stale: the run would take it over
    raise RunLocked(lock._refusal(holder))


@contextlib.contextmanager
def hold_run_dir(
    run_dir: str | Path, dist_info: DistInfo, env: Mapping[str, str], take_over: bool = False
) -> Iterator[RunLock | None]:
    """Rank 0 holds ``run_dir``'s lock for the block; every rank raises if rank 0 could not take it. Yields the lock
    on rank 0, None elsewhere."""
    lock, problem = None, None
    if dist_info.is_main:
        try:
            lock = RunLock(run_dir, env, take_over).acquire()
        except ValueError as exn:
            problem = exn
    if dist_info.is_distributed and not make_agreement(dist_info)(problem is None):
        raise problem or RunLocked(f"rank 0 could not take the lock of {run_dir} (its log names the holder)")
    if problem is not None:
        raise problem
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
