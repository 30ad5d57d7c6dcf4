"""An offline bundle: every wheel distnet needs beyond a host's own PyTorch and numpy, in parts small
enough for hosts that take files of at most 60 MiB, and the install from it with no index reachable.

    python -m distnet.offline bundle DIR [--python 3.11 ...] [--platform manylinux_2_28_x86_64]
                                         [--extras report,ui] [--include torch,numpy]
    python -m distnet.offline verify DIR
    python -m distnet.offline install DIR [--venv .venv]      # on the host, with its own python

`bundle` builds distnet's wheel from this checkout, resolves its requirements (the core ones and the
named extras; torch and numpy left to the host unless `--include`d) for each target Python and
platform, pinned to the versions installed where it runs (the ones the tests ran on), and writes
the wheels as parts with a manifest (`manifest.json`: every wheel and part with its size and SHA-256)
and `SHA256SUMS` (for `sha256sum -c`). `install` checks every part, reassembles the wheels, makes a
venv that sees the host's torch (`--system-site-packages`, and the host venv's own site-packages
where the host Python is a venv) and installs into it with `pip --no-index`, then runs
`distnet list`, which imports what a training and a sweep need.

Standard library only, at import too: `install` runs where nothing of distnet's is installed yet.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

PART_BYTES = 60 * 2**20  # what the GPU hosts at hand accept as one file
HOST_PROVIDED = ("torch", "numpy")  # a GPU host's own, built for its CUDA
PYTHONS = ("3.10", "3.11", "3.12", "3.13", "3.14")  # PyTorch 2.13's
PLATFORM = "manylinux_2_28_x86_64"  # glibc 2.28 and newer: RHEL 8, Debian 10, Ubuntu 20.04 on
ROOT = Path(__file__).resolve().parents[1]
MANIFEST, SUMS = "manifest.json", "SHA256SUMS"


class BundleError(Exception):
    """A bundle that cannot be made, checked or installed; the message says which file or package."""


@dataclass(frozen=True)
class Part:
    file: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Wheel:
    file: str
    size: int
    sha256: str
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class Manifest:
    platform: str
    requirements: tuple[str, ...]  # distnet's, as resolved for the bundle
    distnet: str  # distnet's wheel, installed without its dependencies (its torch pin is the host's to keep)
    host_provided: tuple[str, ...]
    sets: dict[str, tuple[str, ...]]  # CPython version -> the wheels pip resolved for it
    # CPython version -> projects whose tested version has no wheel for it (the newest that has one came)
    untested: dict[str, tuple[str, ...]]
    wheels: tuple[Wheel, ...]

    @property
    def pythons(self) -> tuple[str, ...]:
        return tuple(self.sets)

    def pinned(self, python: str) -> list[str]:
        """`project==version` of each wheel resolved for `python`, distnet's aside: what `install`
        asks pip for, so that the host's own copies of them (older, newer) are not taken instead."""
        return sorted(f"{project(f)}=={f.split('-')[1]}" for f in self.sets[python] if f != self.distnet)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        wheels = tuple(Wheel(**{**w, "parts": tuple(Part(**p) for p in w["parts"])}) for w in d.pop("wheels"))
        sets, untested = ({py: tuple(v) for py, v in d.pop(key).items()} for key in ("sets", "untested"))
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}, sets=sets, untested=untested,
                   wheels=wheels)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            h.update(chunk)
    return h.hexdigest()


def normalise(name: str) -> str:
    """A project name as PEP 503 compares them: `Mlflow_Skinny` -> `mlflow-skinny`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project(wheel_file: str) -> str:
    """A wheel's project name, normalised: `PyYAML-6.0-...whl` -> `pyyaml`."""
    return normalise(wheel_file.split("-")[0])


# ---------------------------------------------------------------- parts
def split(wheel: Path, dest: Path, part_bytes: int = PART_BYTES) -> Wheel:
    """`wheel` written into `dest` whole where it fits in a part, else as `<file>.000`, `.001`, ..."""
    size = wheel.stat().st_size
    if size <= part_bytes:
        shutil.copyfile(wheel, dest / wheel.name)
        parts = [dest / wheel.name]
    else:
        parts = []
        with open(wheel, "rb") as f:
            while chunk := f.read(part_bytes):
                parts.append(dest / f"{wheel.name}.{len(parts):03d}")
                parts[-1].write_bytes(chunk)
    return Wheel(wheel.name, size, sha256(wheel), tuple(Part(p.name, p.stat().st_size, sha256(p)) for p in parts))


def read_manifest(bundle: Path) -> Manifest:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: no manifest; is {bundle} a bundle made by `python -m distnet.offline bundle`?")
    return Manifest.from_json(path.read_text())


