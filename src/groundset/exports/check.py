"""The export check (`groundset validate`, rule validate_outputs): each export against its own
stats envelope and side file of drops, and against the masked JSONL it was made from.

For each export: its stats are an envelope whose counts add up (`core.stats.read_stats`) with
the export's stage; `records_in` is the number of masked records; the side file holds one drop
line per dropped record, by reason as `dropped` counts them; and the export itself holds
`records_out` images (COCO `images`, ODVG lines, WebDataset samples, Emu3 datalist lines) and
the boxes its stats count (COCO `annotations` and `categories`, ODVG `regions`, WebDataset
`boxes`). ODVG spans are checked against their phrases, WebDataset samples for both an image
and a json. Nothing is re-read from the masks or re-encoded: a masked record is counted by its
line, the exports are streamed (COCO with `ijson`).
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import ijson

from groundset.core.io import iter_jsonl
from groundset.core.layout import COCO, EMU3, ODVG, WEBDATASET
from groundset.core.stats import read_stats
from groundset.exports.common import PathLike, skipped_path, stats_path
from groundset.exports.wds import shard_files

# COCO's top-level arrays as ijson names their items' starts
_COCO_ARRAYS = {"images.item": "images", "annotations.item": "annotations",
                "categories.item": "categories"}  # fmt: skip


def count_records(path: PathLike) -> int:
    """The records of a JSONL file (its non-blank lines; none is parsed)."""
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def drop_reasons(path: PathLike) -> Counter:
    """The `drop_reason` of each line of a side file of drops, counted."""
    return Counter(str(line.get("drop_reason")) for line in iter_jsonl(path))


def envelope_problems(
    name: str, stage: str, stats: PathLike, dropped: PathLike, records: int
) -> tuple[dict | None, list[str]]:
    """An export's stats (None if unreadable) and how they disagree with its stage, the masked
    record count and its side file of drops."""
    try:
        envelope = read_stats(stats)
    except (OSError, ValueError) as err:
        return None, [f"{name} stats {stats}: {err}"]
    problems = []
    if envelope["stage"] != stage:
        problems.append(f"{name} stats {stats}: stage {envelope['stage']!r}, not {stage!r}")
    if envelope["records_in"] != records:
        problems.append(f"{name} stats {stats}: {envelope['records_in']} records in, the masked "
                        f"records are {records}")  # fmt: skip
    try:
        reasons = drop_reasons(dropped)
    except (OSError, ValueError) as err:
        return envelope, [*problems, f"{name} drops {dropped}: cannot be read: {err}"]
    stated = {reason: n for reason, n in envelope["dropped"].items() if n}
    if reasons != stated:
        problems.append(f"{name} drops {dropped}: {dict(reasons)} by reason, its stats say "
                        f"{stated}")  # fmt: skip
    return envelope, problems


def _differences(name: str, path: PathLike, got: dict, want: dict) -> list[str]:
    """One problem per count an export holds otherwise than its stats say."""
    return [
        f"{name} {path}: {got[key]} {key}, its stats say {want[key]}"
        for key in want
        if got[key] != want[key]
    ]


def _coco_problems(path: Path, stats: dict) -> list[str]:
    """How a COCO file's images, annotations and categories differ from its stats."""
    got: Counter = Counter()
    try:
        with open(path, "rb") as handle:
            for prefix, event, _ in ijson.parse(handle):
                if event == "start_map" and prefix in _COCO_ARRAYS:
                    got[_COCO_ARRAYS[prefix]] += 1
    except (OSError, ijson.JSONError) as err:
        return [f"coco {path}: cannot be read: {err}"]
    want = {"images": stats["records_out"], "annotations": stats.get("annotations"),
            "categories": stats.get("categories")}  # fmt: skip
    return _differences("coco", path, got, want)


def _bad_spans(grounding: dict) -> tuple[int, int]:
    """(regions, regions whose tokens_positive do not span their phrase) of an ODVG line."""
    caption = grounding.get("caption") or ""
    regions = grounding.get("regions") or []
    bad = 0
    for region in regions:
        phrase = str(region.get("phrase", ""))
        spans = region.get("tokens_positive") or []
        bad += not spans or any(caption[s:e].lower() != phrase.lower() for s, e in spans)
    return len(regions), bad


