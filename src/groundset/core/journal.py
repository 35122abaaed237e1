"""Per-chunk journal of paid answers: appended and fsynced before any output, so nothing is paid twice."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from groundset.core.io import dumps_record

log = logging.getLogger(__name__)


class Journal:
    """Append-only JSONL of finished requests keyed by `key` (the last entry of a key wins).

    With `variant` (a field name, e.g. the question asked), every entry of each key and variant
    is kept too (`all_for`, newest first): switching back to an earlier question, or to an
    earlier form of the same question, finds its answer.
    A line cut short by a kill is ignored (and counted) when the journal is read back.
    """

    def __init__(self, path: str | os.PathLike, variant: str | None = None):
        self.path = Path(path)
        self.variant = variant
        self.entries: dict[str, dict] = {}
        self.variants: dict[tuple[str, object], list[dict]] = {}
        self.torn_lines = 0
        if self.path.exists():
            self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = None

    def _load(self) -> None:
        """Read what earlier runs journaled."""
        with open(self.path, "rb") as handle:
            data = handle.read()
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                self._keep(json.loads(line))
            except (ValueError, KeyError, TypeError):
                self.torn_lines += 1
        if self.torn_lines:
            log.warning(
                "%s: ignored %d incomplete line(s) left by an interrupted run",
                self.path,
                self.torn_lines,
            )
        if data and not data.endswith(b"\n"):
            with open(self.path, "ab") as handle:  # end the torn line so appends start clean
                handle.write(b"\n")

    def _keep(self, entry: dict) -> None:
        """Index one entry (a later entry of the same key replaces the earlier in `done`)."""
        key = str(entry["key"])
        self.entries[key] = entry
        if self.variant is not None:
            self.variants.setdefault((key, entry.get(self.variant)), []).append(entry)

    def __contains__(self, key: str) -> bool:
        return str(key) in self.entries

    def done(self, key: str) -> dict | None:
        """The journaled entry of a key, if any."""
        return self.entries.get(str(key))

    def done_for(self, key: str, variant: object) -> dict | None:
        """The last journaled entry of a key for one value of the journal's variant field, if any."""
        entries = self.variants.get((str(key), variant))
        return entries[-1] if entries else None

    def all_for(self, key: str, variant: object) -> list[dict]:
        """Every journaled entry of a key for one value of the variant field, newest first."""
        return self.variants.get((str(key), variant), [])[::-1]

    def append(self, entries: list[dict]) -> None:
        """Append a batch of entries (each with `key`), flushed and fsynced before returning."""
        if not entries:
            return
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        for entry in entries:
            self._handle.write(dumps_record(entry) + "\n")
            self._keep(entry)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        """Close the journal file."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
