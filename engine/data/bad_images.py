"""Images that cannot be read: one policy wherever they turn up (the folder scan, either loader).

An unreadable image is skipped, counted and named; a run goes on past up to `limit` of them
(`data.max_bad_images`) and stops at one more, with the list. The scan catches most (a truncated
download loses its end marker); a file damaged in the middle, or after the scan, is only found when
a loader decodes it, and is then skipped the same way: the torch loader drops it from its batch, the
DALI loader rebuilds its pipeline without it (see each loader).

Image size follows PIL's decompression-bomb rule on both loaders, with the limit a run sets
(`data.max_image_pixels`, by default PIL's `Image.MAX_IMAGE_PIXELS`; None or 0 = no limit): an image
of more pixels is read, with a note; one of more than twice as many is not decoded at all and counts
as unreadable. The folder scan reads each image's size from its header, before any decoder sees it.

A file name is any the file system gives, bytes that are not UTF-8 included (Python holds those as
surrogates, `os.fsdecode`); `shown` is how messages print it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Callable

from PIL import Image

from ..errors import UserError

_SHOWN = 5  # images named in the error that stops a run
MAX_IMAGE_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS's default (PIL 13: 1024 ** 3 // 4 // 3, a quarter GB of RGB)


def shown(path) -> str:
    """`path` as a message can print it on one line: bytes that are not UTF-8 as \\xNN, line breaks as \\n."""
    text = os.fsencode(path).decode(sys.getfilesystemencoding(), "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r")


def too_many_pixels(width: int, height: int, max_pixels: int | None) -> str | None:
    """Why an image of `width` x `height` is not decoded (more than twice `max_pixels`, PIL's rule), or None."""
    if max_pixels and width * height > 2 * max_pixels:
        return (f"too many pixels: {width} x {height}, more than twice "
                f"data.max_image_pixels={max_pixels}")
    return None


def many_pixels(width: int, height: int, max_pixels: int | None) -> bool:
    """Whether an image of `width` x `height` is above `max_pixels` (read, with a note: PIL's warning)."""
    return bool(max_pixels) and width * height > max_pixels


_pil_lock = threading.Lock()
_pil_users = 0
_pil_limit: int | None = None


@contextlib.contextmanager
def pil_unlimited():
    """PIL's own decompression-bomb check (`PIL.Image.MAX_IMAGE_PIXELS`, a process-wide setting; PIL
    checks on open and on crop) off while this block opens or transforms an image that the run's
    limit judges; put back when the last such block in any thread ends."""
    global _pil_users, _pil_limit
    with _pil_lock:
        if _pil_users == 0:
            _pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _pil_users += 1
    try:
        yield
    finally:
        with _pil_lock:
            _pil_users -= 1
            if _pil_users == 0:
                Image.MAX_IMAGE_PIXELS = _pil_limit


class BadImages:
    """The unreadable images found so far (path -> reason), shared by a run's scans and loaders."""

    def __init__(self, limit: int = 0, say: Callable[[str], None] | None = None,
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
        self.limit = limit
        self.say = say            # where a skipped image found while loading is announced; None = silently
        self.max_pixels = max_pixels or None  # the image-size limit (see above); None = none
        self.found: dict[str, str] = {}

    def __contains__(self, path: str) -> bool:
        return str(path) in self.found

    def __len__(self) -> int:
        return len(self.found)

    def add(self, path, reason: str, announce: bool = True) -> None:
        """Skip `path`: counted once however often it is met; UserError, with the list, past the limit."""
        path = str(path)
        if path in self.found:
            return
        self.found[path] = reason
        if len(self.found) > self.limit:
            listed = "; ".join(f"{shown(p)} ({why})" for p, why in list(self.found.items())[:_SHOWN])
            more = f"; and {len(self.found) - _SHOWN} more" if len(self.found) > _SHOWN else ""
            count = f"{len(self.found)} unreadable image{'s' if len(self.found) > 1 else ''}"
            raise UserError(f"{count}, more than data.max_bad_images={self.limit}: "
                            f"{listed}{more}; replace or remove them, or raise data.max_bad_images")
        if announce and self.say:
            self.say(f"warning: skipped unreadable image {shown(path)} ({reason}); {len(self.found)} of at most "
                     f"{self.limit} (data.max_bad_images)")
