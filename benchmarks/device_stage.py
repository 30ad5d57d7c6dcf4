"""The offline bundle and MNIST in groups that each fit one call of a device tool whose calls carry at
most 64 MiB, the repository's tracked files included (docs/benchmarks.md, "Ray Train on the GPU").

    .venv/bin/python benchmarks/device_stage.py wheelhouse --data gpu-data      # -> gpu-stage/1, 2, ...

Each group is a folder of hard links (first fit, largest file first; the data in group 1), to be
named in one call's `carry`; on the host `cp -l gpu-stage/*/*.whl* gpu-stage/*/manifest.json
gpu-stage/*/SHA256SUMS wheelhouse/` puts the bundle together again. A file larger than a group can
hold is an error naming it: bundle again with a smaller `PART_MIB`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

MIB = 2**20


def tracked_bytes() -> int:
    """What travels with every call anyway: the repository's tracked files."""
    names = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout.split(b"\0")
    return sum(os.path.getsize(n) for n in names if n and os.path.exists(n))


def groups(files: list[Path], room: int, first: int) -> list[list[Path]]:
    """`files` packed into groups of at most `room` bytes, the first already holding `first` bytes."""
    out, used = [[]], [first]
    for f in sorted(files, key=lambda f: -f.stat().st_size):
        size = f.stat().st_size
        if size > room:
            raise SystemExit(f"{f} is {size / MIB:.1f} MiB, more than one call's {room / MIB:.1f} MiB of room: "
                             f"bundle with a smaller PART_MIB")
        i = next((i for i, u in enumerate(used) if u + size <= room), None)
        if i is None:
            out.append([]), used.append(0)
            i = len(out) - 1
        out[i].append(f)
        used[i] += size
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", type=Path, help="a folder that travels in group 1 too (MNIST)")
    p.add_argument("--out", type=Path, default=Path("gpu-stage"))
    p.add_argument("--call-mib", type=float, default=64, help="what one call carries, tracked files included")
    p.add_argument("--margin-mib", type=float, default=2)
    args = p.parse_args()
    tracked = tracked_bytes()
    room = int((args.call_mib - args.margin_mib) * MIB) - tracked
    data = sum(f.stat().st_size for f in args.data.iterdir()) if args.data else 0
    packed = groups([f for f in args.bundle.iterdir() if f.is_file()], room, data)
    shutil.rmtree(args.out, ignore_errors=True)
    for n, group in enumerate(packed, 1):
        folder = args.out / str(n)
        folder.mkdir(parents=True)
        for f in group:
            os.link(f, folder / f.name)
        carry = [str(folder)] + ([str(args.data)] if args.data and n == 1 else [])
        size = sum(f.stat().st_size for f in group) + (data if n == 1 else 0)
        print(f"call {n}: carry {carry}: {len(group)} files, {size / MIB:.1f} MiB")
    print(f"room a call: {room / MIB:.1f} MiB beside {tracked / MIB:.1f} MiB of tracked files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
