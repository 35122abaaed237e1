"""`check_exports` recounts the masked JSONL with the exporters' own rules and compares the
images and boxes each export holds, streaming them.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from groundset.core.io import iter_jsonl
from groundset.exports.coco import coco_kept
from groundset.exports.common import PathLike, Skip, category_name, prepare, progress
from groundset.exports.odvg import odvg_phrase
from groundset.exports.wds import image_ext, shard_files, wds_key

# --- checks ---------------------------------------------------------------------------------

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


class _JsonScanner:
    """Values of a JSON document read in chunks: one array item at a time, never the whole."""

    def __init__(self, handle: IO[str], chunk: int = 1 << 20) -> None:
        """A scanner over an open text file, read `chunk` characters at a time."""
        self.handle, self.chunk = handle, chunk
        self.buffer, self.pos, self.eof = "", 0, False

    def _fill(self) -> bool:
        """Read the next chunk into the buffer; False at the end of the file."""
        data = self.handle.read(self.chunk)
        if not data:
            self.eof = True
            return False
        self.buffer = self.buffer[self.pos :] + data
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end)."""
        while True:
            self.pos = _SPACE.match(self.buffer, self.pos).end()
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self._fill():
                return ""

    def take(self, expected: str) -> str:
        """Consume the next character, which must be one of `expected`."""
        char = self.peek()
        if not char or char not in expected:
            raise ValueError(f"expected one of {expected!r}, found {char or 'the end'!r}")
        self.pos += 1
        return char

    def value(self) -> Any:
        """The next JSON value."""
        while True:
            self.peek()
            try:
                value, end = _DECODER.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError:
                if self._fill():
                    continue
                raise
            if end == len(self.buffer) and not self.eof and self._fill():
                continue  # a number may go on in the next chunk
            self.pos = end
            return value

    def object_items(self) -> Iterator[tuple[str, bool, Any]]:
        """(key, is array item, value) of a top-level object, array values item by item."""
        self.take("{")
        if self.peek() == "}":
            return
        while True:
            key = self.value()
            self.take(":")
            if self.peek() == "[":
                self.take("[")
                if self.peek() == "]":
                    self.take("]")
                else:
                    while True:
                        yield key, True, self.value()
                        if self.take(",]") == "]":
                            break
            else:
                yield key, False, self.value()
            if self.take(",}") == "}":
                return


def _expected(masked: PathLike, coco: bool, odvg: bool, wds: bool) -> dict[str, Counter]:
    """What each export should hold, recounted from the masked JSONL by the exports' rules."""
    want = {name: Counter() for name in ("coco", "odvg", "wds")}
    names: set[str] = set()
    for record in progress(iter_jsonl(masked), "check exports"):
        if odvg:
            try:
                item = prepare(record, masks=False)
                want["odvg"]["images"] += 1
                want["odvg"]["boxes"] += sum(bool(odvg_phrase(n)) for n, _ in item.boxes)
            except Skip:
                pass
        if not (coco or wds):
            continue
        try:
            item = prepare(record, masks=True)
        except Skip:
            continue
        if coco:
            kept, _ = coco_kept(item)
            want["coco"]["images"] += 1
            want["coco"]["boxes"] += len(kept)
            names.update(category_name(item.boxes[i][0]) for i in kept)
        if wds:
            try:
                wds_key(record)
                with open(item.image, "rb") as handle:
                    head = handle.read(1 << 16)
            except (Skip, OSError):
                continue
            if image_ext(head) is not None:
                want["wds"]["images"] += 1
                want["wds"]["boxes"] += len(item.boxes)
    want["coco"]["categories"] = len(names)
    return want


def _coco_problems(path: Path, want: Counter) -> list[str]:
    """How a COCO export's images, annotations and categories differ from what is expected."""
    got: Counter = Counter()
    try:
        with open(path, encoding="utf-8") as handle:
            for key, _, _ in _JsonScanner(handle).object_items():
                got[key] += 1
    except (OSError, ValueError) as err:
        return [f"coco {path}: cannot be read: {err}"]
    problems = []
    for section, expected in (("images", want["images"]), ("annotations", want["boxes"]),
                              ("categories", want["categories"])):  # fmt: skip
        if got[section] != expected:
            problems.append(f"coco {path}: {got[section]} {section}, the masked records give "
                            f"{expected}")  # fmt: skip
    return problems


