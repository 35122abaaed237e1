"""VLM servers a caption job starts itself: `caption.serve.command` on a free port, health-checked,
stopped with its whole process group.

A job owns one server for its lifetime. The command runs under `groundset.core.supervise`, the leader
of a process group of its own: stopping it reaches every process the command started (the shell,
vLLM and its engine workers), and the supervisor ends that group by itself when the job's
process dies without cleaning up (SIGKILL, the out-of-memory killer). On SLURM, `scancel` ends
the job's cgroup with the server in it. The job talks to its server on loopback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from groundset.stages.caption.errors import CaptionError

log = logging.getLogger(__name__)

PORT_FIELD = "{port}"
STAND_IN_OWNER = "groundset-stand-in"  # `owned_by` of the loopback stand-in's model list
TAIL_LINES = 20  # of the server's log, in the error when it fails to start
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")  # VAR=value before a command


def free_port() -> int:
    """A TCP port nobody listens on at this moment (the kernel's pick on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def render_command(template: str, port: int) -> str:
    """The server command with its port filled in (only `{port}`: JSON braces stay as written)."""
    if PORT_FIELD not in template:
        raise CaptionError(
            f"caption.serve.command must contain {PORT_FIELD} (each job picks a free port): "
            f"{template!r}"
        )
    return template.replace(PORT_FIELD, str(port))


SHELL_WORDS = {"cd", "source", ".", "module", "export", "ml", "conda", "set", "ulimit", "umask"}
SERVED_NAME_OPTIONS = ("--served-model-name", "--model-path", "--model")


def _words(command: str) -> list[str]:
    """The words of a shell command, operators (`&&`, `;`, `|`) as words of their own."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _simple(words: list[str]) -> bool:
    """Whether the words are one simple command (no list, pipe or redirection)."""
    return not any(word and set(word) <= set("&|;<>()") for word in words)


def command_problem(template: str) -> str | None:
    """Why `template` cannot start a server here (a program that is not there), or None; the
    config check has made sure of {port}. Lists (`module load x && vllm serve ...`) and shell
    builtins are left to the shell."""
    try:
        words = _words(template)
    except ValueError as err:
        return f"cannot be parsed as a shell command: {err}"
    if not _simple(words):
        return None
    program = next((w for w in words if not ASSIGNMENT.match(w)), None)  # after VAR=value
    if program is None:
        return "names no program"
    if program in SHELL_WORDS or shutil.which(program) is not None:
        return None
    return (
        f"program {program!r} not found (not on PATH here; install it or give its absolute "
        "path: the jobs run in the workdir)"
    )


def served_name(template: str) -> str | None:
    """The model name a vLLM / SGLang command serves (what requests must carry), if it says:
    `--served-model-name`, else `vllm serve MODEL` / `--model` / `--model-path`."""
    try:
        words = _words(template)
    except ValueError:
        return None
    for option in SERVED_NAME_OPTIONS:
        for i, word in enumerate(words):
            if word == option and i + 1 < len(words):
                return words[i + 1]
            if word.startswith(option + "="):
                return word.split("=", 1)[1]
    for i, word in enumerate(words[:-1]):
        if word == "serve" and i > 0 and words[i - 1].endswith("vllm"):
            model = words[i + 1]
            return None if model.startswith("-") else model
    return None


def _status(code: int) -> str:
    """An exit status as the shell reports it, with the signal behind 128 + N."""
    if code > 128:
        return f"status {code} (killed by signal {code - 128})"
    if code < 0:
        return f"status {128 - code} (killed by signal {-code})"
    return f"status {code}"


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a log file ('' if none)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Server:
    """One server process group started from `command` on a free loopback port."""

    def __init__(
        self,
        template: str,
        log_path: str | os.PathLike,
        startup_timeout_s: float,
        api_key: str | None = None,
    ):
        self.template = template
        self.api_key = api_key  # sent with the health check (a server started with --api-key)
        self.port = free_port()
        self.command = render_command(template, self.port)
        self.log_path = Path(log_path)
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.models: list[dict] = []

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL of the server."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def is_stand_in(self) -> bool:
        """Whether the server is groundset's loopback stand-in (placeholder captions)."""
        return any(m.get("owned_by") == STAND_IN_OWNER for m in self.models)

    def start(self) -> Server:
        """Start the command in its own process group, its output appended to the log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"$ {self.command}\n".encode())
            out.flush()
            self.process = subprocess.Popen(  # noqa: S603 (the user's configured command)
                [sys.executable, "-m", "groundset.core.supervise", "--", self.command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the supervisor leads a group of its own
            )
        log.info("started server pid %d on port %d: %s", self.process.pid, self.port, self.command)
        return self

    def _failure(self, what: str) -> CaptionError:
        """A start-up failure naming the command, with the end of the server's log."""
        tail = _tail(self.log_path)
        return CaptionError(
            f"the caption server {what} (caption.serve.command: {self.command!r}); "
            f"its log {self.log_path} ends:\n{tail or '(empty)'}"
        )

    def wait_ready(self, model: str) -> list[dict]:
        """Poll GET /v1/models until the server answers; fail at once if it exits, or at the
        start-up timeout; fail if it does not serve `model` (the name requests carry)."""
        deadline = time.monotonic() + self.startup_timeout_s
        delay = 0.1
        while True:
            code = self.process.poll()
            if code is not None:
                raise self._failure(f"exited with {_status(code)} before answering")
            request = urllib.request.Request(f"{self.base_url}/models")
            if self.api_key:
                request.add_header("Authorization", f"Bearer {self.api_key}")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                    body = json.loads(response.read() or b"{}")
                break
            except urllib.error.HTTPError as err:
                if err.code in (401, 403):
                    raise self._failure(
                        f"refused the key on GET /v1/models (HTTP {err.code}): export the key the "
                        "server was started with (--api-key) in the variable caption.api_key_env "
                        "names"
                    ) from None
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise self._failure(
                    f"did not answer GET /v1/models within {self.startup_timeout_s:g} s "
                    "(caption.serve.startup_timeout_s)"
                )
            time.sleep(delay)
            delay = min(2.0, delay * 1.5)
        self.models = [m for m in body.get("data", []) if isinstance(m, dict)]
        names = [str(m.get("id")) for m in self.models]
        if model not in names:
            raise self._failure(
                f"serves {names} but caption.model is {model!r} (set caption.model to the "
                "served name, or give the server that name, e.g. vllm --served-model-name)"
            )
        log.info("server pid %d ready on port %d, serving %s", self.process.pid, self.port, names)
        return self.models

    def gone(self) -> str | None:
        """Why the server is no longer there (it exited, with the end of its log), or None."""
        code = self.process.poll() if self.process is not None else None
        if code is None:
            return None
        return str(self._failure(f"exited with {_status(code)} while answering requests"))

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after `grace_s`; its exit status."""
        process = self.process
        if process is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("server pid %d ignored SIGTERM for %g s: SIGKILL", process.pid, grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # children that outlived the leader (same group) go too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        log.info("server pid %d stopped (status %s)", process.pid, process.returncode)
        return process.returncode


@contextlib.contextmanager
def serving(
    template: str,
    model: str,
    log_path: str | os.PathLike,
    startup_timeout_s: float,
    api_key: str | None = None,
) -> Iterator[Server]:
    """A started, ready server for the block; stopped when the block ends, however it ends."""
    server = Server(template, log_path, startup_timeout_s, api_key)
    try:
        server.start()
        server.wait_ready(model)
        yield server
    finally:
        server.stop()
