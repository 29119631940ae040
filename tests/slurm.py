"""A real Slurm cluster on this machine for the Slurm tests: Debian's ``munge``, ``slurmctld`` and
two ``slurmd`` (node1, node2: one host, a port each), all on loopback, in a fresh folder per use.

Nothing of the machine's own configuration is used or changed: ``SLURM_CONF`` points every
command at this cluster's ``slurm.conf``, whose ``AuthInfo`` names this cluster's munge socket
(its key made here). Processes are ended by pid, SIGTERM then SIGKILL. Needs root (the daemons
run as root, as ``SlurmUser``); ``slurm_available`` says whether the binaries are installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import free_port, stop

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
START_TIMEOUT_S = 60.0


def slurm_available() -> str | None:
    """None when a cluster can be started here, else why not."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "the test cluster's daemons run as root"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmCluster:
    folder: Path
    conf: Path
    nodes: tuple[str, ...]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        """A Slurm command against this cluster (``env``: the environment it passes on to a job)."""
        return subprocess.run(list(args), env=self.env(env), capture_output=True, text=True, timeout=timeout)

    def job_state(self, job_id: str) -> str:
        """The job's state (PENDING, RUNNING, COMPLETED, ...) as scontrol tells it."""
        out = self.run("scontrol", "show", "job", job_id).stdout
        for token in out.split():
            if token.startswith("JobState="):
                return token.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job_id: str, name: str) -> str:
        out = self.run("scontrol", "show", "job", job_id).stdout
        for token in out.split():
            if token.startswith(f"{name}="):
                return token.split("=", 1)[1]
        return ""


def _conf(folder: Path, socket: Path, ctld_port: int, node_ports: dict[str, int]) -> str:
    nodes = "\n".join(f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname=localhost Port={port} CPUs=1 "
                      "RealMemory=2000 State=UNKNOWN" for name, port in node_ports.items())
    return f"""ClusterName=ftdiff-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={socket},cred_expire=20
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
# After a step's SIGTERM, its tasks get this long before SIGKILL: more than the emergency save.
KillWait=120
JobRequeue=1
# Finished jobs stay visible to scontrol this long (the tests read their final state).
MinJobAge=600
{nodes}
PartitionName=debug Nodes={','.join(node_ports)} Default=YES MaxTime=INFINITE State=UP
"""


@contextmanager
def slurm_cluster(logs_to: Path, nodes: int = 2) -> Iterator[SlurmCluster]:
    """The cluster lives in a short folder of its own (slurmstepd's Unix sockets in the spool
    folder may not exceed 108 characters: pytest's folders can be longer); its logs are copied
    to ``logs_to`` at the end."""
    folder = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    for sub in ("munge", "state", "spool", "log"):
        (folder / sub).mkdir(exist_ok=True)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    socket = folder / "munge" / "munge.socket"
    names = tuple(f"node{i + 1}" for i in range(nodes))
    conf = folder / "slurm.conf"
    conf.write_text(_conf(folder, socket, free_port(), {name: free_port() for name in names}))
    cluster = SlurmCluster(folder, conf, names)
    logs = (folder / "log" / "daemons.out").open("w")
    try:
        # --force: munged refuses to run as root otherwise; our socket and key, nobody else's.
        cluster.procs.append(subprocess.Popen(
            [_binary("munged"), "-F", "--force", f"--socket={socket}", f"--key-file={key}",
             f"--log-file={folder}/log/munged.log", f"--pid-file={folder}/munge/munged.pid",
             f"--seed-file={folder}/munge/munged.seed"], stdout=logs, stderr=subprocess.STDOUT))
        _wait(lambda: socket.exists(), "munged's socket")
        cluster.procs.append(subprocess.Popen([_binary("slurmctld"), "-D", "-i", "-f", str(conf)],
                                              env=cluster.env(), stdout=logs, stderr=subprocess.STDOUT))
        _wait(lambda: cluster.run("scontrol", "ping").returncode == 0, "slurmctld")
        for name in names:
            cluster.procs.append(subprocess.Popen([_binary("slurmd"), "-D", "-N", name, "-f", str(conf)],
                                                  env=cluster.env(), stdout=logs, stderr=subprocess.STDOUT))
        _wait(lambda: cluster.run("sinfo", "-h", "-t", "idle", "-o", "%D").stdout.strip() == str(nodes),
              f"{nodes} idle nodes")
        yield cluster
    finally:
        _end_jobs(cluster)
        for proc in reversed(cluster.procs):
            stop(proc, timeout=10)
        logs.close()
        shutil.copytree(folder / "log", logs_to, dirs_exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


def _end_jobs(cluster: SlurmCluster) -> None:
    """Kill what is still running (a test that failed mid-job) while slurmd can still reach it:
    its steps outlive a stopped slurmd, reparented to init."""
    try:
        jobs = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
        if not jobs:
            return
        cluster.run("scancel", "--full", "--signal=KILL", *jobs)
        cluster.run("scancel", *jobs)
        deadline = time.monotonic() + 20
        while cluster.run("squeue", "-h", "-o", "%i").stdout.split() and time.monotonic() < deadline:
            time.sleep(0.5)
    except (OSError, subprocess.SubprocessError):
        pass  # the controller is gone already: nothing more to ask


def _wait(ready, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"the test Slurm cluster did not start: no {what} after {START_TIMEOUT_S:.0f} s")
