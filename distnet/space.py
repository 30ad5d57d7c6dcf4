"""A full file system under a run's artifacts: the write waits for room and says where and how much,
instead of failing. A failed write would fail the training, whose restart from its checkpoint meets
the same full disk, until Ray Train gives up and the cells are FAILED; waiting costs nothing that
was computed, and the records go in once space is freed."""

from __future__ import annotations

import errno
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
RETRY_EVERY_S = 5.0
INSUFFICIENT_STORAGE = "INSUFFICIENT_STORAGE"  # HTTP 507's name, as MLflow spells its error codes
WAITS = f"the training waits and retries every {RETRY_EVERY_S:g} s until there is room"


@dataclass(frozen=True)
class Full:
    """A write refused for want of space: where it was to go, its size, the room left there."""

    path: str
    needed: int  # bytes
    free: int | None  # bytes free there when it was refused; None where that cannot be read

    def __str__(self) -> str:
        free = "" if self.free is None else f" ({self.free:,} bytes free there)"
        return f"no space left on device for {self.path}: it needs {self.needed:,} bytes{free}"

    def waits(self) -> str:
        """What a writer waiting on it says."""
        return f"{self}; {WAITS}"

    def to_json(self) -> dict:
        """As distnet's tracking server answers a write it has no room for (distnet.server_app)."""
        return {"error_code": INSUFFICIENT_STORAGE, "message": str(self), "path": self.path, "needed": self.needed,
                "free": self.free}

    @classmethod
    def answered(cls, error: BaseException) -> Full | None:
        """The Full a tracking server answered `error` with (an HTTP 507 from distnet.server_app,
        as MLflow's client raises it: a requests.HTTPError), else None."""
        response = getattr(error, "response", None)
        if getattr(response, "status_code", None) != 507:
            return None
        try:
            body = response.json()
            return cls(body["path"], int(body["needed"]), body["free"])
        except (ValueError, KeyError, TypeError):
            return cls(response.url, 0, None)


Notify = Callable[[Full | None], None]  # a Full when a write starts waiting, None once it went in


def is_full(error: BaseException) -> bool:
    """A write refused for want of space here (OSError ENOSPC, EDQUOT)."""
    return isinstance(error, OSError) and error.errno in FULL_ERRNOS


def free_bytes(path: str) -> int | None:
    """Bytes free on the file system that holds `path` (or would: its nearest existing folder)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def waiting(write: Callable[[], T], where: Callable[[], str], needed: int, notify: Notify,
            every: float = RETRY_EVERY_S) -> T:
    """write(); while it fails for want of space, here or on the tracking server, tell `notify` once
    (where: the path it was writing here, asked only then; the server names its own) and retry
    every `every` seconds; once it went in after waiting, notify(None). A write refused for want of
    space leaves nothing behind: MLflow writes an artifact into a temporary file and renames it."""
    told = False
    while True:
        try:
            result = write()
        except OSError as e:  # requests' HTTPError is one too
            full = Full.answered(e)
            if full is None and not is_full(e):
                raise
            if not told:
                if full is None:
                    path = where()
                    full = Full(path, needed, free_bytes(path))
                notify(full)
                told = True
            time.sleep(every)
            continue
        if told:
            notify(None)
        return result


def announce(say: Callable[[str], None], who: str) -> Notify:
    """A Notify that says it: where the write waits, and how long it waited once it went in."""
    since: list[float] = []

    def notify(full: Full | None) -> None:
        if full is not None:
            since.append(time.time())
            say(f"{who}: {full.waits()}")
        else:
            say(f"{who}: room again after {time.time() - since.pop():.0f} s; the records went in")

    return notify
