"""Caption jobs that start their own OpenAI-compatible server (caption.serve.command): the
loopback stand-in served as its own process, exactly as a vLLM server would be started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_images, make_records
from groundset.core.io import iter_jsonl
from groundset.stages.caption import CaptionError, Settings, caption_chunk, preflight
from groundset.stages.caption.serve import Server, command_problem, served_name
from groundset.testing.vlm import StandInVLM

STAND_IN = f"{sys.executable} -m groundset.testing.vlm --port {{port}}"


def serve_command(log: Path, *extra: str) -> str:
    """The stand-in as a server command, logging each request with its server's pid."""
    return " ".join([STAND_IN, "--request-log", str(log), *extra])


def settings(command: str, **overrides) -> Settings:
    """Settings of a job that starts its own server with `command`."""
    values = {
        "backend": "openai",
        "model": "stand-in",
        "concurrency": 4,
        "timeout_s": 10,
        "serve": {"command": command, "startup_timeout_s": 60},
        **overrides,
    }
    return Settings.from_config(values)


def run(tmp: Path, records: Path, s: Settings, name: str = "out") -> dict:
    """caption_chunk with outputs (and the server's log) under tmp."""
    return caption_chunk(
        records, tmp / f"{name}.jsonl", tmp / f"{name}_errors.jsonl", tmp / f"{name}_stats.json",
        tmp / f"{name}.journal.jsonl", s, server_log=tmp / f"{name}.server.log",
    )  # fmt: skip


def alive(pid: int) -> bool:
    """Whether a process is running (a zombie waiting for its parent is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def server_pids(log: Path) -> set[int]:
    """The pids of the servers that answered requests (from the stand-in's request log)."""
    return {line["pid"] for line in iter_jsonl(log)} if log.exists() else set()


def started_pids(server_log: Path) -> list[int]:
    """The pids the stand-in announced in its own log (one line per start)."""
    text = server_log.read_text() if server_log.exists() else ""
    return [int(part.split(",")[0]) for part in text.split("(pid ")[1:]]


def start_job(tmp: Path, command: str, concurrency: int) -> subprocess.Popen:
    """A caption job in its own process (stopped by SIGTERM as Snakemake and SLURM stop one)."""
    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from test_serve import run, settings; from groundset.stages.caption import stop_on_sigterm;\n"
        "with stop_on_sigterm(): run(Path(sys.argv[2]), Path(sys.argv[2]) / 'in.jsonl', "
        "settings(sys.argv[3], concurrency=int(sys.argv[4])))"
    )
    return subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent), str(tmp),
                             command, str(concurrency)])  # fmt: skip


def wait_for_requests(requests: Path, job: subprocess.Popen, count: int) -> None:
    """Wait until the server has answered `count` requests (the job must still run)."""
    deadline = time.monotonic() + 60
    while len(list(iter_jsonl(requests)) if requests.exists() else []) < count:
        assert job.poll() is None and time.monotonic() < deadline, "the job never asked"
        time.sleep(0.05)


def test_the_job_starts_its_server_asks_it_and_stops_it(tmp_path):
    make_records(tmp_path / "in.jsonl", make_images(tmp_path / "img", [(64, 48)] * 5))
    requests = tmp_path / "requests.jsonl"
    stats = run(tmp_path, tmp_path / "in.jsonl", settings(serve_command(requests)))
    assert stats["records_out"] == 5 and stats["requested"] == 5
    assert stats["stand_in"] is True  # the served stand-in says so; the run says so too
    (pid,) = server_pids(requests)
    assert started_pids(tmp_path / "out.server.log") == [pid]
    assert not alive(pid)
    # the same captions as a plain base_url run against an in-process stand-in
    with StandInVLM(api_key=None) as plain:
        base = Settings.from_config(
            {"backend": "openai", "model": "stand-in", "base_url": plain.openai_url}
        )
        from dataclasses import replace

        run(tmp_path, tmp_path / "in.jsonl", replace(base, api_key="EMPTY"), name="plain")

    def captions(name):
        return [(r["image_id"], r["caption"], r["entities"]) for r in iter_jsonl(tmp_path / name)]

    assert captions("out.jsonl") == captions("plain.jsonl")
    # a rerun finds every answer journaled: no server is started at all
    again = run(tmp_path, tmp_path / "in.jsonl", settings(serve_command(requests)))
    assert again["from_journal"] == 5 and again["requested"] == 0
    assert started_pids(tmp_path / "out.server.log") == [pid]


def test_a_server_that_exits_at_once_fails_the_job_naming_the_command(tmp_path):
    make_records(tmp_path / "in.jsonl", make_images(tmp_path / "img", [(64, 48)]))
    command = f"{sys.executable} -c 'import sys; print(\"no GPU here\"); sys.exit(3)' {{port}}"
    began = time.monotonic()
    with pytest.raises(CaptionError) as failed:
        run(tmp_path, tmp_path / "in.jsonl", settings(command))
    assert time.monotonic() - began < 30  # not the start-up timeout (60 s)
    message = str(failed.value)
    assert "exited with status 3 before answering" in message
    assert "caption.serve.command" in message and "sys.exit(3)" in message
    assert "no GPU here" in message  # the end of the server's log


