"""Logging set-up shared by the workflow scripts and the command line."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def log_to(path: str | None, level: int = logging.INFO) -> Iterator[object]:
    """Send logging, stderr (progress bars) and child-process output to `path` for the block."""
    if not path:
        logging.basicConfig(level=level, format=FORMAT, force=True)
        yield sys.stderr
        return
    with open(path, "a", encoding="utf-8", buffering=1) as handle:
        logging.basicConfig(level=level, format=FORMAT, stream=handle, force=True)
        with contextlib.redirect_stderr(handle):
            try:
                yield handle
            except BaseException:
                logging.getLogger("groundset").exception("failed")
                raise
