"""Which network interface a worker's gloo uses.

Gloo (torch.distributed on CPU, and for its object collectives) picks the address it tells the
other ranks to connect to from the machine's hostname. Debian and Ubuntu map the hostname to
127.0.1.1 in /etc/hosts, and a host whose name does not resolve falls back to 127.0.0.1, so across
nodes each rank would advertise a loopback address and the process group's setup fails
(`Gloo connectFullMesh failed ... remote=[127.0.0.1]`). Every worker therefore pins gloo, before Ray
Train sets its process group up (launch.TorchConfig), to the interface that carries its node's Ray
address: the address the other nodes already reach it by.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

GLOO_IFNAME = "GLOO_SOCKET_IFNAME"
SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def interface_address(name: str) -> str | None:
    """The IPv4 address of interface `name`, or None (down, no address, or not Linux)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            answer = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(answer[20:24])


def interface_of(address: str) -> str | None:
    """The name of the local interface that carries `address`, or None."""
    return next((name for _, name in socket.if_nameindex() if interface_address(name) == address), None)


def pin_gloo_interface() -> str | None:
    """In a Ray worker: point gloo at the interface of this node's Ray address, unless the user
    already chose one ($GLOO_SOCKET_IFNAME is theirs to set). Returns the interface gloo will use
    (None: gloo's own choice, where no interface carries the address)."""
    import ray  # here: the module's other functions serve callers without Ray

    if GLOO_IFNAME not in os.environ:
        name = interface_of(ray.util.get_node_ip_address())
        if name is not None:
            os.environ[GLOO_IFNAME] = name
    return os.environ.get(GLOO_IFNAME)
