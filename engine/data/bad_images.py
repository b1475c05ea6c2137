"""Images that cannot be read: one policy wherever they turn up (the folder scan, either loader).

An unreadable image is skipped, counted and named; a run goes on past up to `limit` of them
(`data.max_bad_images`) and stops at one more, with the list. The scan catches most (a truncated
download loses its end marker); a file damaged in the middle, or after the scan, is only found when
a loader decodes it, and is then skipped the same way: the torch loader drops it from its batch, the
DALI loader rebuilds its pipeline without it (see each loader).
"""
from __future__ import annotations

from typing import Callable

from ..errors import UserError

_SHOWN = 5  # images named in the error that stops a run


class BadImages:
    """The unreadable images found so far (path -> reason), shared by a run's scans and loaders."""

    def __init__(self, limit: int = 0, say: Callable[[str], None] | None = None) -> None:
        self.limit = limit
        self.say = say            # where a skipped image found while loading is announced; None = silently
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
            listed = "; ".join(f"{p} ({why})" for p, why in list(self.found.items())[:_SHOWN])
            more = f"; and {len(self.found) - _SHOWN} more" if len(self.found) > _SHOWN else ""
            count = f"{len(self.found)} unreadable image{'s' if len(self.found) > 1 else ''}"
            raise UserError(f"{count}, more than data.max_bad_images={self.limit}: "
                            f"{listed}{more}; replace or remove them, or raise data.max_bad_images")
        if announce and self.say:
            self.say(f"warning: skipped unreadable image {path} ({reason}); {len(self.found)} of at most "
                     f"{self.limit} (data.max_bad_images)")