def verify(bundle: Path) -> Manifest:
    """The bundle's manifest, once every part is there with its size and SHA-256; else a BundleError
    naming each part missing, truncated or altered."""
    manifest = read_manifest(bundle)
    problems = []
    for wheel in manifest.wheels:
        for part in wheel.parts:
            p = Path(bundle) / part.file
            if not p.is_file():
                problems.append(f"{part.file}: missing (part of {wheel.file}, {part.size} bytes)")
            elif (size := p.stat().st_size) != part.size:
                problems.append(f"{part.file}: {size} bytes, the manifest says {part.size} ({'truncated' if size < part.size else 'too long'})")
            elif (digest := sha256(p)) != part.sha256:
                problems.append(f"{part.file}: altered (SHA-256 {digest}, the manifest says {part.sha256})")
    if problems:
        raise BundleError(f"bundle {bundle} is damaged; copy these again:\n  " + "\n  ".join(problems))
    return manifest


def reassemble(bundle: Path, out: Path) -> Manifest:
    """Every wheel of a verified bundle, whole in `out`, each checked against its own SHA-256."""
    manifest = verify(bundle)
    for wheel in manifest.wheels:
        with open(out / wheel.file, "wb") as f:
            for part in wheel.parts:
                with open(Path(bundle) / part.file, "rb") as src:
                    shutil.copyfileobj(src, f)
        if sha256(out / wheel.file) != wheel.sha256:
            raise BundleError(f"{wheel.file}: its parts are right but the whole is not; make the bundle again")
    return manifest


