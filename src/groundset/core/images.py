"""Image files as every stage reads them without decoding: the header's size."""

from __future__ import annotations

import warnings


def image_header_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the image header (any size), or None if unreadable."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return _unguarded_header_size(path)
    except Exception:  # noqa: BLE001 (PIL raises many types for broken files)
        return None


def _unguarded_header_size(path: str) -> tuple[int, int] | None:
    """The header size of an image that `Image.open` refuses as a bomb (the header alone is read)."""
    from PIL import Image

    Image.init()
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(16)
            for name in Image.ID:  # what Image.open does, less its size check
                factory, accept = Image.OPEN[name]
                accepted = not accept or accept(prefix)
                if not accepted or isinstance(accepted, str):
                    continue
                handle.seek(0)
                try:
                    return tuple(factory(handle, path).size)
                except Exception:  # noqa: BLE001 (not this format: try the next)
                    continue
    except OSError:
        return None
    return None
