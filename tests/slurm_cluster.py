"""A real single-node SLURM on loopback for the tests: munge, MariaDB + slurmdbd (so `sacct`
works), slurmctld and slurmd, all started here and stopped by PID.

Everything lives in one temporary folder (configs, state, spool, logs, the munge socket and key,
the database) except `/etc/slurm/slurm.conf`, a symlink to this cluster's config that SLURM's
job steps need (they clear SLURM_CONF); it is removed again on stop. Debian's packages are
installed with apt-get when missing.

    python tests/slurm_cluster.py DIR [CPUS]   # start one by hand; Ctrl-C stops it
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "slurmdbd", "munge", "mariadb-server"]
BINARIES = ["slurmctld", "slurmd", "slurmdbd", "sinfo", "sacct", "sacctmgr", "munged", "mariadbd"]
CLUSTER = "groundsetci"
PARTITION = "debug"
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")


class ClusterError(RuntimeError):
    """A daemon did not come up; the message carries the end of its log."""


def ensure_installed() -> float:
    """Install Debian's SLURM, munge and MariaDB when missing; returns the seconds it took."""
    started = time.monotonic()
    if all(shutil.which(name) or Path("/usr/sbin", name).exists() for name in BINARIES):
        return 0.0
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    if not path.exists():
        return f"({path} not written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _wait(
    check, what: str, log: Path, proc: subprocess.Popen | None = None, timeout: float = 60.0
) -> None:
    """Poll `check()` until it is true, else raise with the daemon's log (at once if it exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise ClusterError(f"{what} exited with {proc.returncode}; {log}:\n{_tail(log)}")
        time.sleep(0.25)
    raise ClusterError(f"{what} not up after {timeout:.0f} s; {log}:\n{_tail(log)}")


@contextlib.contextmanager
def _signals_deferred():
    """A second Ctrl-C or SIGTERM must not cut the cleanup short: hold them until it is done."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: held.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])


