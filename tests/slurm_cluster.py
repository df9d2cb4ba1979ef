"""A real one-node Slurm cluster on this machine, for the Slurm tests (and a login node in front).

Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and ``munge`` (Slurm 22.05)
run from a ``slurm.conf`` in a temporary folder: their own ports on 127.0.0.1,
their own state, spool, log and pid files there, and a ``munged`` with its own
key and socket (``AuthInfo=socket=...``), so nothing of a system Slurm or munge
is used or changed. Processes are started in the foreground (``-D``) and
stopped by their pid. It runs as root (``SlurmUser=root``), which the test
machine is; no cgroups are needed (``proctrack/linuxproc``, ``task/none``).
"""

import ctypes
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from sandbox import free_port, wait_until

PACKAGES = "slurmctld slurmd slurm-client munge"
#: The CPUs the node offers (this machine has at least 2).
CPUS = 2
NODE = "crimpl-node"
PARTITION = "debug"


def missing_programs() -> list[str]:
    """The programs the cluster needs that are not installed."""
    wanted = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel"]
    return [p for p in wanted if not (shutil.which(p) or Path("/usr/sbin", p).exists())]


def _die_with_parent():
    """Run in the child before exec: SIGTERM it when the test process that started it dies.

    The fixture stops the daemons by pid at the end of the session; this covers a pytest that is
    killed instead (a timeout, Ctrl-C twice), which would otherwise leave them running.
    """
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _program(name):
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """munged, slurmctld and one slurmd with ``CPUS`` CPUs, configured in ``workdir``."""

    def __init__(self, workdir):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge.socket"
        self.processes = {}

    @property
    def env(self) -> dict:
        """What a shell needs to use this cluster's client commands."""
        return {"SLURM_CONF": str(self.conf)}

    def start(self):
        missing = missing_programs()
        if missing:
            raise RuntimeError(f"the Slurm tests need {', '.join(missing)}: "
                               f"apt-get install -y {PACKAGES} (.ci/run does)")
        self._start_munge()
        self._write_conf()
        env = dict(os.environ, **self.env)
        self._spawn("slurmctld", [_program("slurmctld"), "-D", "-c", "-f", str(self.conf)], env)
        wait_until(lambda: self._scontrol_ping(env), timeout=60, interval=0.2, what="slurmctld start")
        self._spawn("slurmd", [_program("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)], env)
        wait_until(lambda: self._node_idle(env), timeout=60, interval=0.2, what="slurmd registration")
        return self

    def _start_munge(self):
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", [
            _program("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={key}", f"--pid-file={self.dir / 'munged.pid'}",
            f"--log-file={self.dir / 'munged.log'}", f"--seed-file={self.dir / 'munged.seed'}",
        ], dict(os.environ))
        wait_until(self.munge_socket.exists, timeout=30, interval=0.1, what="munged start")

    def _write_conf(self):
        host = socket.gethostname().split(".")[0]
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir(exist_ok=True)
        self.conf.write_text(
            "ClusterName=crimpltest\n"
            f"SlurmctldHost={host}(127.0.0.1)\n"
            f"SlurmctldPort={free_port()}\n"
            f"SlurmdPort={free_port()}\n"
            "SlurmUser=root\nSlurmdUser=root\n"
            f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
            f"CredType=cred/munge\n"
            f"StateSaveLocation={d / 'state'}\nSlurmdSpoolDir={d / 'spool'}\n"
            f"SlurmctldPidFile={d / 'slurmctld.pid'}\nSlurmdPidFile={d / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={d / 'slurmctld.log'}\nSlurmdLogFile={d / 'slurmd.log'}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n"
            "MpiDefault=none\nReturnToService=2\nSchedulerType=sched/backfill\n"
            "AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\n"
            "JobCompType=jobcomp/none\n"
            # A job past its walltime ends at once, and a killed one is SIGKILLed 2 s after SIGTERM.
            "OverTimeLimit=0\nKillWait=2\nInactiveLimit=0\n"
            f"NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={CPUS} State=UNKNOWN\n"
            f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP\n",
            encoding="utf-8",
        )

    def _spawn(self, name, argv, env):
        log = open(self.dir / f"{name}.out", "ab")
        self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=env, cwd=self.dir,
                                                start_new_session=True, preexec_fn=_die_with_parent)
        log.close()

    def _check_alive(self):
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.dir / f"{name}.out").read_text(errors="replace").strip().splitlines()[-3:]
                log = self.dir / f"{name}.log"
                if log.exists():
                    tail += log.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"{name} exited ({process.returncode}): {' | '.join(tail)}")

    def _scontrol_ping(self, env):
        self._check_alive()
        result = subprocess.run([_program("scontrol"), "ping"], env=env, capture_output=True, text=True)
        return "is UP" in result.stdout

    def _node_idle(self, env):
        self._check_alive()
        result = subprocess.run([_program("sinfo"), "-h", "-N", "-o", "%T"], env=env,
                                capture_output=True, text=True)
        return result.stdout.strip() == "idle"

    def stop(self):
        """Stop slurmd, slurmctld and munged, by their pids, in that order."""
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