def _odvg_problems(path: Path, stats: dict) -> list[str]:
    """How an ODVG file's lines and regions differ from its stats, and regions with bad spans."""
    got: Counter = Counter()
    first_bad = None
    try:
        for lineno, line in enumerate(iter_jsonl(path), start=1):
            regions, bad = _bad_spans(line.get("grounding") or {})
            got.update(images=1, regions=regions, bad=bad)
            first_bad = first_bad or (lineno if bad else None)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        return [f"odvg {path}: cannot be read: {err}"]
    problems = _differences(
        "odvg", path, got, {"images": stats["records_out"], "regions": stats.get("regions")}
    )
    if got["bad"]:
        problems.append(f"odvg {path}: {got['bad']} regions whose tokens_positive do not span "
                        f"their phrase (first on line {first_bad})")  # fmt: skip
    return problems


def _incomplete(members: dict[str, set[str]]) -> int:
    """Samples among `members` ({key: extensions}) that lack the json or the image."""
    return sum(1 for exts in members.values() if "json" not in exts or len(exts) < 2)


def _shard_counts(shard: Path, got: Counter) -> None:
    """Count one shard's samples, boxes and incomplete samples into `got`."""
    members: dict[str, set[str]] = {}
    with tarfile.open(shard, "r|") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if members and key not in members:  # samples are contiguous
                got["incomplete"] += _incomplete(members)
                members.clear()
            members.setdefault(key, set()).add(ext)
            if ext == "json":
                sample = json.load(tar.extractfile(member))
                got["samples"] += 1
                got["boxes"] += len(sample.get("entities") or [])
    got["incomplete"] += _incomplete(members)


def _wds_problems(outdir: Path, stats: dict) -> list[str]:
    """How shards' samples and boxes differ from their stats; samples missing a member."""
    got: Counter = Counter()
    shards = shard_files(outdir)
    try:
        for shard in shards:
            _shard_counts(shard, got)
    except (OSError, tarfile.TarError, ValueError) as err:
        return [f"webdataset {outdir}: cannot be read: {err}"]
    got["shards"] = len(shards)
    want = {"samples": stats["records_out"], "boxes": stats.get("boxes"),
            "shards": stats.get("shards")}  # fmt: skip
    problems = _differences("webdataset", outdir, got, want)
    if got["incomplete"]:
        problems.append(f"webdataset {outdir}: {got['incomplete']} samples without both an "
                        "image and a json")  # fmt: skip
    return problems


def _emu3_problems(datalist: Path, stats: dict) -> list[str]:
    """How the Emu3 datalist's lines differ from its stats."""
    try:
        got = {"lines": count_records(datalist)}
    except OSError as err:
        return [f"emu3 {datalist}: cannot be read: {err}"]
    return _differences("emu3", datalist, got, {"lines": stats["records_out"]})


def emu3_files(datalist: PathLike) -> tuple[Path, Path]:
    """The stats and side file of drops beside an Emu3 datalist (`list/datalist.jsonl`)."""
    datalist = Path(datalist)
    return datalist.parent.parent / "emu3_stats.json", datalist.parent / "error.jsonl"


# export name -> (stage, whether it is a folder, the check of its content against its stats)
_EXPORTS = {
    "coco": (COCO.name, False, _coco_problems),
    "odvg": (ODVG.name, False, _odvg_problems),
    "wds": (WEBDATASET.name, True, _wds_problems),
    "emu3": (EMU3.name, False, _emu3_problems),
}


def check_exports(
    masked: PathLike,
    coco: PathLike | None = None,
    odvg: PathLike | None = None,
    wds_dir: PathLike | None = None,
    emu3: PathLike | None = None,
) -> list[str]:
    """Problems of exports (`emu3`: its datalist) against their stats envelopes, side files of
    drops and the masked JSONL's record count; [] if none."""
    problems: list[str] = []
    records = None
    for name, path in {"coco": coco, "odvg": odvg, "wds": wds_dir, "emu3": emu3}.items():
        if path is None:
            continue
        stage, folder, content = _EXPORTS[name]
        path = Path(path)
        if not (path.is_dir() if folder else path.is_file()):
            problems.append(f"{name} export {path} does not exist")
            continue
        records = count_records(masked) if records is None else records
        stats, dropped = (
            emu3_files(path)
            if name == "emu3"
            else (stats_path(path, folder), skipped_path(path, folder))
        )
        envelope, found = envelope_problems(stage, stage, stats, dropped, records)
        problems += found
        if envelope is not None:
            problems += content(path, envelope)
    return problems
