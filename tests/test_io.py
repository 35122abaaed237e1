import ast
import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from groundset.core.io import (
    NoSpaceLeftError,
    atomic_save,
    atomic_write,
    clean_json_value,
    dumps_record,
    iter_jsonl,
    write_json,
    write_jsonl,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "groundset"
WORKFLOW_SCRIPTS = SRC.parents[1] / "workflow" / "scripts"
PRIVATE_TEMP = {"mkstemp", "mkdtemp", "NamedTemporaryFile"}


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]  # no temp file left behind
    with atomic_write(target) as handle:
        handle.write("new")
    assert target.read_text() == "new"


def test_atomic_write_removes_what_a_killed_writer_left(tmp_path):
    target = tmp_path / "out.jsonl"
    # a SIGKILL leaves the temp file of the write it cut short
    left = [tmp_path / ".out.jsonl.0badf00d.tmp", tmp_path / ".out.jsonl.12345678.tmp"]
    others = [tmp_path / ".other.jsonl.0badf00d.tmp", tmp_path / ".out.jsonl.note.tmp"]
    for path in left + others:
        path.write_text("partial")
    with atomic_write(target) as handle:
        handle.write("{}\n")
    assert sorted(tmp_path.iterdir()) == sorted([target, *others])  # only its own, stale ones