class SlurmCluster:
    """One node (`localhost`, all CPUs) in partition `debug`, with accounting."""

    def __init__(self, root: str | os.PathLike, cpus: int | None = None, memory_mb: int = 16000):
        self.root = Path(root).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.linked_system_conf = False
        self.conf = self.root / "etc" / "slurm.conf"
        self.setup_seconds = 0.0

    # ----------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """Environment for SLURM clients (sbatch, sacct, snakemake) talking to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(args, env=self.env(), capture_output=True, text=True, check=check)

    def _spawn(self, name: str, args: list[str], **kwargs) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 (the daemon's stdout)
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            start_new_session=True,
            **kwargs,
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    # ----------------------------------------------------------------------------------
    def _write_configs(self) -> None:
        for sub in ("etc", "log", "state", "spool", "run", "db", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o755)
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.db_port, self.dbd_port = free_port(), free_port()
        self.ctld_port, self.slurmd_port = free_port(), free_port()
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        self.conf.write_text(
            f"ClusterName={CLUSTER}\n"
            "SlurmctldHost=localhost(127.0.0.1)\n"
            f"SlurmctldPort={self.ctld_port}\nSlurmdPort={self.slurmd_port}\n"
            "SlurmUser=root\n" + auth + "CredType=cred/munge\n"
            f"StateSaveLocation={self.root / 'state'}\nSlurmdSpoolDir={self.root / 'spool'}\n"
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}\n"
            f"SlurmdPidFile={self.root / 'run' / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}\n"
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\nDefMemPerCPU=1000\n"
            "AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n"
            f"AccountingStoragePort={self.dbd_port}\nAccountingStoragePass={self.munge_socket}\n"
            "AccountingStoreFlags=job_comment\n"  # sacct shows the rule of each job
            "JobAcctGatherType=jobacct_gather/none\nJobCompType=jobcomp/none\n"
            "MpiDefault=none\nReturnToService=2\nMinJobAge=300\nKillWait=5\n"
            "SchedulerParameters=sched_interval=1\n"
            "SlurmdParameters=config_overrides\n"  # the node may offer more CPUs than it has
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN\n"
            f"PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n"
        )
        dbd = self.root / "etc" / "slurmdbd.conf"
        dbd.write_text(
            auth + "DbdHost=localhost\n"
            f"DbdPort={self.dbd_port}\nSlurmUser=root\n"
            f"PidFile={self.root / 'run' / 'slurmdbd.pid'}\nLogFile={self.root / 'log' / 'slurmdbd.log'}\n"
            "StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
            f"StoragePort={self.db_port}\nStorageUser=root\nStorageLoc=slurm_acct_db\n"
        )
        os.chmod(dbd, 0o600)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        os.chmod(key, 0o600)
        proc = self._spawn(
            "munged",
            ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
             f"--key-file={key}", f"--pid-file={self.root / 'run' / 'munged.pid'}",
             f"--seed-file={self.root / 'munge' / 'munge.seed'}",
             f"--log-file={self.root / 'log' / 'munged.log'}"],
        )  # fmt: skip
        _wait(self.munge_socket.exists, "munged", self.root / "log" / "munged.out", proc)

    def _start_mariadb(self) -> None:
        data = self.root / "db"
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            check=True, capture_output=True,
        )  # fmt: skip
        log = self.root / "log" / "mariadb.err"
        proc = self._spawn(
            "mariadbd",
            ["mariadbd", "--no-defaults", f"--datadir={data}", "--user=root",
             "--bind-address=127.0.0.1", f"--port={self.db_port}",
             f"--socket={self.root / 'run' / 'mysqld.sock'}",
             f"--pid-file={self.root / 'run' / 'mariadb.pid'}", f"--log-error={log}",
             "--skip-grant-tables", "--innodb-buffer-pool-size=32M"],
        )  # fmt: skip
        _wait(lambda: self._listening(self.db_port), "mariadbd", log, proc)

    @staticmethod
    def _listening(port: int) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def _node_state(self) -> str:
        done = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return done.stdout.strip()

    def start(self) -> SlurmCluster:
        """Install if needed, write the configs, start every daemon, wait for an idle node."""
        started = time.monotonic()
        self.install_seconds = ensure_installed()
        self._write_configs()
        try:
            self._link_system_conf()
            self._start_munge()
            self._start_mariadb()
            proc = self._spawn("slurmdbd", ["slurmdbd", "-D"])  # slurmdbd.conf beside $SLURM_CONF
            _wait(
                lambda: self._listening(self.dbd_port),
                "slurmdbd",
                self.root / "log" / "slurmdbd.log",
                proc,
            )
            self.run("sacctmgr", "-i", "add", "cluster", CLUSTER, check=False)
            self.run("sacctmgr", "-i", "add", "account", "ci", f"cluster={CLUSTER}", check=False)
            user = pwd.getpwuid(os.getuid()).pw_name
            self.run(
                "sacctmgr",
                "-i",
                "add",
                "user",
                user,
                "account=ci",
                f"cluster={CLUSTER}",
                check=False,
            )
            proc = self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            _wait(
                lambda: self._listening(self.ctld_port),
                "slurmctld",
                self.root / "log" / "slurmctld.log",
                proc,
            )
            proc = self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
            _wait(
                lambda: self._node_state() == "idle",
                "slurmd (node idle)",
                self.root / "log" / "slurmd.log",
                proc,
            )
        except BaseException:
            self.stop()
            raise
        self.setup_seconds = time.monotonic() - started
        return self

    def _link_system_conf(self) -> None:
        """Point /etc/slurm/slurm.conf at this cluster (job steps read it); refuse to clobber a real one."""
        if SYSTEM_CONF.is_symlink() and _left_by_dead_test_cluster(SYSTEM_CONF):
            SYSTEM_CONF.unlink()  # an earlier test cluster was killed before it could remove it
        if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
            raise ClusterError(
                f"{SYSTEM_CONF} exists and is not a stale link of a test cluster: "
                "not overwriting a real SLURM config (or one of a test cluster still running)"
            )
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.symlink_to(self.conf)
        self.linked_system_conf = True

    def stop(self) -> None:
        """Stop every daemon started here (by PID, newest first) and remove the symlink."""
        with _signals_deferred():
            self._stop()

    def _stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self.procs.clear()
        if self.linked_system_conf:
            with contextlib.suppress(FileNotFoundError):
                SYSTEM_CONF.unlink()
            self.linked_system_conf = False

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


DAEMON_PID_FILES = {
    "slurmd": "slurmd.pid",
    "slurmctld": "slurmctld.pid",
    "slurmdbd": "slurmdbd.pid",
    "mariadbd": "mariadb.pid",
    "munged": "munged.pid",
}


def _left_by_dead_test_cluster(link: Path) -> bool:
    """True when the link dangles, or points at a test cluster's config whose owner is gone.

    A test cluster whose pytest was killed (a CI timeout) leaves its daemons running, orphaned
    (parent pid 1): they are stopped here by their pid files, then the link is stale.
    """
    try:
        conf = link.resolve().read_text()
    except OSError:
        return True  # pytest removed the old temp dir, or the target is unreadable
    if f"ClusterName={CLUSTER}\n" not in conf:
        return False  # a real site config behind a symlink: never touched
    run_dir = link.resolve().parent.parent / "run"
    alive = {name: pid for name in DAEMON_PID_FILES if (pid := _daemon_pid(run_dir, name))}
    if any(_parent_pid(pid) not in (0, 1) for pid in alive.values()):
        return False  # its owner still runs: another test session's cluster
    for pid in alive.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return True


def _daemon_pid(run_dir: Path, name: str) -> int | None:
    """The pid in a daemon's pid file when that process is still the named daemon."""
    try:
        pid = int((run_dir / DAEMON_PID_FILES[name]).read_text().strip())
        return pid if Path(f"/proc/{pid}/comm").read_text().strip() == name else None
    except (OSError, ValueError):
        return None


def _parent_pid(pid: int) -> int:
    """A process's parent pid (0 when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _exit_on_sigterm(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so that `stop()` runs."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with SlurmCluster(sys.argv[1], cpus=int(sys.argv[2]) if len(sys.argv) > 2 else None) as cluster:
        print(f"SLURM up in {cluster.setup_seconds:.1f} s: export SLURM_CONF={cluster.conf}")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
