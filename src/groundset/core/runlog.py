"""What the workflow scripts share: logging set-up (the command line uses it too), job file contracts."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Iterator
from typing import Any, TypeVar

T = TypeVar("T")

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


def job_files(cls: type[T], job: Any) -> T:
    """A job's file contract (a dataclass) from its rule: each field is the output of that name,
    else the param of that name, else the field's default."""
    outputs, params = dict(job.output.items()), dict(job.params.items())  # Namedlists: by name
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in outputs:
            values[field.name] = outputs[field.name]
        elif field.name in params:
            values[field.name] = params[field.name]
    return cls(**values)