def test_a_server_that_never_answers_fails_at_the_startup_timeout(tmp_path):
    make_records(tmp_path / "in.jsonl", make_images(tmp_path / "img", [(64, 48)]))
    command = f"{sys.executable} -c 'import time; time.sleep(600)' {{port}}"
    s = settings(command, serve={"command": command, "startup_timeout_s": 2})
    with pytest.raises(CaptionError, match="did not answer GET /v1/models within 2 s"):
        run(tmp_path, tmp_path / "in.jsonl", s)
    sleepers = subprocess.run(["pgrep", "-f", "time.sleep\\(600\\)"], capture_output=True)
    assert sleepers.stdout.strip() == b"", "the server outlived its job"


def test_a_server_serving_another_model_is_named(tmp_path):
    make_records(tmp_path / "in.jsonl", make_images(tmp_path / "img", [(64, 48)]))
    command = serve_command(tmp_path / "r.jsonl", "--served-model-name", "Qwen/Qwen2-VL-7B")
    with pytest.raises(CaptionError, match=r"serves \['Qwen/Qwen2-VL-7B'\] but caption.model"):
        run(tmp_path, tmp_path / "in.jsonl", settings(command))
    assert not any(alive(pid) for pid in started_pids(tmp_path / "out.server.log"))


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_job_leaves_no_server_and_its_rerun_pays_nothing_twice(tmp_path, how):
    make_records(tmp_path / "in.jsonl", make_images(tmp_path / "img", [(64, 48)] * 12))
    requests = tmp_path / "requests.jsonl"
    command = serve_command(requests, "--latency", "0.5")
    job = start_job(tmp_path, command, concurrency=2)
    wait_for_requests(requests, job, 3)
    (pid,) = started_pids(tmp_path / "out.server.log")
    job.send_signal(how)
    job.wait(30)
    deadline = time.monotonic() + 15  # SIGKILL: the kernel's parent-death signal stops it
    while alive(pid):
        assert time.monotonic() < deadline, f"server {pid} outlived its job ({how.name})"
        time.sleep(0.05)
    paid = {line["image"] for line in iter_jsonl(requests) if line["status"] == 200}
    journal = list(iter_jsonl(tmp_path / "out.journal.jsonl"))
    stats = run(tmp_path, tmp_path / "in.jsonl", settings(serve_command(requests)))
    assert stats["records_out"] == 12
    assert stats["from_journal"] == len(journal) and stats["requested"] == 12 - len(journal)
    asked = [line["image"] for line in iter_jsonl(requests) if line["status"] == 200]
    # images answered and journaled before the kill are never asked again (distinct images)
    journaled_images = len(journal)
    assert len(asked) - len(set(asked)) <= len(paid) - journaled_images


def test_the_preflight_names_a_missing_server_program():
    s = settings("vllm-not-installed serve Qwen/Qwen2-VL-7B-Instruct --port {port}")
    with pytest.raises(CaptionError, match="program 'vllm-not-installed' not found"):
        preflight(s, environ={})
    assert command_problem(f"CUDA_VISIBLE_DEVICES=0 {STAND_IN}") is None
    assert preflight(settings(STAND_IN), environ={})["endpoint"].startswith("servers the jobs")


def test_lists_and_builtins_are_left_to_the_shell_and_the_served_name_is_read():
    assert command_problem("cd /x && vllm-not-here serve m --port {port}") is None
    assert command_problem("module load cuda; vllm-not-here serve m --port {port}") is None
    assert command_problem("source venv/bin/activate&&x --port {port}") is None
    assert "not found" in command_problem("vllm-not-here serve m --port {port}")
    assert served_name("vllm serve Qwen/Qwen2-VL-7B-Instruct --port {port}") == (
        "Qwen/Qwen2-VL-7B-Instruct"
    )
    assert served_name("/opt/bin/vllm serve /m/q --served-model-name qwen --port {port}") == "qwen"
    assert served_name("python -m sglang.launch_server --model-path Q/Q --port {port}") == "Q/Q"
    assert served_name(f"{STAND_IN}") is None
    with pytest.raises(CaptionError, match="caption.model: 'stand-in', but caption.serve.command"):
        preflight(
            settings("cd /tmp && vllm serve Qwen/Qwen2-VL-7B-Instruct --port {port}"), environ={}
        )


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_shell_list_is_served_and_stopped_whole_also_when_its_job_is_killed(tmp_path, how):
    make_records(tmp_path / "in.jsonl", make_images(tmp_path / "img", [(64, 48)] * 8))
    requests = tmp_path / "requests.jsonl"
    command = f"cd {tmp_path} && echo starting;{serve_command(requests, '--latency', '0.5')}"
    job = start_job(tmp_path, command, concurrency=1)
    wait_for_requests(requests, job, 1)
    (pid,) = started_pids(tmp_path / "out.server.log")
    assert "starting" in (tmp_path / "out.server.log").read_text()
    job.send_signal(how)
    job.wait(30)
    deadline = time.monotonic() + 15
    while alive(pid):
        assert time.monotonic() < deadline, f"server {pid} outlived its job ({how.name})"
        time.sleep(0.05)