# ---------------------------------------------------------------- making a bundle
def platform_tags(platform: str) -> list[str]:
    """What `pip download --platform` must be told for a glibc floor: pip takes the tags given, not
    the older ones they include (a manylinux_2_28 host runs manylinux2014 wheels: Ray's are)."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    glibc, arch = int(m[1]), m[2]
    tags = [f"manylinux_2_{g}_{arch}" for g in range(glibc, 16, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return tags + [f"{name}_{arch}" for g, name in legacy.items() if g <= glibc]


def requires(distnet_wheel: Path, extras: set[str], include: set[str]) -> list[str]:
    """distnet's requirements from its wheel's metadata: the core ones and those of `extras`, less
    what the host provides (unless included)."""
    with zipfile.ZipFile(distnet_wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req, _, marker = line.removeprefix("Requires-Dist:").strip().partition(";")
        extra = re.fullmatch(r'\s*extra\s*==\s*"([^"]+)"\s*', marker)
        if marker and not extra:
            raise BundleError(f"distnet requires {line}: a marker this bundler does not evaluate")
        name = normalise(re.match(r"[A-Za-z0-9._-]+", req)[0])
        if (extra and extra[1] not in extras) or name == "distnet" or (name in HOST_PROVIDED and name not in include):
            continue
        out.append(req.strip())
    return out


def pins(exclude: set[str]) -> dict[str, str]:
    """name -> `name==version` of every distribution where this runs (distnet's test environment),
    as constraints: a bundle holds the versions the tests ran on."""
    found = {}
    for d in metadata.distributions():
        name = normalise(d.metadata["Name"] or "")
        if name and name not in exclude and "+" not in d.version:
            found[name] = f"{name}=={d.version}"
    return found


def missing(pip_said: str) -> list[str]:
    """The projects pip found no wheel of, from what it said."""
    names = re.findall(r"No matching distribution found for ([A-Za-z0-9._-]+)", pip_said)
    block = re.search(r"no matching distributions available for your environment:\n((?:    \S+\n)+)", pip_said)
    return [normalise(n) for n in names + (block[1].split() if block else [])]


def pip(*args: str, offline: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env=offline_env() if offline else None)


def resolve(py: str, platform: str, reqs: list[str], pinned: dict[str, str], into: Path,
            find_links: list[str] = ()) -> list[str]:
    """The wheels of `reqs` for CPython `py` into `into`, at the `pinned` versions; where one of those
    has no wheel for this Python (pandas 3 and SQLAlchemy 2.1 have none for 3.10), resolved afresh
    without the pins (the newest versions that have wheels: letting go of one pin at a time sends
    pip's backtracking too deep). Returns the projects not at their pinned version; a requirement
    with no wheel at all is a BundleError naming it."""
    source = ["--no-index", *[a for d in find_links for a in ("--find-links", str(d))]] if find_links else []
    constraints = into.parent / f"constraints-{py}.txt"
    for pins_held in (pinned, {}):
        constraints.write_text("".join(f"{pin}\n" for pin in pins_held.values()))
        got = pip("download", "--only-binary=:all:", "--python-version", py, "--implementation", "cp",
                  "--abi", "cp" + py.replace(".", ""), *[a for tag in platform_tags(platform) for a in ("--platform", tag)],
                  "-c", str(constraints), "-d", str(into), *source, *reqs, offline=bool(find_links))
        if not got.returncode:
            got_versions = {project(w.name): w.name.split("-")[1] for w in into.glob("*.whl")}
            return sorted(n for n, v in got_versions.items() if n in pinned and pinned[n] != f"{n}=={v}")
        said = got.stdout + got.stderr
        names = missing(said)
        if not any(n in pinned for n in names):
            break  # not a pin's doing: no wheel of a requirement itself
    what = f"no wheel of {', '.join(dict.fromkeys(names))}" if names else "pip download failed"
    raise BundleError(f"{what} for CPython {py} on {platform}\n{said.strip()[-3000:]}")


def bundle(dest: Path, pythons=PYTHONS, platform: str = PLATFORM, extras: set[str] = frozenset(),
           include: set[str] = frozenset(), part_bytes: int = PART_BYTES, find_links: list[str] = (),
           say=print) -> Manifest:
    """Download and split the bundle into `dest` (emptied first if it holds an older bundle).
    `find_links` takes the wheels from those folders only, no index (a mirror, or a test)."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not (dest / MANIFEST).exists():
        raise BundleError(f"{dest} holds files but no bundle: name an empty or new folder")
    unknown = set(include) - set(HOST_PROVIDED)
    if unknown:
        raise BundleError(f"--include {','.join(sorted(unknown))}: only {', '.join(HOST_PROVIDED)} are left out to include")
    left_out = set(HOST_PROVIDED) - set(include)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(tmp) / "wheels"
        # setuptools where this runs builds it; else pip fetches it into an isolated build environment
        isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
        built = pip("wheel", "-q", "--no-deps", *isolation, "-w", str(wheels), str(ROOT), offline=bool(find_links))
        if built.returncode:
            raise BundleError(f"building distnet's wheel failed:\n{built.stderr[-2000:]}")
        (own,) = wheels.glob("distnet-*.whl")
        reqs = requires(own, set(extras), set(include))
        pinned = pins({"distnet", *left_out})
        sets, untested = {}, {}
        for py in pythons:
            say(f"resolving for CPython {py} on {platform}: {' '.join(reqs)}")
            into = Path(tmp) / py
            if loose := resolve(py, platform, reqs, pinned, into, find_links):
                say(f"  CPython {py}: some tested version has no wheel for it, resolved afresh; not the tested "
                    f"versions: {', '.join(loose)}")
                untested[py] = tuple(loose)
            kept = sorted(w for w in into.glob("*.whl") if project(w.name) not in left_out)
            for w in kept:
                shutil.move(w, wheels / w.name)  # a pure-Python wheel serves every version: kept once
            sets[py] = (own.name, *(w.name for w in kept))
        manifest = write(dest, own, sorted(w for w in wheels.glob("*.whl") if w != own), platform, tuple(reqs),
                         tuple(sorted(left_out)), sets, untested, part_bytes)
    say(f"bundle {dest}: {len(manifest.wheels)} wheels, {sum(len(w.parts) for w in manifest.wheels)} parts of at most "
        f"{part_bytes / 2**20:.0f} MiB, {sum(w.size for w in manifest.wheels) / 2**20:.0f} MiB in all")
    return manifest


def write(dest: Path, own: Path, wheels: list[Path], platform: str, requirements: tuple[str, ...],
          host_provided: tuple[str, ...], sets: dict[str, tuple[str, ...]], untested: dict[str, tuple[str, ...]],
          part_bytes: int = PART_BYTES) -> Manifest:
    """distnet's wheel `own` and `wheels` split into a new `dest`, with the manifest and SHA256SUMS."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    entries = tuple(split(w, dest, part_bytes) for w in [own, *wheels])
    manifest = Manifest(platform, requirements, own.name, host_provided, sets, untested, entries)
    (dest / MANIFEST).write_text(manifest.to_json())
    (dest / SUMS).write_text("".join(f"{p.sha256}  {p.file}\n" for w in entries for p in w.parts))
    return manifest


# ---------------------------------------------------------------- installing on the host
HOST_PROBE = """
import json, site, sys
found = {}
for name in %r:
    try:
        found[name] = __import__(name).__version__
    except ImportError as e:
        found[name] = None
print(json.dumps({"python": "%%d.%%d" %% sys.version_info[:2], "venv": sys.prefix != sys.base_prefix,
                  "site": site.getsitepackages(), "found": found}))
"""


def host(python: str, names: tuple[str, ...]) -> dict:
    """The host interpreter's version, whether it is a venv, its site-packages and `names`' versions."""
    out = subprocess.run([python, "-c", HOST_PROBE % (names,)], capture_output=True, text=True)
    if out.returncode:
        raise BundleError(f"{python} does not run: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


def offline_env() -> dict:
    """pip told of no index and no configuration: the bundle is all it may install from."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def install(bundle_dir: Path, venv: Path, python: str = sys.executable, say=print) -> Path:
    """Verify and reassemble the bundle, make `venv` over `python`'s own torch and numpy, install the
    wheels with no index, then run `distnet list` from it. Returns the venv's distnet command."""
    manifest = read_manifest(bundle_dir)  # every part is checked as it is reassembled, below
    need = tuple(n for n in HOST_PROVIDED if n in manifest.host_provided)
    info = host(python, need)
    absent = [n for n in need if info["found"][n] is None]
    if absent:
        raise BundleError(f"{python} cannot import {' or '.join(absent)}: this bundle leaves "
                          f"{' and '.join(manifest.host_provided)} to the host. Install PyTorch built for this "
                          f"host's CUDA first (`{python} -m pip install torch numpy`, or the command "
                          f"pytorch.org gives for your CUDA), or make a bundle that carries them: "
                          f"`python -m distnet.offline bundle DIR --include torch,numpy`")
    if info["python"] not in manifest.pythons:
        raise BundleError(f"{python} is CPython {info['python']}; the bundle has wheels for "
                          f"{', '.join(manifest.pythons)}: make one with --python {info['python']}")
    say(f"host: CPython {info['python']}" + "".join(f", {n} {v}" for n, v in info["found"].items()))
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(tmp) / "wheels"
        wheels.mkdir()
        reassemble(bundle_dir, wheels)  # a damaged bundle stops here, before anything is made
        venv = Path(venv).absolute()
        if not (venv / "bin" / "python").exists():
            subprocess.run([python, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        if info["venv"]:  # a venv's own site-packages are not a venv-over-it's "system" ones
            (site_dir,) = (venv / "lib").glob("python*/site-packages")
            (site_dir / "distnet-host.pth").write_text("".join(p + "\n" for p in info["site"]))
        (Path(tmp) / "requirements.txt").write_text("\n".join(manifest.pinned(info["python"])) + "\n")
        py = str(venv / "bin" / "python")
        for args in (["-r", f"{tmp}/requirements.txt"], ["--no-deps", str(wheels / manifest.distnet)]):
            got = subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), *args],
                                 capture_output=True, text=True, env=offline_env())
            if got.returncode:
                raise BundleError(f"pip install from the bundle failed:\n{got.stderr.strip()[-3000:]}")
    distnet = venv / "bin" / "distnet"
    listed = subprocess.run([str(distnet), "list"], capture_output=True, text=True)
    if listed.returncode:
        raise BundleError(f"installed, but `{distnet} list` fails:\n{listed.stderr.strip()[-3000:]}")
    say(listed.stdout.rstrip())
    say(f"distnet installed offline in {venv}: {distnet}")
    return distnet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distnet.offline", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="download and split the wheels (needs an index, or --find-links)")
    b.add_argument("dir", type=Path)
    b.add_argument("--python", nargs="+", default=list(PYTHONS), help=f"target CPython versions (default {' '.join(PYTHONS)})")
    b.add_argument("--platform", default=PLATFORM, help=f"target platform, a glibc floor for manylinux (default {PLATFORM})")
    b.add_argument("--extras", default="", help="distnet extras to carry too, comma-separated (report: the figures; ui: MLflow's UI)")
    b.add_argument("--include", default="", help="carry these too instead of taking the host's: torch,numpy")
    b.add_argument("--find-links", action="append", default=[], help="take wheels from this folder only, no index (repeatable)")
    b.add_argument("--part-mib", type=int, default=PART_BYTES // 2**20,
                   help="largest part in MiB (default %(default)s): what one transfer to the host may carry, "
                        "less anything that travels with it")
    v = sub.add_parser("verify", help="check every part against the manifest")
    v.add_argument("dir", type=Path)
    i = sub.add_parser("install", help="verify, reassemble and install into a venv over this Python's torch")
    i.add_argument("dir", type=Path)
    i.add_argument("--venv", type=Path, default=Path(".venv"))
    args = p.parse_args(argv)
    split_names = lambda s: {x for x in s.split(",") if x}  # noqa: E731
    try:
        if args.command == "bundle":
            bundle(args.dir, args.python, args.platform, split_names(args.extras), split_names(args.include),
                   part_bytes=args.part_mib * 2**20, find_links=args.find_links)
        elif args.command == "verify":
            m = verify(args.dir)
            print(f"bundle {args.dir}: {len(m.wheels)} wheels, every part as its manifest says")
        else:
            install(args.dir, args.venv)
    except BundleError as e:
        print(f"distnet.offline: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
