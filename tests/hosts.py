"""Hosts of their own on one machine, for the cluster tests (needs root, `ip` and `unshare`).

Each extra host is a network namespace with one address (this machine 10.213.N.1, the hosts
10.213.N.2, 10.213.N.3, ...; N picked unused from 10.213.0.0/16), and every two hosts are joined by
a veth pair of their own (nothing is forwarded, so no sysctl or firewall of this machine changes). In it, a command runs
with a hostname of its own (UTS namespace) and, in a mount namespace of its own, an empty /dev/shm
and empty tmpfs over the folders the host must not have (MNIST). Nothing outside the addresses
made here is used, and everything made here is removed: the processes in the namespaces, the
namespaces and the links. Processes of this side (a Ray head) are ended by `end_process_trees`,
which ends only processes that name a folder of the test's own, and their descendants.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class Host:
    hostname: str
    netns: str
    address: str  # the one address it has, on each of its links
    links: list[tuple[str, str]] = field(default_factory=list)  # its own ends: (interface, peer address)

    def command(self, cmd: list[str], hide: list[Path] = ()) -> list[str]:
        """`cmd` run on the host: its network, its hostname, its own /dev/shm, `hide` emptied."""
        mounts = ["mount -t tmpfs distnet-shm /dev/shm"]
        mounts += [f"mount -t tmpfs distnet-hidden {d}" for d in hide if Path(d).is_dir()]
        script = f"hostname {self.hostname} && " + " && ".join(mounts) + ' && exec "$@"'
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--mount", "--propagation", "private",
                "sh", "-c", script, "sh", *cmd]

    def serve_ssh(self, root: Path, public_key: str, hide: list[Path] = (), share: list[Path] = (),
                  mnt: dict[str, Path] | None = None) -> subprocess.Popen:
        """An SSH server on the host's address, port 22, serving a machine of its own: what runs
        there has its own PID namespace (so a `ray stop` there ends only that host's Ray), its own
        /tmp (`root`/tmp), /run, /dev/shm and home for root (`root`/home, `public_key` authorized),
        and an /etc/hosts that names it by its address (Ray finds a node's address through its
        hostname where no default route exists). `hide` emptied; `share`, folders in this machine's
        home or /tmp, seen at the same place in the host's own (the Python an installed environment
        runs on, and the environment itself where the checkout is in /tmp); folders elsewhere are
        seen as they are;
        its own /mnt, where /mnt/NAME is this machine's folder `mnt[NAME]` (as if NFS-mounted: hosts
        given the same folder share it). Its log: `root`/sshd.log. When
        this process ends, so does everything on the host (sshd is the namespace's init)."""
        home, etc = root / "home", root / "home" / ".sshd"
        for d in (etc, home / ".ssh", root / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        (root / "tmp").chmod(0o1777)
        home.chmod(0o755)  # the postgres user reaches the tracking server's database inside
        (home / ".ssh" / "authorized_keys").write_text(public_key)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(etc / "host_key")], check=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{self.address} {self.hostname}\n")
        # Inside the host (after the mounts) its files are under /root.
        (etc / "sshd_config").write_text(f"""ListenAddress {self.address}:22
HostKey /root/.sshd/host_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
Subsystem sftp internal-sftp
""")
        # `hide` first: once the host's own /tmp (or /root, /mnt) is mounted, a folder under this
        # machine's is gone from view and mounting over it fails (a checkout in /tmp, CI's own clone
        # among them, hid ../shared there, and sshd never started).
        mounts = [f"mount -t tmpfs distnet-hidden {d}" for d in hide if Path(d).is_dir()]
        mounts += ["mount -t tmpfs distnet-mnt /mnt"]
        for name, d in (mnt or {}).items():
            mounts += [f"mkdir /mnt/{name}", f"mount --bind {d} /mnt/{name}"]
        for d in share:  # seen where they are, inside the host's own home or /tmp (mounted with them)
            inside = home / d.relative_to(Path.home()) if d.is_relative_to(Path.home()) else \
                root / "tmp" / d.relative_to("/tmp") if d.is_relative_to("/tmp") else None
            if inside is not None:
                inside.mkdir(parents=True, exist_ok=True)
                mounts.append(f"mount --bind {d} {inside}")
        mounts += [f"mount --rbind {home} /root", f"mount --rbind {root / 'tmp'} /tmp",
                  "mount -t tmpfs distnet-run /run", "mkdir -m 755 /run/sshd", "mount -t tmpfs distnet-shm /dev/shm",
                  "mount --bind /root/.sshd/hosts /etc/hosts"]
        script = f"hostname {self.hostname} && " + " && ".join(mounts) + \
            " && exec /usr/sbin/sshd -D -e -f /root/.sshd/sshd_config"
        with open(root / "sshd.log", "w") as log:  # sh -x: each set-up step in the log, the failing one last
            server = subprocess.Popen(["ip", "netns", "exec", self.netns, "unshare", "--uts", "--mount", "--pid", "--fork",
                                       "--mount-proc", "--kill-child", "--propagation", "private", "sh", "-xc", script],
                                      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.wait_for_port(22, server, root / "sshd.log")
        return server

    def wait_for_port(self, port: int, server: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
        """Until `server` takes connections on the host's `port`; else it is ended and the error
        carries its log (an sshd that died at start-up would leave its clients retrying for minutes)."""
        deadline = time.monotonic() + timeout
        while server.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection((self.address, port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        exited = server.poll()
        if exited is None:
            server.kill()
            server.wait()
        state = f"exited with {exited}" if exited is not None else f"not listening after {timeout:.0f} s"
        raise RuntimeError(f"the server on {self.hostname} ({self.address}:{port}) {state}; its log:\n{log.read_text()[-4000:]}")

    def pids(self) -> list[int]:
        """Every process in the host's network namespace."""
        return [int(p) for p in ip("netns", "pids", self.netns, check=False).stdout.split()]

    def processes(self) -> dict[int, str]:
        """pid -> command line of every process in the host's network namespace."""
        procs = _processes()
        return {pid: procs[pid][1] for pid in self.pids() if pid in procs}

    def command_lines(self) -> list[str]:
        return list(self.processes().values())

    def cut(self) -> None:
        """Every link of the host down at its end (its peers lose the carrier): the host is
        unreachable and reaches nothing, its processes go on."""
        for dev, _ in self.links:
            ip("-n", self.netns, "link", "set", dev, "down")

    def mend(self) -> None:
        for dev, peer in self.links:
            ip("-n", self.netns, "link", "set", dev, "up")
            ip("-n", self.netns, "route", "replace", f"{peer}/32", "dev", dev)


def _free_subnet() -> int:
    used = ip("-o", "-4", "addr").stdout
    while True:
        n = secrets.randbelow(254) + 1
        if f"10.213.{n}." not in used:
            return n


def _link(name: str, a: tuple[str | None, str], b: tuple[str | None, str]) -> tuple[str, str]:
    """A veth pair between hosts a and b ((netns or None for this machine, address) each): each end
    carries its host's address and a route to the other's. Returns the two ends' names."""
    ends = (f"{name}a", f"{name}b")
    ip("link", "add", ends[0], "type", "veth", "peer", "name", ends[1])
    for (netns, address), (_, peer), dev in ((a, b, ends[0]), (b, a, ends[1])):
        on = []
        if netns is not None:
            ip("link", "set", dev, "netns", netns)
            on = ["-n", netns]
        ip(*on, "addr", "add", f"{address}/32", "dev", dev)
        ip(*on, "link", "set", dev, "up")
        ip(*on, "route", "replace", f"{peer}/32", "dev", dev)
    return ends


@contextmanager
def extra_hosts(count: int):
    """(this machine's address, [Host]): `count` hosts, every two of them (this machine included)
    joined by a link of their own, so that no traffic is forwarded; removed with all their
    processes on exit."""
    tag, n = secrets.token_hex(3), _free_subnet()
    here = f"10.213.{n}.1"
    hosts: list[Host] = []
    made: list[str] = []  # this machine's ends of the links
    try:
        for i in range(count):
            host = Host(f"distnet-node{i + 2}", f"distnet-{tag}-{i}", f"10.213.{n}.{i + 2}")
            ip("netns", "add", host.netns)
            hosts.append(host)
            ip("-n", host.netns, "link", "set", "lo", "up")
            mine, theirs = _link(f"dn{tag}{i}", (None, here), (host.netns, host.address))
            made.append(mine)
            host.links.append((theirs, here))
            for j, other in enumerate(hosts[:-1]):
                a, b = _link(f"dn{tag}{j}{i}", (other.netns, other.address), (host.netns, host.address))
                other.links.append((a, host.address))
                host.links.append((b, other.address))
        yield here, hosts
    finally:
        for host in hosts:
            end_processes(host.pids)
            ip("netns", "del", host.netns, check=False)  # with it the ends in it, and so their pairs
        for dev in made:
            ip("link", "del", dev, check=False)


def end_processes(listing, timeout: float = 30) -> None:
    """SIGKILL what `listing()` names until it names nothing alive."""
    deadline = time.time() + timeout
    while (pids := [p for p in listing() if p != os.getpid()]) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    found = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found[int(d.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return found


def process_trees(*markers: str) -> list[int]:
    """Processes whose command line names one of `markers` (what is the caller's own: a Ray node's
    temp dir, its GCS address at an address the caller made), and all their descendants (Ray's
    workers rename themselves `ray::...`)."""
    procs = _processes()
    tree = {pid for pid, (_, cmd) in procs.items() if any(m in cmd for m in markers)}
    while grown := {pid for pid, (parent, _) in procs.items() if parent in tree} - tree:
        tree |= grown
    return sorted(tree - {os.getpid()})


def end_process_trees(*markers: str) -> None:
    end_processes(lambda: [p for p in process_trees(*markers) if Path(f"/proc/{p}").exists()
                           and not _zombie(p)])


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
