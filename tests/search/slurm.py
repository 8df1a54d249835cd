"""A throwaway one-node SLURM cluster on this machine for the tests that need a real one.

munged, slurmctld and slurmd run as plain processes from a temporary folder (their own
munge key and socket, a ``slurm.conf`` for this host's name, cores and memory, free ports,
no systemd or cgroups: ``proctrack/linuxproc``), and are stopped and removed at the end.
Commands reach it through ``SLURM_CONF``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
#: a job credential's lifetime, and so how long slurmctld holds a requeued job before it may
#: start again (120 s by default): its launch needs a credential newer than the one revoked
#: when the job was killed, and a job started sooner by hand (``scontrol update
#: StartTime=now``) can race that revocation and never run
CRED_EXPIRE_S = 15


def _which(name: str) -> str | None:
    """A program's path, also where ``/usr/sbin`` (the daemons' home) is not on PATH."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return max(1024, total_kb // 1024 - 2048)


def _conf(root: str, host: str) -> str:
    return f"""\
ClusterName=qkvtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket,cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MailProg=/bin/true
InactiveLimit=0
KillWait=5
MinJobAge=2
SchedulerParameters=sched_interval=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def _kill_from_pid_file(path: str) -> None:
    try:
        pid = int(open(path).read().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, 15)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def cluster_state(slurm_env: dict[str, str], tail: int = 3000) -> str:
    """What a failed test shows of the cluster: its jobs, its node and the daemons' logs' tails."""
    env = {**os.environ, **slurm_env}
    root = os.path.dirname(slurm_env["SLURM_CONF"])
    parts = []
    for command in (["scontrol", "show", "job"], ["sinfo", "-N", "-o", "%N %T %E"]):
        shown = subprocess.run(command, capture_output=True, text=True, env=env)
        parts.append(f"$ {' '.join(command)}\n{shown.stdout}{shown.stderr}")
    return "\n".join([*parts, _daemon_logs(root, tail)])


def _daemon_logs(root: str, tail: int) -> str:
    """The last ``tail`` characters of slurmctld's and slurmd's logs."""
    logs = []
    for daemon in ("slurmctld", "slurmd"):
        path = os.path.join(root, f"{daemon}.log")
        if os.path.exists(path):
            logs.append(f"{daemon}.log:\n{open(path).read()[-tail:]}")
    return "\n".join(logs)


def slurm_cluster() -> Iterator[dict[str, str]]:
    """Starts the cluster; yields the environment that reaches it (``SLURM_CONF``); stops it."""
    missing = [name for name in (*DAEMONS, "sbatch", "sinfo") if _which(name) is None]
    if missing:
        if os.environ.get("QKV_REQUIRE_SERVICES"):
            pytest.fail(f"QKV_REQUIRE_SERVICES is set but SLURM is not installed (missing {', '.join(missing)})")
        pytest.skip("SLURM is not installed (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("the throwaway SLURM cluster runs its daemons as root")
    root = tempfile.mkdtemp(prefix="qkv-slurm-")
    for folder in ("state", "spool"):
        os.makedirs(os.path.join(root, folder))
    key = os.path.join(root, "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o600)
    conf = os.path.join(root, "slurm.conf")
    with open(conf, "w") as f:
        f.write(_conf(root, socket.gethostname()))
    env = {**os.environ, "SLURM_CONF": conf}
    try:
        subprocess.run([_which("munged"), "--force", f"--key-file={key}", f"--socket={root}/munge.socket",
                        f"--log-file={root}/munged.log", f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed"],
                       check=True, capture_output=True)
        subprocess.run([_which("slurmctld"), "-f", conf, "-i"], check=True, capture_output=True, env=env)
        subprocess.run([_which("slurmd"), "-f", conf], check=True, capture_output=True, env=env)
        for _ in range(300):
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the SLURM node did not become idle (sinfo: {state!r}); logs:\n{_daemon_logs(root, 1500)}")
        yield {"SLURM_CONF": conf}
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, env=env)
        for daemon in ("slurmd", "slurmctld", "munged"):
            _kill_from_pid_file(os.path.join(root, f"{daemon}.pid"))
        shutil.rmtree(root, ignore_errors=True)