def test_a_server_started_with_a_key_gets_it_and_a_wrong_key_is_named(tmp_path, monkeypatch):
    make_records(tmp_path / "in.jsonl", make_images(tmp_path / "img", [(64, 48)] * 2))
    command = serve_command(tmp_path / "r.jsonl", "--api-key", "token-abc")
    monkeypatch.setenv("GROUNDSET_SERVE_KEY", "token-abc")
    stats = run(
        tmp_path, tmp_path / "in.jsonl", settings(command, api_key_env="GROUNDSET_SERVE_KEY")
    )
    assert stats["records_out"] == 2
    monkeypatch.setenv("GROUNDSET_SERVE_KEY", "wrong")
    began = time.monotonic()
    with pytest.raises(CaptionError, match=r"refused the key on GET /v1/models \(HTTP 401\)"):
        run(tmp_path, tmp_path / "in.jsonl", settings(command, api_key_env="GROUNDSET_SERVE_KEY"),
            name="wrong")  # fmt: skip
    assert time.monotonic() - began < 30  # at once, not at the start-up timeout


def test_a_chunk_with_nothing_to_send_starts_no_server(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    make_records(tmp_path / "in.jsonl", [broken, tmp_path / "missing.jpg"])
    stats = run(tmp_path, tmp_path / "in.jsonl", settings(serve_command(tmp_path / "r.jsonl")))
    assert stats["not_sent"] == 2 and stats["requested"] == 0
    assert stats["dropped"] == {"image_missing": 1, "rgb_conversion_failed": 1}
    assert not (tmp_path / "out.server.log").exists()
    errors = [
        (e["drop_stage"], e["drop_reason"]) for e in iter_jsonl(tmp_path / "out_errors.jsonl")
    ]
    assert sorted(errors) == [("caption", "image_missing"), ("caption", "rgb_conversion_failed")]


def test_stop_ends_the_whole_process_group(tmp_path):
    # a server that starts a worker of its own (as vLLM's engine core): both go
    command = (
        f"{sys.executable} -c 'import subprocess, sys, time; "
        'subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]); '
        "time.sleep(600)' {port}"
    )
    server = Server(command, tmp_path / "server.log", startup_timeout_s=1).start()
    time.sleep(1.0)
    group = [int(p) for p in subprocess.run(["pgrep", "-g", str(server.process.pid)],
                                            capture_output=True, text=True).stdout.split()]  # fmt: skip
    assert len(group) >= 3, group  # the supervisor, the server, the server's worker
    server.stop(grace_s=5)
    time.sleep(0.2)
    assert not any(alive(pid) for pid in group)
    assert os.getpgid(os.getpid()) != server.process.pid  # the test's own group is untouched


def test_stand_in_cli_answers_as_vllm_does(tmp_path):
    port_log = tmp_path / "requests.jsonl"
    server = Server(serve_command(port_log), tmp_path / "s.log", 30).start()
    try:
        models = server.wait_ready("stand-in")
        assert models[0]["id"] == "stand-in"
    finally:
        server.stop()
    assert json.loads(json.dumps(models))[0]["owned_by"] == "groundset-stand-in"


def test_a_server_that_dies_mid_run_fails_the_job_with_the_reason_and_the_rerun_resumes(tmp_path):
    make_records(tmp_path / "in.jsonl", make_images(tmp_path / "img", [(64, 48)] * 30))
    requests = tmp_path / "requests.jsonl"
    # the stand-in dies (SIGKILL, as an out-of-memory kill would) after a few answers
    command = serve_command(requests, "--latency", "0.2")
    s = settings(command, concurrency=2, max_attempts=50, backoff_base_s=0.5, backoff_cap_s=1)

    def kill_server_after(answers: int) -> None:
        deadline = time.monotonic() + 60
        while len(list(iter_jsonl(requests)) if requests.exists() else []) < answers:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (pid,) = started_pids(tmp_path / "out.server.log")
        os.kill(pid, signal.SIGKILL)

    import threading

    killer = threading.Thread(target=kill_server_after, args=(4,))
    killer.start()
    began = time.monotonic()
    with pytest.raises(
        CaptionError,
        match=r"exited with status 137 \(killed by signal 9\) while answering requests",
    ):
        run(tmp_path, tmp_path / "in.jsonl", s)
    killer.join()
    assert time.monotonic() - began < 30  # not 50 attempts of back-off per image
    journal = list(iter_jsonl(tmp_path / "out.journal.jsonl"))
    assert 4 <= len(journal) < 30
    stats = run(tmp_path, tmp_path / "in.jsonl", settings(serve_command(requests)))
    assert stats["records_out"] == 30 and stats["from_journal"] == len(journal)
