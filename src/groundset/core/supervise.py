"""Run a shell command as the leader of its own process group, and end the whole group when the
process that started it dies: `python -m groundset.core.supervise -- COMMAND`.

A caption job starts its VLM server through this (groundset.stages.caption.serve). The supervisor asks
the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG: the job was killed with SIGKILL or
by the out-of-memory killer), and on SIGTERM or SIGINT it forwards the signal to its whole group
(the shell, the server, the server's own workers), waits, then SIGKILLs what is left. The command
is run by /bin/sh as written: lists (`module load x && vllm serve ...`), `cd`, variables. Only
the standard library is imported, so the supervisor starts in a few milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

GRACE_S = 25.0  # between SIGTERM to the group and SIGKILL


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent process dies (Linux; elsewhere nothing)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def end_group(signum: int, grace_s: float = GRACE_S) -> None:
    """`signum` to every other process of this group, then SIGKILL after `grace_s` to what is left."""
    group = os.getpgrp()
    for own in (signal.SIGTERM, signal.SIGINT):  # the group signal reaches us too
        signal.signal(own, signal.SIG_IGN)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signum)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _others(group):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-1, os.WNOHANG)  # reap the shell
        time.sleep(0.1)
    for pid in _others(group):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _others(group: int) -> list[int]:
    """The live processes of `group` other than this one (zombies do not count)."""
    me, pids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] not in ("Z", "X"):  # state, ppid, pgrp
            pids.append(int(entry))
    return pids


def main(argv: list[str] | None = None) -> int:
    """Run `argv` (after `--`) with /bin/sh in this group; its exit status, or 128+signal."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m groundset.core.supervise -- COMMAND", file=sys.stderr)
        return 2
    die_with_parent()
    if os.getppid() == 1:  # the parent died before the request took effect
        return 1
    stopped: list[int] = []

    def stop(signum, frame):
        stopped.append(signum)
        end_group(signum)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    child = subprocess.Popen(["/bin/sh", "-c", " ".join(args)])  # noqa: S603 (the user's command)
    code = child.wait()
    end_group(signal.SIGTERM)  # the server's own workers, if the shell left them
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
