"""Captioning through the real DashScope and OpenAI SDK clients against the loopback stand-in."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import RANDOM_WEIGHTS, ROOT, fake_vllm, make_images, make_records
from groundset.core.config import ConfigError, section_schema
from groundset.core.io import StalePlanError, iter_jsonl, read_json, write_jsonl
from groundset.stages.caption import (
    INDEX_KEYS,
    OUTPUT_KEYS,
    PREFLIGHT_KEYS,
    PROMPTS,
    TUNING_KEYS,
    CaptionError,
    Dropped,
    Settings,
    caption_chunk,
    gather_chunks,
    index_chunks,
    load_payload,
    make_backend,
    output_settings,
    preflight,
    question_id,
    record_key,
    uses_stand_in,
)
from groundset.stages.caption.backends import fits_budget, sent_size
from groundset.stages.caption.grounding import smart_resize
from groundset.testing.vlm import STAND_IN_KEY, Reply, StandInVLM, image_digest

KEY_ENV = "GROUNDSET_TEST_KEY"


def digest(path: Path) -> str:
    """The id the stand-in logs an image under (RGB JPEGs are sent as they are)."""
    return image_digest(Path(path).read_bytes())


def settings_for(server: StandInVLM, backend: str = "openai", **overrides) -> Settings:
    """Settings pointing the real SDK at the stand-in (key given directly, no environment)."""
    values = {
        "backend": backend,
        "base_url": server.openai_url if backend == "openai" else server.dashscope_url,
        "model": "qwen-vl-max",
        "rate_per_second": None,
        "concurrency": 4,
        "backoff_base_s": 0.01,
        "backoff_cap_s": 0.05,
        "timeout_s": 5,
    }
    values.update(overrides)
    settings = Settings.from_config(values)
    from dataclasses import replace

    return replace(settings, api_key=STAND_IN_KEY)


def run_chunk(tmp: Path, records: Path, settings: Settings, name: str = "out", **kwargs) -> dict:
    """caption_chunk with outputs under tmp/name*."""
    return caption_chunk(
        records,
        tmp / f"{name}.jsonl",
        tmp / f"{name}_errors.jsonl",
        tmp / f"{name}_stats.json",
        tmp / f"{name}.journal.jsonl",
        settings,
        **kwargs,
    )


def ok_count(server: StandInVLM) -> dict[str, int]:
    """Successful (HTTP 200) requests per image digest."""
    counts: dict[str, int] = {}
    for entry in server.log:
        if entry.status == 200:
            counts[entry.image] = counts.get(entry.image, 0) + 1
    return counts


def journaled(path: Path) -> dict[str, dict]:
    """The last journal entry of each key (a later run's entry replaces an earlier one)."""
    return {entry["key"]: entry for entry in iter_jsonl(path)}


def wait_until(condition, timeout: float = 30) -> None:
    """Poll `condition` until it holds (a server thread still finishing a request)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition never held")
        time.sleep(0.02)


# Seconds of loopback delay allowed between a request's limiter slot (or its client-side
# timeout) and the moment the stand-in logs it: server threads share the GIL and 2 loaded cores
# with the client (up to 0.04 s seen under load). The pacing's own allowance for network
# jitter, rate_headroom, is 0.02 s per second of requests.
JITTER = 0.07


@pytest.mark.parametrize("backend", ["dashscope", "openai"])
def test_every_answer_format_through_the_real_sdk(tmp_path, backend):
    images = make_images(tmp_path / "img", [(400, 300)] * 6)
    records = make_records(tmp_path / "in.jsonl", images)
    answers = {
        digest(images[0]): 'Here you go:\n```json\n{"caption": "A red kite over a beach.", '
        '"entities": [{"entity": "kite", "bboxes": [100, 200, 300, 400]}, '
        '{"entity": "beach", "bboxes": [[0, 600, 1000, 1000], [0, 500, 200, 600]]}]}\n```\nHope it helps.',
        digest(images[1]): "A <|object_ref_start|>dog<|object_ref_end|><|box_start|>(100,200),"
        "(500,800)<|box_end|> on grass.",
        digest(images[2]): "<ref>cat</ref><box>(0,0),(1000,500)</box> sleeping",
        digest(images[3]): '{"caption": "Boxes gone wrong.", "entities": [{"entity": "flat", '
        '"bboxes": [10, 10, 10, 500]}, {"entity": "", "bboxes": [1, 2, 3, 4]}, '
        '{"entity": "ok", "bboxes": [1200, -5, 500, 400]}]}',
        digest(images[4]): '{"caption": "cut off',
        digest(images[5]): "",
    }
    with StandInVLM(lambda image, n, proto: Reply(answer=answers[image_digest(image)])) as server:
        stats = run_chunk(tmp_path, tmp_path / "in.jsonl", settings_for(server, backend))
        assert {e.protocol for e in server.log} == {backend}
    out = list(iter_jsonl(tmp_path / "out.jsonl"))
    assert [r["image_id"] for r in out] == [records[i]["image_id"] for i in range(4)]
    assert out[0]["caption"] == "A red kite over a beach."
    assert out[0]["entities"] == [
        {"entity": "kite", "bboxes": [[0.1, 0.2, 0.3, 0.4]]},
        {"entity": "beach", "bboxes": [[0.0, 0.6, 1.0, 1.0], [0.0, 0.5, 0.2, 0.6]]},
    ]
    assert out[0]["text"] == "alt 0" and out[0]["__dj__stats__"] == records[0]["__dj__stats__"]
    assert out[1]["caption"] == "A dog on grass."
    assert out[1]["entities"] == [{"entity": "dog", "bboxes": [[0.1, 0.2, 0.5, 0.8]]}]
    assert out[2]["entities"] == [{"entity": "cat", "bboxes": [[0.0, 0.0, 1.0, 0.5]]}]
    assert out[3]["entities"] == [{"entity": "ok", "bboxes": [[0.5, 0.0, 1.0, 0.4]]}]
    assert out[3]["caption_meta"]["boxes_dropped"] == 3
    assert out[0]["caption_meta"]["backend"] == backend
    errors = {e["image_id"]: e for e in iter_jsonl(tmp_path / "out_errors.jsonl")}
    cut = errors[records[4]["image_id"]]
    assert (cut["drop_stage"], cut["drop_reason"], cut["status"], cut["attempts"]) == (
        "caption", "unparseable_answer", "error", 1,
    )  # fmt: skip
    assert cut["detail"] == "the answer is neither the JSON asked for nor grounding tokens"
    assert cut["answer"] == '{"caption": "cut off'
    assert cut["key"] == record_key(records[4]) and cut["text"] == "alt 4"  # the record, kept
    empty = errors[records[5]["image_id"]]
    assert (empty["drop_reason"], empty["detail"]) == ("empty_answer", "the answer is empty")
    assert stats["stage"] == "caption" and stats["records_in"] == 6
    assert stats["records_out"] == 4 and stats["parse_errors"] == 2
    assert stats["dropped"] == {"empty_answer": 1, "unparseable_answer": 1}
    assert not {"records", "captioned", "error_reasons"} & set(stats)
    assert stats["requested"] == 6 and stats["attempts"] == 6
    assert stats["boxes_dropped"] == {
        "box_invalid_or_degenerate": 1,
        "entity_without_box": 1,
        "entity_without_name": 1,
    }
    assert stats["entities"] == 5 and stats["boxes"] == 6
    assert read_json(tmp_path / "out_stats.json") == stats


@pytest.mark.parametrize("max_pixels", [None, 1003520, 250000])
def test_qwen25_pixel_boxes_use_the_frame_of_the_image_as_sent(tmp_path, max_pixels):
    # Qwen2.5-VL answers pixels of its smart-resized version of the image it RECEIVES: a stand-in
    # that does the same must come back as the left half whatever the budget shrank the image to
    images = make_images(tmp_path / "img", [(2000, 1000)])
    make_records(tmp_path / "in.jsonl", images)
    received = []

    def pixel_answer(image: bytes, count: int, protocol: str) -> Reply:
        with Image.open(io.BytesIO(image)) as sent:
            received.append((sent.format, sent.size))
            h, w = smart_resize(sent.height, sent.width)
        entities = [{"bbox_2d": [0, 0, w // 2, h], "label": "left half"}]
        return Reply(answer=json.dumps({"caption": "Two halves.", "entities": entities}))

    with StandInVLM(pixel_answer) as server:
        settings = settings_for(server, model="qwen2.5-vl-72b-instruct", max_pixels=max_pixels)
        assert settings.convention == "pixels"
        run_chunk(tmp_path, tmp_path / "in.jsonl", settings)
    (record,) = iter_jsonl(tmp_path / "out.jsonl")
    (box,) = record["entities"][0]["bboxes"]
    assert box == pytest.approx([0.0, 0.0, 0.5, 1.0], abs=0.002), box
    assert record["caption_meta"]["convention"] == "pixels"
    ((fmt, size),) = received
    if max_pixels is None:
        assert size == (2000, 1000)
    else:  # shrunk within the budget, aspect kept, as JPEG
        assert fmt == "JPEG" and size[0] * size[1] <= max_pixels
        assert size[0] * size[1] > 0.99 * max_pixels and abs(size[0] / size[1] - 2) < 0.01


def test_unreadable_images_are_dropped_before_any_request(tmp_path):
    images = make_images(tmp_path / "img", [(64, 48)])
    cmyk = tmp_path / "img" / "cmyk.jpg"
    Image.open(images[0]).convert("CMYK").save(cmyk)
    broken = tmp_path / "img" / "broken.jpg"
    broken.write_bytes(Path(images[0]).read_bytes()[:200])
    text = tmp_path / "img" / "text.jpg"
    text.write_text("not an image")
    paths = [images[0], cmyk, broken, text, tmp_path / "img" / "gone.jpg"]
    records = make_records(tmp_path / "in.jsonl", paths)
    with StandInVLM() as server:
        stats = run_chunk(tmp_path, tmp_path / "in.jsonl", settings_for(server))
        sent = len(server.log)
    assert sent == 2  # the RGB JPEG and the CMYK one (sent converted)
    assert [r["image_id"] for r in iter_jsonl(tmp_path / "out.jsonl")] == [
        records[0]["image_id"],
        records[1]["image_id"],
    ]
    errors = {e["image_id"]: e for e in iter_jsonl(tmp_path / "out_errors.jsonl")}
    assert {k: e["drop_reason"] for k, e in errors.items()} == {
        records[2]["image_id"]: "rgb_conversion_failed",
        records[3]["image_id"]: "rgb_conversion_failed",
        records[4]["image_id"]: "image_missing",
    }
    assert all(e["attempts"] == 0 and e["status"] == "dropped" for e in errors.values())
    assert errors[records[3]["image_id"]]["detail"] == (
        f"{text}: UnidentifiedImageError: not a readable image"
    )
    assert errors[records[4]["image_id"]]["detail"].startswith(f"{paths[4]}: ")
    assert stats["not_sent"] == 3 and stats["records_in"] == 5 and stats["records_out"] == 2
    assert stats["dropped"] == {"image_missing": 1, "rgb_conversion_failed": 2}


def test_records_without_an_image_are_counted_drops_and_keys_are_the_shared_ones(tmp_path):
    images = make_images(tmp_path / "img", [(64, 48)] * 2)
    records = make_records(tmp_path / "in.jsonl", images)
    records += [{**records[0], "image_id": "no-list", "image": []},
                {**records[0], "image_id": "no-field", "image": None}]  # fmt: skip
    del records[1]["image_id"]  # keyed by its image path (groundset.core.records.record_key)
    write_jsonl(tmp_path / "in.jsonl", records)
    with StandInVLM() as server:
        stats = run_chunk(tmp_path, tmp_path / "in.jsonl", settings_for(server))
        assert len(server.log) == 2
    assert stats["records_in"] == 4 and stats["records_out"] == 2 and stats["not_sent"] == 2
    assert stats["dropped"] == {"no_image": 2}
    errors = list(iter_jsonl(tmp_path / "out_errors.jsonl"))
    assert [(e["key"], e["status"], e["drop_reason"], e["attempts"]) for e in errors] == [
        ("src/no-list", "dropped", "no_image", 0),
        ("src/no-field", "dropped", "no_image", 0),
    ]
    assert {e["detail"] for e in errors} == {"the record names no image"}
    journal = [json.loads(line) for line in (tmp_path / "out.journal.jsonl").open()]
    assert sorted(e["key"] for e in journal) == sorted([str(images[1]), "src/000000000"])


def test_payload_keeps_rgb_bytes_and_converts_other_modes(tmp_path):
    (jpeg,) = make_images(tmp_path, [(40, 30)])
    payload = load_payload(str(jpeg))
    assert payload.data_url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(payload.data_url.split(",", 1)[1]) == jpeg.read_bytes()
    assert (payload.width, payload.height) == (40, 30)
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (10, 20), (1, 2, 3, 4)).save(rgba)
    payload = load_payload(str(rgba))
    assert payload.data_url.startswith("data:image/png;base64,")
    decoded = Image.open(__import__("io").BytesIO(base64.b64decode(payload.data_url[22:])))
    assert decoded.mode == "RGB" and decoded.size == (10, 20)
    with pytest.raises(Dropped, match="image_missing"):
        load_payload(str(tmp_path / "none.jpg"))


def test_throttling_server_errors_timeouts_and_final_errors(tmp_path):
    images = make_images(tmp_path / "img", [(64, 64)] * 5)
    records = make_records(tmp_path / "in.jsonl", images)
    keys = [record_key(r) for r in records]
    d = [digest(p) for p in images]
    script = {
        d[0]: [Reply(429, code="Throttling.RateQuota", message="Requests rate limit exceeded")] * 2,
        d[1]: [Reply(500, code="InternalError", message="boom")],
        d[2]: [Reply(400, code="DataInspectionFailed", message="inappropriate content")],
        d[3]: [Reply(answer="late", delay=2.0)],
        d[4]: [Reply(502, raw=b"<html>502 Bad Gateway</html>")],  # a proxy's page
    }

    def responder(image, n, protocol):
        replies = script[image_digest(image)]
        return replies[n - 1] if n <= len(replies) else None  # then the placeholder answer

    with StandInVLM(responder) as server:
        settings = settings_for(server, "dashscope", timeout_s=0.5)
        stats = run_chunk(tmp_path, tmp_path / "in.jsonl", settings)
        assert server.counts == {d[0]: 3, d[1]: 2, d[2]: 1, d[3]: 2, d[4]: 2}
        out = [r["image_id"] for r in iter_jsonl(tmp_path / "out.jsonl")]
        assert out == [records[i]["image_id"] for i in (0, 1, 3, 4)]
        (error,) = iter_jsonl(tmp_path / "out_errors.jsonl")
        assert error["image_id"] == records[2]["image_id"] and error["attempts"] == 1
        assert error["code"] == "DataInspectionFailed" and error["http_status"] == 400
        assert error["drop_reason"] == "http_400_DataInspectionFailed"
        assert error["detail"] == "HTTP 400 DataInspectionFailed: inappropriate content"
        assert stats["throttled"] == 2 and stats["retries"] == 5 and stats["attempts"] == 10
        assert stats["api_errors"] == 1 and stats["records_out"] == 4 and stats["requested"] == 5
        assert stats["dropped"] == {"http_400_DataInspectionFailed": 1}
        # each image's journal entry counts its own attempts: retried, answered, or final error
        journal = journaled(tmp_path / "out.journal.jsonl")
        assert {k: (e["status"], e["attempts"]) for k, e in journal.items()} == {
            keys[0]: ("answered", 3),
            keys[1]: ("answered", 2),
            keys[2]: ("error", 1),
            keys[3]: ("answered", 2),
            keys[4]: ("answered", 2),
        }

        # a rerun pays for nothing; --retry-errors asks again for the error record only
        again = run_chunk(tmp_path, tmp_path / "in.jsonl", settings)
        assert again["requested"] == 0 and again["from_journal"] == 5
        # what the journal gave is counted as what was asked: captioned or dropped with a reason
        assert (again["records_in"], again["records_out"], again["dropped"]) == (
            5, 4, {"http_400_DataInspectionFailed": 1},
        )  # fmt: skip
        assert sum(server.counts.values()) == 10
        retried = run_chunk(tmp_path, tmp_path / "in.jsonl", settings, retry_errors=True)
        assert retried["requested"] == 1 and server.counts[d[2]] == 2
        assert retried["records_out"] == 5 and retried["api_errors"] == 0
        assert retried["dropped"] == {}
        assert retried["attempts"] == 1 and retried["from_journal"] == 4
        # the timed-out request is logged once the server has sent its late answer
        wait_until(lambda: len(server.log) == 11)
        paid = ok_count(server)
        late, retry = sorted((e for e in server.log if e.image == d[3]), key=lambda e: e.start)
    # a request that timed out on the client may still be answered (and billed) by the server
    assert paid == {d[0]: 1, d[1]: 1, d[2]: 1, d[3]: 2, d[4]: 1}
    # the client gave up after timeout_s (0.5 s), long before the late answer (2 s): the retry
    # reached the server within timeout_s + the back-off cap (0.05 s) + 0.8 s for a thread
    # stalled on a loaded machine (a client waiting for the answer would retry after 2 s)
    assert late.end - late.start >= 2.0
    assert 0.5 - JITTER <= retry.start - late.start <= 0.5 + 0.05 + 0.8, retry.start - late.start


def test_rate_is_never_exceeded_and_latency_does_not_lower_it(tmp_path):
    images = make_images(tmp_path / "img", [(32, 32)] * 16)
    make_records(tmp_path / "in.jsonl", images)
    with StandInVLM(latency=1.0) as server:
        # 8 in flight: 8/s through a 1 s latency, twice the quota, so only the pacing binds
        settings = settings_for(server, rate_per_second=4.0, rate_headroom=0.02, concurrency=8)
        stats = run_chunk(tmp_path, tmp_path / "in.jsonl", settings)
        starts = np.array(sorted(entry.start for entry in server.log))
        spans = [(entry.start, entry.end) for entry in server.log]
    interval = 1 / (4.0 * (1 - 0.02))  # 0.255 s: the quota less the headroom
    assert stats["requested"] == stats["attempts"] == stats["records_out"] == 16
    assert len(starts) == 16 and set(ok_count(server).values()) == {1}
    # what the server sees: any k + 1 consecutive starts span at least k intervals, less the
    # transport allowance; so no burst, and no window of 1 s holds more than 4 starts
    for k in range(1, len(starts)):
        gaps = starts[k:] - starts[:-k]
        assert gaps.min() >= k * interval - JITTER, (k, np.diff(starts))
    # on average (jitter averages out over the fit) the spacing keeps the headroom: at least
    # half of it, where the bare quota would be 0.250 s
    slope = np.polyfit(np.arange(len(starts)), starts, 1)[0]
    assert slope >= interval * (1 - 0.02 / 2), np.diff(starts)
    # and latency does not lower the rate: 4 requests are at the server at once (1 s / 0.255 s),
    # and the 16 starts take 15 intervals (serial requests would take 15 s); the allowance
    # covers threads stalled on a loaded machine
    assert max(sum(a <= start < b for a, b in spans) for start in starts) >= 4
    assert starts[-1] - starts[0] <= 15 * interval + 1.0, np.diff(starts)


def test_wrong_key_stops_the_job_and_a_dead_endpoint_stops_it_too(tmp_path):
    images = make_images(tmp_path / "img", [(32, 32)] * 6)
    make_records(tmp_path / "in.jsonl", images)
    with (
        StandInVLM(api_key="the-right-key") as server,
        pytest.raises(CaptionError, match="refused the API key"),
    ):
        run_chunk(tmp_path, tmp_path / "in.jsonl", settings_for(server))
    assert not (tmp_path / "out.jsonl").exists()
    journal = tmp_path / "out.journal.jsonl"
    assert not journal.exists() or journal.read_text() == ""
    # an auth refusal is never retried: each image asked at most once (not max_attempts times)
    assert len(server.log) <= 6 and {e.status for e in server.log} <= {401}
    with StandInVLM(lambda *a: Reply(503, code="ServiceUnavailable")) as server:
        settings = settings_for(server, max_attempts=2, max_consecutive_failures=3, concurrency=1)
        with pytest.raises(CaptionError, match="3 images in a row failed"):
            run_chunk(tmp_path, tmp_path / "in.jsonl", settings, retry_errors=True)
        # three images failed max_attempts times each, one after the other (one request on
        # the wire), then it stopped; a fourth, whose payload was ready, may have been on the
        # wire at the stop (at most max_attempts asks, none after it); no other was asked
        asked = dict(server.counts)
    assert sorted(asked.values(), reverse=True)[:3] == [2, 2, 2], asked
    assert len(asked) <= 4 and max(asked.values()) == 2, asked
    assert set(asked) <= {digest(p) for p in images}
    assert not (tmp_path / "out.jsonl").exists()


def test_every_caption_key_is_either_an_output_key_or_a_tuning_knob():
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    properties = schema["properties"]["caption"]["properties"]
    keys = {f"{k}.{sub}" for k in properties for sub in properties[k].get("properties", {})}
    keys |= {k for k in properties if "properties" not in properties[k]}
    groups = [set(OUTPUT_KEYS), set(TUNING_KEYS), set(INDEX_KEYS)]
    assert sum(len(g) for g in groups) == len(set().union(*groups))  # no key in two groups
    # a new caption key must be classified: does it change a chunk's outputs (params) or not?
    assert keys == set().union(*groups), keys ^ set().union(*groups)
    heads = {key.split(".")[0] for key in (*OUTPUT_KEYS, *TUNING_KEYS)}
    assert set(Settings.__dataclass_fields__) - {"api_key", "server_gone"} <= heads
    assert set(PREFLIGHT_KEYS) <= set(OUTPUT_KEYS)  # a new check cuts the chunks again
    section = {"model": "m", "prompt": "p", "keep_ungrounded": True, "concurrency": 3,
               "timeout_s": 7, "rate_per_second": 4, "api_jobs": 2, "input": "x"}  # fmt: skip
    assert set(output_settings(section)) == {"model", "prompt", "keep_ungrounded"}
    assert Settings.for_job(output_settings(section), section, 2) == Settings.from_config(
        section, 2
    )
    assert Settings.for_job(output_settings(section), section, 2).rate_per_second == 2


def test_every_schema_choice_has_its_code_and_a_bad_one_names_the_key():
    from dataclasses import replace

    caption = section_schema("caption")["properties"]
    assert set(PROMPTS) == set(caption["prompt_preset"]["enum"])  # a preset without a prompt
    for backend in caption["backend"]["enum"]:
        settings = Settings.from_config({"backend": backend, "base_url": "http://127.0.0.1:9"})
        assert make_backend(replace(settings, api_key="k")).name == backend
    # the schema checks the choices (no second list here), naming the key
    with pytest.raises(ConfigError, match=r"(?m)^caption\.backend: 'grpc' is not one of"):
        Settings.from_config({"backend": "grpc"})
    with pytest.raises(ConfigError, match=r"(?m)^caption\.prompt_preset: 'short' is not one of"):
        Settings.from_config({"prompt_preset": "short"})
    with pytest.raises(ConfigError, match=r"(?m)^caption\.rate_per_second: 0 is less than"):
        Settings.for_job({}, {"rate_per_second": 0})
    # the chunk index's keys are the workflow's, not a chunk job's settings: accepted, unused
    assert Settings.from_config({"input": "x.jsonl", "chunk_size": 5}) == Settings.from_config({})


def test_preflight_needs_a_key_and_a_reachable_endpoint(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    settings = Settings.from_config({"api_key_env": KEY_ENV, "base_url": "http://127.0.0.1:9"})
    with pytest.raises(CaptionError, match=KEY_ENV):
        preflight(settings)
    monkeypatch.setenv(KEY_ENV, "sk-x")
    with pytest.raises(CaptionError, match="cannot be reached"):
        preflight(settings)
    with StandInVLM() as server:
        seen = preflight(Settings.from_config({"api_key_env": KEY_ENV, "base_url": server.url}))
    assert seen["endpoint"] == server.url and seen["stand_in"] is False
    assert "sk-x" not in json.dumps(seen)
    auto = Settings.from_config({"api_key_env": KEY_ENV, "stand_in": "auto"})
    assert preflight(auto, environ={})["stand_in"] is True
    assert not uses_stand_in(auto, {KEY_ENV: "sk"})
    assert uses_stand_in(Settings.from_config({"stand_in": True}), {KEY_ENV: "sk"})


class _Recorded(Settings):
    """Settings that note every field the code reads (not dataclasses.replace's copying)."""

    def __getattribute__(self, name):
        caller = sys._getframe(1).f_code.co_filename
        if name in Settings.__dataclass_fields__ and not caller.endswith("dataclasses.py"):
            object.__getattribute__(self, "__class__").reads.add(name)
        return super().__getattribute__(name)


def test_preflight_keys_are_exactly_the_output_keys_the_check_reads(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-x")
    _Recorded.reads = set()
    serve = {"command": "python -c pass --port {port}"}
    with StandInVLM() as server:
        branches = [
            {"backend": "openai", "serve": serve},  # a server of the job's own
            {"stand_in": True},  # the stand-in
            {"stand_in": "auto", "api_key_env": "GROUNDSET_UNSET_KEY"},  # no key: the stand-in
            {"backend": "openai", "base_url": server.openai_url},  # a remote endpoint ...
            {"backend": "dashscope", "base_url": server.dashscope_url},
        ]
        for section in branches:
            values = {"api_key_env": KEY_ENV, **section}
            plain = Settings.from_config(values)
            preflight(_Recorded(**{f: getattr(plain, f) for f in Settings.__dataclass_fields__}))
    read = {"serve.command" if name == "serve" else name for name in _Recorded.reads}
    assert read - set(TUNING_KEYS) - {"api_key", "server_gone"} == set(PREFLIGHT_KEYS)
    assert set(PREFLIGHT_KEYS) <= set(OUTPUT_KEYS)


def test_preflight_accepts_the_served_model_name_of_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "PATH", f"{fake_vllm(tmp_path / 'bin').parent}{os.pathsep}{os.environ['PATH']}"
    )
    command = "vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port {port}"
    served = {"backend": "openai", "serve": {"command": command}}
    model = {"model": "Qwen/Qwen2.5-VL-7B-Instruct"}
    job = Settings.for_job(output_settings({**served, **model}), {})
    assert preflight(job)["model"] == model["model"]
    # the rule's params carry the model: a changed model is checked again
    assert caption_preflight_params({**served, **model}) != caption_preflight_params(served)
    with pytest.raises(CaptionError, match=r"caption\.model: 'qwen-vl-max'"):
        preflight(Settings.for_job(caption_preflight_params(served), {}))


def caption_preflight_params(section: dict) -> dict:
    """What rule caption_preflight's params hold for a `caption:` section."""
    from groundset.stages.caption import preflight_settings

    return preflight_settings(section)


def test_refusals_and_prose_are_errors_and_boxless_captions_leave_the_grounded_output(tmp_path):
    images = make_images(tmp_path / "img", [(64, 64)] * 4)
    records = make_records(tmp_path / "in.jsonl", images)
    answers = {
        digest(images[0]): "I'm sorry, but I can't help with that.",
        digest(images[1]): "A quiet lake at dawn.",  # prose, but the seed prompt asks for JSON
        digest(images[2]): '{"caption": "A lake.", "entities": []}',  # no box
        digest(images[3]): '{"caption": "A lake.", "entities": [{"entity": "lake", '
        '"bboxes": [0, 500, 1000, 1000]}]}',
    }
    with StandInVLM(lambda image, n, proto: Reply(answer=answers[image_digest(image)])) as server:
        settings = settings_for(server)
        assert settings.expects_json and not settings.keep_ungrounded
        stats = run_chunk(tmp_path, tmp_path / "in.jsonl", settings)
        assert len(server.log) == 4
        # --retry-errors asks again for the refusal and the prose only, once each
        again = run_chunk(tmp_path, tmp_path / "in.jsonl", settings, retry_errors=True)
        assert len(server.log) == 6 and again["requested"] == 2
    out = list(iter_jsonl(tmp_path / "out.jsonl"))
    assert [r["image_id"] for r in out] == [records[3]["image_id"]]
    errors = {e["image_id"]: e for e in iter_jsonl(tmp_path / "out_errors.jsonl")}
    assert [errors[records[i]["image_id"]]["drop_reason"] for i in range(3)] == [
        "refusal",
        "unparseable_answer",
        "no_valid_box",
    ]
    assert errors[records[0]["image_id"]]["answer"] == "I'm sorry, but I can't help with that."
    assert errors[records[1]["image_id"]]["answer"] == "A quiet lake at dawn."
    assert errors[records[0]["image_id"]]["detail"] == "the model declined to describe the image"
    boxless = errors[records[2]["image_id"]]
    assert (boxless["status"], boxless["caption"]) == ("dropped", "A lake.")
    assert boxless["detail"] == "no entity with a valid box (boxes dropped: none given)"
    assert all(errors[records[i]["image_id"]]["attempts"] == 1 for i in range(3))
    assert stats["records_out"] == 1 and stats["parse_errors"] == 2 and stats["ungrounded"] == 1
    assert stats["dropped"] == {"refusal": 1, "unparseable_answer": 1, "no_valid_box": 1}
    # keep_ungrounded: true keeps the boxless caption (today's behaviour), from the journal
    from dataclasses import replace

    kept = run_chunk(
        tmp_path, tmp_path / "in.jsonl", replace(settings, keep_ungrounded=True), reparse=True
    )
    assert kept["records_out"] == 2 and kept["ungrounded"] == 0 and kept["without_entities"] == 1
    # a prose prompt takes prose as a caption without entities
    prose = run_chunk(
        tmp_path,
        tmp_path / "in.jsonl",
        replace(settings, prompt="Describe the image.", keep_ungrounded=True),
        reparse=True,
    )
    assert prose["requested"] == 0 and prose["records_out"] == 3
    assert prose["dropped"] == {"refusal": 1} and prose["records_in"] == 4


def test_reparse_rebuilds_outputs_from_the_journal_without_requests(tmp_path):
    images = make_images(tmp_path / "img", [(100, 100)] * 3)
    make_records(tmp_path / "in.jsonl", images)
    answer = '{"caption": "c", "entities": [{"entity": "e", "bboxes": [0, 0, 56, 56]}]}'
    with StandInVLM(lambda *a: Reply(answer=answer)) as server:
        settings = settings_for(server)
        run_chunk(tmp_path, tmp_path / "in.jsonl", settings)
    boxes = [r["entities"][0]["bboxes"][0] for r in iter_jsonl(tmp_path / "out.jsonl")]
    assert boxes == [[0.0, 0.0, 0.056, 0.056]] * 3  # read on the 0-1000 grid
    # the server is gone: a reparse with another convention must not need it
    from dataclasses import replace

    stats = run_chunk(
        tmp_path, tmp_path / "in.jsonl", replace(settings, box_convention="pixels"), reparse=True
    )
    assert stats["requested"] == 0 and stats["records_out"] == 3
    assert smart_resize(100, 100) == (112, 112)
    boxes = [r["entities"][0]["bboxes"][0] for r in iter_jsonl(tmp_path / "out.jsonl")]
    assert boxes == [[0.0, 0.0, 0.5, 0.5]] * 3  # pixels of Qwen2.5-VL's 112x112 input


def test_another_prompt_or_model_is_asked_again(tmp_path):
    images = make_images(tmp_path / "img", [(32, 32)] * 2)
    make_records(tmp_path / "in.jsonl", images)

    def answers() -> list[str]:
        """The request id of each caption written (which paid answer it came from)."""
        return [r["caption_meta"]["request_id"] for r in iter_jsonl(tmp_path / "out.jsonl")]

    with StandInVLM() as server:
        settings = settings_for(server)
        run_chunk(tmp_path, tmp_path / "in.jsonl", settings)
        first = answers()
        run_chunk(tmp_path, tmp_path / "in.jsonl", settings)
        assert len(server.log) == 2 and answers() == first
        other = settings_for(server, prompt="Caption this.")
        assert question_id(other) != question_id(settings)
        run_chunk(tmp_path, tmp_path / "in.jsonl", other)
        assert len(server.log) == 4 and not set(answers()) & set(first)
        # and back: the first question's answers are still journaled, nothing is paid again
        stats = run_chunk(tmp_path, tmp_path / "in.jsonl", settings)
        assert len(server.log) == 4 and stats["from_journal"] == 2 and stats["requested"] == 0
        assert answers() == first


def test_an_id_given_to_another_image_by_a_re_download_is_asked_again(tmp_path):
    """img2dataset numbers what it fetched: after a re-download an id can name another image
    (another URL). Its journaled answer belongs to the old image and is not reused."""
    images = make_images(tmp_path / "img", [(32, 32)] * 2)
    records = make_records(tmp_path / "in.jsonl", images)
    for i, record in enumerate(records):
        record["url"] = f"http://example.com/{i}.jpg"
    write_jsonl(tmp_path / "in.jsonl", records)
    with StandInVLM() as server:
        settings = settings_for(server)
        run_chunk(tmp_path, tmp_path / "in.jsonl", settings)
        first = {
            r["image_id"]: r["caption_meta"]["request_id"]
            for r in iter_jsonl(tmp_path / "out.jsonl")
        }
        records[1]["url"] = "http://example.com/other.jpg"  # same id, another image
        write_jsonl(tmp_path / "in.jsonl", records)
        stats = run_chunk(tmp_path, tmp_path / "in.jsonl", settings)
        assert len(server.log) == 3 and stats["requested"] == 1 and stats["from_journal"] == 1
        now = {
            r["image_id"]: r["caption_meta"]["request_id"]
            for r in iter_jsonl(tmp_path / "out.jsonl")
        }
        assert now[records[0]["image_id"]] == first[records[0]["image_id"]]
        assert now[records[1]["image_id"]] != first[records[1]["image_id"]]


def test_chunks_resume_when_the_layout_changes(tmp_path):
    images = make_images(tmp_path / "img", [(32, 32)] * 7)
    make_records(tmp_path / "in.jsonl", images)
    journals = tmp_path / "journal"
    with StandInVLM() as server:
        settings = settings_for(server)
        index = index_chunks(tmp_path / "in.jsonl", tmp_path / "chunks.json", 3, journals)
        assert [c["records"] for c in index["shards"]] == [3, 3, 1]
        for c in index["shards"][:2]:  # chunk 2 never ran
            caption_chunk(
                tmp_path / "in.jsonl", tmp_path / f"c{c['shard']}.jsonl", tmp_path / "e.jsonl",
                tmp_path / "s.json", journals / f"chunk_{c['shard']}.jsonl", settings,
                start=c["start"], end=c["end"],
            )  # fmt: skip
        assert len(server.log) == 6
        index = index_chunks(tmp_path / "in.jsonl", tmp_path / "chunks.json", 2, journals)
        assert len(index["shards"]) == 4
        outputs = []
        for c in index["shards"]:
            name = f"n{c['shard']}"
            caption_chunk(
                tmp_path / "in.jsonl", tmp_path / f"{name}.jsonl", tmp_path / f"{name}_errors.jsonl",
                tmp_path / f"{name}_stats.json", journals / f"chunk_{c['shard']}.jsonl", settings,
                start=c["start"], end=c["end"],
            )  # fmt: skip
            outputs.append(str(tmp_path / f"{name}.jsonl"))
        assert len(server.log) == 7  # only the record no chunk had asked about
    sides = [o.removesuffix(".jsonl") for o in outputs]
    errors, stats = [f"{o}_errors.jsonl" for o in sides], [f"{o}_stats.json" for o in sides]
    total = gather_chunks(
        outputs, errors, stats,
        tmp_path / "all.jsonl", tmp_path / "all_errors.jsonl", tmp_path / "all.json",
    )  # fmt: skip
    assert [r["image_id"] for r in iter_jsonl(tmp_path / "all.jsonl")] == [
        f"{i:09d}" for i in range(7)
    ]
    assert total["chunks"] == 4 and total["records_out"] == 7 and total["from_journal"] == 6
    assert (total["stage"], total["records_in"], total["dropped"]) == ("caption", 7, {})
    assert total == read_json(tmp_path / "all.json")
    assert total["requested"] == 1 and (tmp_path / "all_errors.jsonl").read_text() == ""
    # the gather refuses chunks that are not the index's (a stale plan), naming the problem
    with pytest.raises(StalePlanError, match="got 3 chunk files for the 4 chunks"):
        gather_chunks(outputs[:3], errors[:3], stats[:3], tmp_path / "x.jsonl",
                      tmp_path / "xe.jsonl", tmp_path / "x.json",
                      index=tmp_path / "chunks.json")  # fmt: skip
    # records that leave the input keep their answers (orphans) and get them back on return
    lines = (tmp_path / "in.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "in.jsonl").write_text("".join(lines[:2]))
    index_chunks(tmp_path / "in.jsonl", tmp_path / "chunks.json", 2, journals)
    assert len(list(iter_jsonl(journals / "orphans.jsonl"))) == 5
    (tmp_path / "in.jsonl").write_text("".join(lines))
    index = index_chunks(tmp_path / "in.jsonl", tmp_path / "chunks.json", 2, journals)
    with StandInVLM() as server:
        for c in index["shards"]:
            stats = caption_chunk(
                tmp_path / "in.jsonl", tmp_path / "r.jsonl", tmp_path / "re.jsonl",
                tmp_path / "rs.json", journals / f"chunk_{c['shard']}.jsonl",
                settings_for(server), start=c["start"], end=c["end"],
            )  # fmt: skip
            assert stats["requested"] == 0 and stats["from_journal"] == c["records"]
        assert server.log == []
    assert not (journals / "orphans.jsonl").exists()


def _cli_config(tmp_path: Path, server: StandInVLM, **caption) -> Path:
    config = {
        "sources": [{"name": "src", "url_list": str(tmp_path)}],
        "caption": {
            "backend": "openai",
            "base_url": server.openai_url,
            "api_key_env": KEY_ENV,
            "rate_per_second": None,
            "concurrency": 4,
            **caption,
        },
        **RANDOM_WEIGHTS,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _wait_for_lines(path: Path, lines: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= lines:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {lines} lines")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_job_rerun_pays_once_and_no_key_is_written(tmp_path, sig):
    secret = "sk-groundset-SECRET-0123456789"
    images = make_images(tmp_path / "img", [(48, 48)] * 16)
    make_records(tmp_path / "in.jsonl", images)
    env = {**os.environ, KEY_ENV: secret}
    command = [sys.executable, "-m", "groundset.cli", "caption", "--input",
               str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]  # fmt: skip
    with StandInVLM(latency=0.3, api_key=secret) as server:
        config = _cli_config(tmp_path, server)
        log = open(tmp_path / "first.log", "w")  # noqa: SIM115
        job = subprocess.Popen([*command, "--config", str(config)], env=env, stdout=log, stderr=log)
        _wait_for_lines(tmp_path / "out.journal.jsonl", 5)
        job.send_signal(sig)
        assert job.wait(30) != 0
        log.close()
        assert not (tmp_path / "out.jsonl").exists()
        done = subprocess.run(
            [*command, "--config", str(config), "-v"], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        (tmp_path / "second.log").write_text(done.stdout + done.stderr)
        paid = ok_count(server)
    assert len(list(iter_jsonl(tmp_path / "out.jsonl"))) == 16
    assert set(paid) == {digest(p) for p in images}
    twice = [d for d, n in paid.items() if n > 1]
    if sig == signal.SIGTERM:
        assert twice == []  # in-flight answers were journaled before the job stopped
    else:
        assert len(twice) <= 4  # at most what was in flight (concurrency) when it was killed
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_sigterm_sends_no_new_request_while_threads_wait_for_their_slots(tmp_path):
    images = make_images(tmp_path / "img", [(32, 32)] * 8)
    make_records(tmp_path / "in.jsonl", images)
    command = [sys.executable, "-m", "groundset.cli", "caption", "--input",
               str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]  # fmt: skip
    with StandInVLM(api_key=STAND_IN_KEY) as server:
        # one request per second, four threads: three of them wait for a slot at any time
        config = _cli_config(tmp_path, server, rate_per_second=1.0, concurrency=4)
        env = {**os.environ, KEY_ENV: STAND_IN_KEY}
        job = subprocess.Popen([*command, "--config", str(config)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        _wait_for_lines(tmp_path / "out.journal.jsonl", 2)
        stopped_at = time.monotonic()
        job.send_signal(signal.SIGTERM)
        assert job.wait(30) != 0
        exited_at = time.monotonic()
        late = [e.start - stopped_at for e in server.log if e.start > stopped_at + 0.05]
        asked = len(server.log)
    assert late == []  # the waiting threads gave up their slots: nothing went out after SIGTERM
    assert exited_at - stopped_at < 3  # and the job did not wait for them
    journaled = list(iter_jsonl(tmp_path / "out.journal.jsonl"))
    assert len(journaled) == asked and asked < 8  # every request that went out was journaled


def test_cli_caption_fails_cleanly_without_key(tmp_path, monkeypatch):
    images = make_images(tmp_path / "img", [(32, 32)])
    make_records(tmp_path / "in.jsonl", images)
    with StandInVLM() as server:
        config = _cli_config(tmp_path, server)
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "groundset.cli", "caption", "--config", str(config),
         "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and KEY_ENV in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "img", "in.jsonl"]


def test_a_new_pixel_budget_asks_again_only_for_images_it_sends_otherwise(tmp_path):
    images = make_images(tmp_path / "img", [(64, 48), (2000, 1000), (1200, 800)])
    make_records(tmp_path / "in.jsonl", images)
    small, large, medium = (digest(p) for p in images)  # as sent within every budget below
    with StandInVLM() as server:

        def asked(max_pixels) -> dict:
            before = len(server.log)
            stats = run_chunk(
                tmp_path, tmp_path / "in.jsonl", settings_for(server, max_pixels=max_pixels)
            )
            assert stats["records_out"] == 3
            return {e.image: 1 for e in server.log[before:]}, stats

        first, _ = asked(1003520)  # the large one shrunk, the others as they are
        assert len(first) == 3 and small in first and medium in first and large not in first
        again, stats = asked(1003520)
        assert again == {} and stats["from_journal"] == 3
        shrunk_more, stats = asked(250000)  # medium and large are sent smaller now
        assert len(shrunk_more) == 2 and small not in shrunk_more and stats["from_journal"] == 1
        as_is, stats = asked(None)  # medium went as is under the first budget: its answer fits
        assert set(as_is) == {large} and stats["from_journal"] == 2
        # A -> B -> A: every budget asked before is answered from the journal, not only the last
        for max_pixels in (1003520, 250000, None):
            back, stats = asked(max_pixels)
            assert back == {} and stats["from_journal"] == 3, max_pixels
    journal = list(iter_jsonl(tmp_path / "out.journal.jsonl"))
    sizes = [(e["source_size"], [e["width"], e["height"]], e["max_pixels"]) for e in journal]
    assert ([2000, 1000], [1416, 708], 1003520) in sizes
    assert ([2000, 1000], [2000, 1000], None) in sizes


def test_answers_journaled_before_budgets_count_as_the_image_as_is():
    old = {"status": "answered", "width": 800, "height": 600}  # no source_size, no max_pixels
    assert fits_budget(old, None) and fits_budget(old, 1003520)
    assert not fits_budget(old, 250000)
    assert sent_size(2000, 1000, 1003520) == (1416, 708)
    assert sent_size(2000, 1000, None) == (2000, 1000)
    assert not fits_budget({"status": "error", "max_pixels": None}, 1003520)  # asked again