def test_iter_jsonl_refuses_a_line_that_is_not_a_record(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n[1, 2, 3]\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: not a JSON object"):
        list(iter_jsonl(path))


def test_clean_json_value_maps_nan_to_none():
    assert clean_json_value({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == {
        "a": None,
        "b": [1.0, None],
        "c": "x",
    }


def test_dumps_record_is_strict_utf8_json():
    line = dumps_record({"text": "日落", "x": 1})
    assert "日落" in line and json.loads(line) == {"text": "日落", "x": 1}
    with pytest.raises(ValueError):
        dumps_record({"x": float("nan")})


def test_jsonl_roundtrip_and_bad_line(tmp_path):
    path = tmp_path / "r.jsonl"
    assert write_jsonl(path, ({"i": i} for i in range(3))) == 3
    assert [r["i"] for r in iter_jsonl(path)] == [0, 1, 2]
    path.write_text('{"i": 0}\n\n{broken\n')
    with pytest.raises(ValueError, match=r"r.jsonl:3"):
        list(iter_jsonl(path))


def test_write_json_sorted(tmp_path):
    write_json(tmp_path / "s.json", {"b": 1, "a": float("nan")})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": None, "b": 1}


@pytest.fixture
def umask():
    """Set the process umask for one test; the previous one comes back afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
@pytest.mark.parametrize("mode", ["w", "wb"])
def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path, umask, mask, expected, mode):
    umask(mask)
    with atomic_write(tmp_path / "out", mode) as handle:
        handle.write(b"x" if "b" in mode else "x")
    with open(tmp_path / "plain", mode) as handle:
        pass
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == expected


def test_atomic_writers_never_touch_the_process_umask(tmp_path, umask, monkeypatch):
    # os.umask is process-wide: reading it means setting it, a race with other threads
    umask(0o027)

    def no_umask(_mask):
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", no_umask)
    write_json(tmp_path / "s.json", {"a": 1})
    write_jsonl(tmp_path / "r.jsonl", [{"a": 1}])
    atomic_save(tmp_path / "b.bin", lambda handle: handle.write(b"x"))
    for name in ("s.json", "r.jsonl", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640


def private_temp_calls(path: Path) -> list[str]:
    """Uses of tempfile's private-mode creators (0600 files, 0700 folders) in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_TEMP:
            found.append(f"{node.attr} (line {node.lineno})")
        elif isinstance(node, ast.ImportFrom) and node.module == "tempfile":
            found += [
                f"{a.name} (line {node.lineno})" for a in node.names if a.name in PRIVATE_TEMP
            ]
    return found


def test_no_module_creates_outputs_with_mkstemp():
    # mkstemp / NamedTemporaryFile create 0600 files (mkdtemp 0700 folders) that other users of
    # the shared filesystem cannot read: outputs go through io.atomic_write instead
    offenders = {
        str(path.relative_to(SRC.parents[1])): calls
        for root in (SRC, WORKFLOW_SCRIPTS)
        for path in sorted(root.rglob("*.py"))
        if (calls := private_temp_calls(path))
    }
    assert offenders == {}


def test_atomic_save_says_no_space_left_and_leaves_nothing(tmp_path):
    target = tmp_path / "masks" / "a.npy"

    def full(handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(NoSpaceLeftError) as caught:
        atomic_save(target, full)
    assert str(caught.value) == f"no space left on device writing {target}"
    assert caught.value.errno == errno.ENOSPC
    assert list(target.parent.iterdir()) == []


def test_atomic_write_says_no_space_left_when_the_flush_fails(tmp_path, monkeypatch):
    def full(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(NoSpaceLeftError, match="^no space left on device writing .*r.jsonl$"):
        write_jsonl(tmp_path / "r.jsonl", [{"a": 1}])
    assert list(tmp_path.iterdir()) == []


def test_atomic_save_says_quota_exceeded(tmp_path):
    def over_quota(_handle):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    with pytest.raises(NoSpaceLeftError, match="^disk quota exceeded writing .*q.bin$"):
        atomic_save(tmp_path / "q.bin", over_quota)
    assert list(tmp_path.iterdir()) == []


def test_atomic_save_keeps_other_errors(tmp_path):
    def broken(_handle):
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError, match="I/O error") as caught:
        atomic_save(tmp_path / "a.bin", broken)
    assert not isinstance(caught.value, NoSpaceLeftError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_save_npy_turns_numpy_short_write_into_no_space_left(tmp_path, monkeypatch):
    from groundset.stages import mask

    masks = np.zeros((3, 1024, 1024), dtype=bool)
    real_save = np.save

    def save_onto_a_full_disk(handle, array):
        real_save(handle, array[:0])  # the header and some bytes reach the file
        with open("/dev/full", "wb") as full:  # numpy's own "3145728 requested and 0 written"
            array.tofile(full)

    monkeypatch.setattr(np, "save", save_onto_a_full_disk)
    target = tmp_path / "masks" / "src" / "000.npy"
    with pytest.raises(NoSpaceLeftError) as caught:
        mask.save_npy(target, masks)
    assert str(caught.value) == f"no space left on device writing {target}"
    assert isinstance(caught.value.__cause__, OSError)
    assert "requested and 0 written" in str(caught.value.__cause__)
    assert list(target.parent.iterdir()) == []
    monkeypatch.undo()
    assert mask.save_npy(target, masks) == target.stat().st_size
    assert np.load(target).shape == (3, 1024, 1024)


def test_job_files_come_from_the_rules_outputs_then_params_then_defaults():
    from types import SimpleNamespace

    from snakemake.iocontainers import Namedlist

    from groundset.core.runlog import job_files
    from groundset.stages.mask import MaskChunkFiles

    outputs = {"records": "r.jsonl", "dropped": "d.jsonl", "stats": "s.json", "masks": "m"}
    job = SimpleNamespace(
        output=Namedlist(fromdict=outputs),
        params=Namedlist(fromdict={"journal": "j.jsonl", "settings": {}, "records": "not me"}),
    )
    files = job_files(MaskChunkFiles, job)
    assert files == MaskChunkFiles(**outputs, journal="j.jsonl", store=None)
    with pytest.raises(TypeError, match="journal"):  # a field the rule lacks is an error
        job_files(MaskChunkFiles, SimpleNamespace(output=job.output, params=Namedlist()))


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o027, 0o640)])
def test_stand_in_models_are_readable_as_the_umask_allows(tmp_path, umask, expected):
    """save_pretrained writes safetensors 0600; the stand-ins get the plain mode."""
    from groundset.testing.models import build_stand_in_models

    old = os.umask(umask)
    try:
        paths = build_stand_in_models(tmp_path / "models")
    finally:
        os.umask(old)
    files = [p for path in paths.values() for p in Path(path).rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {expected}


def test_side_files_sit_beside_their_output_whatever_its_name():
    """`layout.beside`: a file's stem, a folder's whole name (source names have dots)."""
    from groundset.core.layout import beside

    assert beside("manifest/s.jsonl", "_dropped.jsonl") == Path("manifest/s_dropped.jsonl")
    folder = "downloads/laion-aesthetics_v2_4.75"
    assert beside(folder, "_dropped.jsonl", folder=True) == Path(f"{folder}_dropped.jsonl")
    assert beside("export/wds", "_stats.json", folder=True) == Path("export/wds_stats.json")
