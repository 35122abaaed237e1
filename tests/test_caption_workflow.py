"""The captioning rules through real Snakemake: global quota, preflight, retry of error records,
which config changes mark chunks stale."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import (
    RANDOM_WEIGHTS,
    ROOT,
    fake_vllm,
    job_counts,
    make_images,
    make_records,
    run_snakemake,
    write_config,
    write_parquet,
)
from groundset.stages.caption import TUNING_KEYS
from groundset.testing.vlm import Reply, StandInVLM, image_digest

pytestmark = pytest.mark.workflow
KEY_ENV = "GROUNDSET_WF_TEST_KEY"
TARGET = "captioned/captioned.jsonl"


def write_caption_config(tmp_path: Path, records: Path, **caption) -> Path:
    """A config whose captioning reads a prepared JSONL (no download/filter needed)."""
    # the URL list is not read (the captions start from `records`), but the plan needs one
    unused = write_parquet(tmp_path / "unused.parquet", [{"URL": "http://x/a.jpg", "TEXT": "t"}])
    config = {
        "workdir": str(tmp_path / "results"),
        "sources": [{"name": "src", "url_list": str(unused), "save_additional_columns": []}],
        "caption": {
            "input": str(records),
            "backend": "openai",
            "api_key_env": KEY_ENV,
            "backoff_base_s": 0.01,
            "backoff_cap_s": 0.05,
            **caption,
        },
        **RANDOM_WEIGHTS,
    }
    return write_config(tmp_path / "config.yaml", config)


def snakemake(config: Path, *extra: str, key: str | None = "sk-wf", check: bool = True):
    env_key = {KEY_ENV: key} if key else {}
    old = {k: os.environ.get(k) for k in (KEY_ENV,)}
    os.environ.pop(KEY_ENV, None)
    os.environ.update(env_key)
    try:
        return run_snakemake(
            ["--profile", str(ROOT / "profiles" / "local"), "--configfile", str(config), *extra],
            check=check,
        )
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_quota_holds_across_parallel_chunk_jobs(tmp_path):
    images = make_images(tmp_path / "img", [(40, 40)] * 12)
    make_records(tmp_path / "in.jsonl", images)
    with StandInVLM(latency=0.5, api_key="sk-wf") as server:
        config = write_caption_config(
            tmp_path, tmp_path / "in.jsonl", base_url=server.openai_url,
            chunk_size=3, rate_per_second=4, api_jobs=2, concurrency=4,
        )  # fmt: skip
        snakemake(config, "--cores", "4", TARGET)
        starts = sorted(entry.start for entry in server.log)
        per_image = dict(server.counts)
    assert sorted(per_image) == sorted(image_digest(p.read_bytes()) for p in images)
    assert set(per_image.values()) == {1}
    work = tmp_path / "results"
    # two chunk jobs at once, each at 2 images/s: the jobs' send slots (wall clock, across
    # processes) never put more than 4 requests in any second ...
    sent = sorted(
        json.loads(line)["sent_at"]
        for path in (work / "captioned" / "journal").glob("chunk_*.jsonl")
        for line in path.open()
    )
    assert len(sent) == 12
    for i in range(len(sent) - 4):
        assert sent[i + 4] - sent[i] >= 1.0 - 1e-3, [round(t - sent[0], 3) for t in sent]
    # ... and the server sees the same (slots are taken in the HTTP transport, right before a
    # request goes out), give or take loopback jitter
    for i in range(len(starts) - 4):
        assert starts[i + 4] - starts[i] >= 1.0 - 0.05, [round(t - starts[0], 2) for t in starts]
    stats = json.loads((work / "captioned" / "caption_stats.json").read_text())
    assert stats["chunks"] == 4 and stats["records_out"] == 12 and stats["requested"] == 12
    assert stats["rate_per_second"] == 2  # each job's share
    # the chunk jobs overlapped in time (two at once), so the share was needed
    spans = []
    for chunk in range(4):
        bench = (work / "benchmarks" / "caption_chunk" / f"{chunk}.tsv").read_text().splitlines()
        spans.append(float(bench[1].split("\t")[0]))
    assert sum(spans) > (starts[-1] - starts[0]) * 1.2
    for path in work.rglob("*"):
        if path.is_file():
            assert b"sk-wf" not in path.read_bytes(), path


def test_missing_key_stops_the_run_before_any_job(tmp_path):
    make_records(tmp_path / "in.jsonl", make_images(tmp_path / "img", [(40, 40)]))
    config = write_caption_config(tmp_path, tmp_path / "in.jsonl", base_url="http://127.0.0.1:9/v1")
    done = snakemake(config, "--cores", "1", TARGET, key=None, check=False)
    assert done.returncode != 0 and KEY_ENV in done.stdout + done.stderr
    assert not (tmp_path / "results" / "captioned").exists()


def test_unreachable_endpoint_fails_the_preflight_and_writes_nothing(tmp_path):
    make_records(tmp_path / "in.jsonl", make_images(tmp_path / "img", [(40, 40)]))
    config = write_caption_config(tmp_path, tmp_path / "in.jsonl", base_url="http://127.0.0.1:9/v1")
    done = snakemake(config, "--cores", "1", TARGET, check=False)
    assert done.returncode != 0
    log = (tmp_path / "results" / "logs" / "caption_preflight.log").read_text()
    assert "http://127.0.0.1:9/v1 cannot be reached" in log
    captioned = tmp_path / "results" / "captioned"
    assert not captioned.exists() or sorted(p.name for p in captioned.iterdir()) == []


def test_retry_errors_asks_again_only_for_error_records(tmp_path):
    images = make_images(tmp_path / "img", [(40, 40)] * 4)
    records = make_records(tmp_path / "in.jsonl", images)
    refused = image_digest(images[2].read_bytes())
    moderation = Reply(400, code="DataInspectionFailed", message="Input data may be inappropriate")

    def responder(image, n, protocol):
        return moderation if image_digest(image) == refused and n == 1 else None

    with StandInVLM(responder, api_key="sk-wf") as server:
        config = write_caption_config(tmp_path, tmp_path / "in.jsonl", base_url=server.openai_url,
                                chunk_size=2, rate_per_second=None)  # fmt: skip
        snakemake(config, "--cores", "2", TARGET)
        work = tmp_path / "results" / "captioned"
        (error,) = [json.loads(line) for line in (work / "errors.jsonl").open()]
        assert (
            error["image_id"] == records[2]["image_id"] and error["code"] == "DataInspectionFailed"
        )
        assert (error["drop_stage"], error["drop_reason"]) == (
            "caption", "http_400_DataInspectionFailed",
        )  # fmt: skip
        assert error["attempts"] == 1 and error["text"] == records[2]["text"]
        assert "Nothing to be done" in snakemake(config, "--cores", "1", TARGET, "-n").stdout
        time.sleep(1)
        retry = ROOT / "config" / "retry_caption_errors.yaml"
        snakemake(config, "--cores", "2", TARGET, "--forcerun", "caption_chunk",
                  "--configfile", str(config), str(retry))  # fmt: skip
        assert sum(server.counts.values()) == 5 and server.counts[refused] == 2
    assert (work / "errors.jsonl").read_text() == ""
    captioned = [json.loads(line)["image_id"] for line in (work / "captioned.jsonl").open()]
    assert captioned == [r["image_id"] for r in records]


def planned(done) -> dict[str, int]:
    """The jobs a dry-run plans, {rule: count} (conftest.job_counts of its output)."""
    return job_counts(done.stdout)


# A new value for each tuning knob (groundset.stages.caption.TUNING_KEYS)
KNOBS = {
    "rate_per_second": 7, "rate_headroom": 0.1, "api_jobs": 3, "concurrency": 2, "timeout_s": 9,
    "max_attempts": 2, "backoff_base_s": 0.02, "backoff_cap_s": 0.5, "max_consecutive_failures": 5,
    "stand_in_latency_s": 0.2, "api_key_env": "GROUNDSET_WF_OTHER_KEY", "retry_errors": True,
    "serve.instances": 3, "serve.gpus": 2, "serve.cpus": 3, "serve.mem_mb": 999,
    "serve.startup_timeout_s": 5,
}  # fmt: skip


def nested(changes: dict) -> dict:
    """Caption keys as the config nests them ("serve.gpus" -> {"serve": {"gpus": ...}})."""
    out: dict = {}
    for key, value in changes.items():
        head, _, sub = key.partition(".")
        if sub:
            out.setdefault(head, {})[sub] = value
        else:
            out[head] = value
    return out


def test_tuning_knobs_mark_no_chunk_stale_and_output_keys_do(tmp_path):
    make_records(tmp_path / "in.jsonl", make_images(tmp_path / "img", [(40, 40)] * 4))
    base = {"stand_in": True, "chunk_size": 2, "rate_per_second": 4}

    def config(**changes) -> Path:
        return write_caption_config(tmp_path, tmp_path / "in.jsonl", **{**base, **nested(changes)})

    # the quota in force reaches the jobs through the config: --resources over caption.api_jobs
    snakemake(config(), "--cores", "2", TARGET, "--resources", "vlm_api=2", key=None)
    work = tmp_path / "results" / "captioned"
    assert json.loads((work / "chunk_0_stats.json").read_text())["rate_per_second"] == 2
    assert json.loads((work / "caption_stats.json").read_text())["records_out"] == 4
    assert set(KNOBS) == set(TUNING_KEYS)
    # every knob changed at once (and the quota), so one dry-run covers them all ...
    done = snakemake(config(**KNOBS), "--cores", "1", TARGET, "-n", "--resources", "vlm_api=5",
                     key=None)  # fmt: skip
    if planned(done):  # ... and only a failure looks for the knobs that mark chunks stale
        stale = [key for key, value in KNOBS.items()
                 if planned(snakemake(config(**{key: value}), "-n", TARGET, key=None))]  # fmt: skip
        raise AssertionError(f"{stale} mark jobs stale: {planned(done)}")
    for key, value in {"keep_ungrounded": True, "prompt": "Caption it as JSON.",
                       "max_tokens": 99, "max_pixels": 5000}.items():  # fmt: skip
        done = snakemake(config(**{key: value}), "--cores", "1", TARGET, "-n", key=None)
        plan = planned(done)
        assert plan.get("caption_chunk") == 2 and "caption_preflight" not in plan, (key, plan)


def readme_own_gpu_caption() -> dict:
    """The `caption:` section of the README's "Captioning on your own GPUs" config."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Captioning on your own GPUs", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(block)["caption"]


