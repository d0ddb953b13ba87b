"""A real single-node SLURM for the tests: installed from Debian packages if missing, started, stopped by PID.

    python tests/slurm_cluster.py up /tmp/slurm     # start one by hand (prints the SLURM_CONF to export); Ctrl-C stops

``SlurmCluster(root).start()`` writes a munge key and a ``slurm.conf`` under ``root`` (state, spool, pid and log
files all there), starts ``munged``, ``slurmctld`` and ``slurmd`` in the foreground as child processes and waits
until the node is idle; ``stop()`` terminates exactly those PIDs. Clients find it through ``SLURM_CONF``
(``cluster.env``). It runs as root without systemd or cgroups: process tracking by process group, no task
plugin, no accounting. What each setting is for is said beside it; they were found by trying (issue #8).

``start()`` raises ``SlurmUnavailable`` with the reason (not root, apt-get failed, a daemon died and its log's
tail) so the tests can skip and print why.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo")


class SlurmUnavailable(RuntimeError):
    """SLURM could not be installed or started here; the message says why."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def install() -> None:
    """``apt-get install`` the Debian packages when a binary is missing (needs root and the package mirror)."""
    if all(shutil.which(name) for name in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM is not installed ({', '.join(PACKAGES)}) and installing needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SlurmUnavailable(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    missing = [name for name in BINARIES if not shutil.which(name)]
    if missing:
        raise SlurmUnavailable(f"installed {PACKAGES} but {missing} are still not on PATH")


def node_line() -> str:
    """``NodeName=... CPUs=... RealMemory=...`` as ``slurmd -C`` sees this machine."""
    done = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()[0].strip()


class SlurmCluster:
    def __init__(self, root: str | Path, cred_expire_s: int = 5) -> None:
        self.root = Path(root)
        self.cred_expire_s = cred_expire_s
        self.processes: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.node_name = ""
        self.cpus = 0

    @property
    def env(self) -> dict[str, str]:
        """The environment a client (sbatch, scontrol, the trainer's requeue) needs: ``SLURM_CONF``."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _log(self, name: str) -> Path:
        return self.root / "log" / f"{name}.log"

    def _write_config(self) -> None:
        line = node_line()
        fields = dict(item.split("=", 1) for item in line.split())
        self.node_name, self.cpus = fields["NodeName"], int(fields["CPUs"])
        # slurmd -C reports all memory; leave some for the daemons so jobs asking for "all" still fit.
        fields["RealMemory"] = str(max(int(fields.get("RealMemory", "1024")) - 512, 512))
        node = " ".join(f"{key}={value}" for key, value in fields.items() if key != "UpTime")
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = _free_port(), _free_port()
        self.conf.write_text(f"""\
ClusterName=clipforge-test
SlurmctldHost={self.node_name}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# munge's socket lives here; a short credential lifetime: a requeued job waits cred_expire + 1 s before it may start
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}
StateSaveLocation={self.root / "state"}
SlurmdSpoolDir={self.root / "spool"}
SlurmctldPidFile={self.root / "run" / "slurmctld.pid"}
SlurmdPidFile={self.root / "run" / "slurmd.pid"}
SlurmctldLogFile={self._log("slurmctld")}
SlurmdLogFile={self._log("slurmd")}
SlurmctldDebug=info
SlurmdDebug=info
# no systemd, no cgroups: track a job's processes by process group, no task affinity plugin, no accounting
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# a job asking for more than the node has is refused at submission instead of pending forever
EnforcePartLimits=ALL
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# schedule every few seconds (defaults: 60 s / 30 s) so a requeued job restarts soon after its begin time
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=600
KillWait=30
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes={self.node_name} Default=YES MaxTime=INFINITE State=UP
""")

    def _start_munge(self) -> None:
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(parents=True, exist_ok=True)
        munge_dir.chmod(0o755)  # munged refuses a socket directory others cannot reach
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.processes["munged"] = subprocess.Popen(
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'run' / 'munged.pid'}",
                f"--seed-file={self.root / 'munge' / 'seed'}",
                f"--log-file={self._log('munged')}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self._log("munged.stderr"), "wb"),
        )
        self._wait(lambda: self.munge_socket.exists(), "munged", 20)

    def _start_slurm(self) -> None:
        env = self.env
        self.processes["slurmctld"] = subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(self.conf)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self._log("slurmctld.stderr"), "wb"),
        )
        self._wait(
            lambda: (
                subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True).stdout.count("UP") > 0
            ),
            "slurmctld",
            30,
        )
        self.processes["slurmd"] = subprocess.Popen(
            ["slurmd", "-D", "-f", str(self.conf), "-N", self.node_name],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self._log("slurmd.stderr"), "wb"),
        )
        self._wait(
            lambda: (
                subprocess.run(
                    ["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True
                ).stdout.strip()
                == "idle"
            ),
            "slurmd",
            60,
        )

    def _wait(self, ready, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for proc_name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{proc_name} exited with {proc.returncode}: {self.log_tail(proc_name)}")
            if ready():
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"{name} not ready after {timeout_s:.0f} s: {self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 1500) -> str:
        text = ""
        for path in (self._log(name), self._log(f"{name}.stderr")):
            if path.is_file():
                text += path.read_text(errors="replace")[-chars:]
        return text.strip() or "(no log)"

    def start(self) -> SlurmCluster:
        if sys.platform != "linux":
            raise SlurmUnavailable("the test SLURM needs Linux")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test SLURM runs its daemons as root (SlurmUser=root); not root here")
        install()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._write_config()
            self._start_munge()
            self._start_slurm()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate the daemons this object started (by PID), slurmd first; SIGKILL after 10 s."""
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.processes.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "up":
        sys.exit(__doc__.splitlines()[2].strip())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # kill PID stops the daemons too
    with SlurmCluster(sys.argv[2]) as cluster:
        print(
            f"export SLURM_CONF={cluster.conf}   # node {cluster.node_name}, {cluster.cpus} CPUs; Ctrl-C/kill stops",
            flush=True,
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
