"""The caption stage's error that stops a job (configuration, key, endpoint, auth, its server)."""

from __future__ import annotations


class CaptionError(RuntimeError):
    """A problem that stops the captioning job (configuration, key, endpoint, auth)."""
