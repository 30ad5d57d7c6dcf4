"""Hosts of their own on one machine, for the cluster tests (needs root, `ip` and `unshare`).

Each extra host is a network namespace joined to this one by a veth pair: this side 10.213.N.1,
the host 10.213.N.2, 10.213.N.3, ... (N picked unused from 10.213.0.0/16). In it, a command runs
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
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
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
    address: str  # its address on the link to this side
    link: str  # this side's end of the veth pair

    def command(self, cmd: list[str], hide: list[Path] = ()) -> list[str]:
        """`cmd` run on the host: its network, its hostname, its own /dev/shm, `hide` emptied."""
        mounts = ["mount -t tmpfs distnet-shm /dev/shm"]
        mounts += [f"mount -t tmpfs distnet-hidden {d}" for d in hide if Path(d).is_dir()]
        script = f"hostname {self.hostname} && " + " && ".join(mounts) + ' && exec "$@"'
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--mount", "--propagation", "private",
                "sh", "-c", script, "sh", *cmd]

    def pids(self) -> list[int]:
        """Every process in the host's network namespace."""
        return [int(p) for p in ip("netns", "pids", self.netns, check=False).stdout.split()]

    def cut(self) -> None:
        """Take the link down: the host is unreachable, its processes go on."""
        ip("link", "set", self.link, "down")

    def mend(self) -> None:
        ip("link", "set", self.link, "up")
        ip("route", "replace", f"{self.address}/32", "dev", self.link)


def _free_subnet() -> int:
    used = ip("-o", "-4", "addr").stdout
    while True:
        n = secrets.randbelow(254) + 1
        if f"10.213.{n}." not in used:
            return n


@contextmanager
def extra_hosts(count: int):
    """(this side's address, [Host]): `count` hosts, removed with all their processes on exit."""
    tag, n = secrets.token_hex(3), _free_subnet()
    here = f"10.213.{n}.1"
    hosts: list[Host] = []
    try:
        for i in range(count):
            host = Host(f"distnet-node{i + 2}", f"distnet-{tag}-{i}", f"10.213.{n}.{i + 2}", f"dn{tag}h{i}")
            ip("netns", "add", host.netns)
            hosts.append(host)
            inner = f"dn{tag}n{i}"
            ip("link", "add", host.link, "type", "veth", "peer", "name", inner)
            ip("link", "set", inner, "netns", host.netns)
            ip("addr", "add", f"{here}/32", "dev", host.link)
            ip("link", "set", host.link, "up")
            ip("route", "replace", f"{host.address}/32", "dev", host.link)
            ip("-n", host.netns, "link", "set", inner, "name", "eth0")
            ip("-n", host.netns, "addr", "add", f"{host.address}/32", "dev", "eth0")
            ip("-n", host.netns, "link", "set", "eth0", "up")
            ip("-n", host.netns, "link", "set", "lo", "up")
            ip("-n", host.netns, "route", "add", f"{here}/32", "dev", "eth0")
        yield here, hosts
    finally:
        for host in hosts:
            end_processes(host.pids)
            ip("link", "del", host.link, check=False)
            ip("netns", "del", host.netns, check=False)


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


def process_trees(marker: str) -> list[int]:
    """Processes whose command line names `marker` (a folder of the caller's own: a Ray node's temp
    dir), and all their descendants (Ray's workers rename themselves `ray::...`)."""
    procs = _processes()
    tree = {pid for pid, (_, cmd) in procs.items() if marker in cmd}
    while grown := {pid for pid, (parent, _) in procs.items() if parent in tree} - tree:
        tree |= grown
    return sorted(tree - {os.getpid()})


def end_process_trees(marker: str) -> None:
    end_processes(lambda: [p for p in process_trees(marker) if Path(f"/proc/{p}").exists()
                           and not _zombie(p)])


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