def test_the_readmes_own_gpu_config_starts_and_captions(tmp_path, monkeypatch):
    # `vllm` on PATH starts the loopback OpenAI-compatible stand-in under the served name
    bin_dir = fake_vllm(tmp_path / "bin").parent
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    images = make_images(tmp_path / "img", [(1200, 900), (900, 1200)])
    make_records(tmp_path / "in.jsonl", images)
    readme = readme_own_gpu_caption()
    assert readme["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert readme["serve"]["command"].startswith(f"vllm serve {readme['model']} --port {{port}}")
    # what this machine cannot give is scaled down; model, command and backend are the README's
    serve = {**readme["serve"], "instances": 1, "cpus": 1, "mem_mb": 500, "startup_timeout_s": 60}
    caption = {**readme, "chunk_size": 1, "concurrency": 2, "serve": serve, "stand_in": False}
    config = write_caption_config(tmp_path, tmp_path / "in.jsonl", **caption)
    snakemake(config, "--cores", "2", TARGET, key=None)
    work = tmp_path / "results" / "captioned"
    preflight = json.loads((work / "preflight.json").read_text())
    assert preflight["model"] == readme["model"] and preflight["stand_in"] is False
    assert preflight["convention"] == "pixels"  # Qwen2.5-VL's boxes, read from the name
    stats = json.loads((work / "caption_stats.json").read_text())
    assert stats["requested"] == stats["records_out"] == stats["records_in"] == 2, stats
    assert stats["stand_in"] is True  # the stand-in's placeholder answers say so
    logs = sorted((tmp_path / "results" / "logs" / "caption_chunk").glob("*.server.log"))
    assert len(logs) == 2  # one server per chunk job, started by `vllm serve`


def test_servers_started_by_the_workflow_share_the_chunks_and_are_gone_after(tmp_path):
    images = make_images(tmp_path / "img", [(40 + i, 40) for i in range(8)])
    make_records(tmp_path / "in.jsonl", images)
    requests = tmp_path / "requests.jsonl"
    # each job answers for ~3 s (2 images one after the other, 1.5 s each): long enough that
    # the two jobs at once overlap whatever their servers' start-up times
    command = (f"{sys.executable} -m groundset.testing.vlm --port {{port}} --latency 1.5 "
               f"--request-log {requests}")  # fmt: skip
    serve = {"command": command, "instances": 2, "gpus": 0, "cpus": 1, "mem_mb": 500,
             "startup_timeout_s": 60}  # fmt: skip
    config = write_caption_config(tmp_path, tmp_path / "in.jsonl", chunk_size=2, serve=serve,
                            model="stand-in", concurrency=1)  # fmt: skip
    snakemake(config, "--cores", "2", TARGET, key=None)
    work = tmp_path / "results"
    served = [json.loads(line) for line in requests.open()]
    assert sorted(line["image"] for line in served) == sorted(
        image_digest(p.read_bytes()) for p in images
    )  # every image asked once, no quota (rate_per_second 2 would take 4 s) ...
    logs = sorted((work / "logs" / "caption_chunk").glob("*.server.log"))
    pids = {int(part.split(",")[0]) for log in logs for part in log.read_text().split("(pid ")[1:]}
    assert len(logs) == 4 and len(pids) == 4  # ... one server per chunk job, ...
    assert {line["pid"] for line in served} == pids
    overlapping = [
        (a["pid"], b["pid"]) for a in served for b in served
        if a["pid"] != b["pid"] and a["start"] < b["end"] and b["start"] < a["end"]
    ]  # fmt: skip
    assert overlapping, "two servers never answered at the same time (instances: 2)"
    for pid in pids:  # ... and none outlives its job
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    stats = json.loads((work / "captioned" / "caption_stats.json").read_text())
    assert stats["records_out"] == 8 and stats["dropped"] == {}
    # the same captions as a plain base_url run against the stand-in
    (tmp_path / "plain").mkdir()
    with StandInVLM(api_key="sk-wf") as server:
        plain = write_caption_config(tmp_path / "plain", tmp_path / "in.jsonl", chunk_size=2,
                               base_url=server.openai_url, model="stand-in")  # fmt: skip
        snakemake(plain, "--cores", "2", TARGET)

    def captions(root):
        path = root / "results" / "captioned" / "captioned.jsonl"
        return [(r["image_id"], r["caption"], r["entities"]) for r in map(json.loads, path.open())]

    assert captions(tmp_path) == captions(tmp_path / "plain")
