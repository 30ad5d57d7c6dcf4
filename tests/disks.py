"""A full file system for the tests of a full disk: a size-limited tmpfs, mounted as root (as CI
runs) where the test says, filled to its last byte, unmounted at the end."""

import errno
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path


def fill(folder: Path) -> Path:
    """A file in `folder` that takes its file system's last byte; deleting it frees the space."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@contextmanager
def full_file_system(folder: Path, size: str = "2m"):
    """A tmpfs of `size` mounted at `folder` (as root, as CI runs) and filled to its last byte by one
    file, which the caller deletes to free the space; unmounted at the end. Yields the filler."""
    folder.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "distnet-test-full", str(folder)], check=True)
    try:
        yield fill(folder)
    finally:
        subprocess.run(["umount", str(folder)], check=True)