def _odvg_problems(path: Path, want: Counter) -> list[str]:
    """How an ODVG export's lines and regions differ from what is expected, and bad spans."""
    images = regions = bad = 0
    first_bad = None
    try:
        for lineno, line in enumerate(iter_jsonl(path), start=1):
            images += 1
            grounding = line.get("grounding") or {}
            caption = grounding.get("caption") or ""
            for region in grounding.get("regions") or []:
                regions += 1
                phrase = str(region.get("phrase", ""))
                spans = region.get("tokens_positive") or []
                if not spans or any(caption[s:e].lower() != phrase.lower() for s, e in spans):
                    bad += 1
                    first_bad = first_bad or lineno
    except (OSError, ValueError, TypeError, AttributeError) as err:
        return [f"odvg {path}: cannot be read: {err}"]
    problems = []
    if images != want["images"]:
        problems.append(f"odvg {path}: {images} images, the masked records give {want['images']}")
    if regions != want["boxes"]:
        problems.append(f"odvg {path}: {regions} regions, the masked records give {want['boxes']}")
    if bad:
        problems.append(f"odvg {path}: {bad} regions whose tokens_positive do not span their "
                        f"phrase (first on line {first_bad})")  # fmt: skip
    return problems


def _wds_problems(outdir: Path, want: Counter) -> list[str]:
    """How shards' samples and boxes differ from what is expected; samples missing a member."""
    samples = boxes = incomplete = 0
    try:
        for shard in shard_files(outdir):
            members: dict[str, set[str]] = {}
            with tarfile.open(shard, "r|") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if members and key not in members:  # samples are contiguous
                        incomplete += _incomplete(members)
                        members.clear()
                    members.setdefault(key, set()).add(ext)
                    if ext == "json":
                        sample = json.load(tar.extractfile(member))
                        samples += 1
                        boxes += len(sample.get("entities") or [])
            incomplete += _incomplete(members)
    except (OSError, tarfile.TarError, ValueError) as err:
        return [f"webdataset {outdir}: cannot be read: {err}"]
    problems = []
    if samples != want["images"]:
        problems.append(f"webdataset {outdir}: {samples} samples, the masked records give "
                        f"{want['images']}")  # fmt: skip
    if boxes != want["boxes"]:
        problems.append(f"webdataset {outdir}: {boxes} boxes, the masked records give "
                        f"{want['boxes']}")  # fmt: skip
    if incomplete:
        problems.append(f"webdataset {outdir}: {incomplete} samples without both an image "
                        "and a json")  # fmt: skip
    return problems


def _incomplete(members: dict[str, set[str]]) -> int:
    """Samples among `members` ({key: extensions}) that lack the json or the image."""
    return sum(1 for exts in members.values() if "json" not in exts or len(exts) < 2)


def check_exports(
    masked: PathLike,
    coco: PathLike | None = None,
    odvg: PathLike | None = None,
    wds_dir: PathLike | None = None,
) -> list[str]:
    """Problems of exports against their masked JSONL (images, boxes recounted); [] if none."""
    problems = []
    paths = {"coco": coco, "odvg": odvg, "wds": wds_dir}
    for name, path in paths.items():
        if path is None:
            continue
        exists = Path(path).is_dir() if name == "wds" else Path(path).is_file()
        if not exists:
            problems.append(f"{name} export {path} does not exist")
            paths[name] = None
    if not any(paths.values()):
        return problems
    want = _expected(masked, bool(paths["coco"]), bool(paths["odvg"]), bool(paths["wds"]))
    if paths["coco"]:
        problems += _coco_problems(Path(paths["coco"]), want["coco"])
    if paths["odvg"]:
        problems += _odvg_problems(Path(paths["odvg"]), want["odvg"])
    if paths["wds"]:
        problems += _wds_problems(Path(paths["wds"]), want["wds"])
    return problems
