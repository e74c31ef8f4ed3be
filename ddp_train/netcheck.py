"""What the network of this host means for a job, without torch: name resolution, the loopback trap of
multi-node gloo, whether a port is free. The engine (dist) and the doctor share these."""
from __future__ import annotations

import socket


def resolve(name: str) -> str | None:
    try:
        return socket.gethostbyname(name)
    except OSError:
        return None


def loopback_problem(host: str, host_ip: str | None, master: str, master_ip: str | None) -> str | None:
    """Why gloo cannot work across nodes here, or None. Gloo listens on the address this host's name
    resolves to; a name mapped to 127.0.1.1 (Debian and most container images) makes it listen on
    loopback, where other machines cannot connect. Everything on loopback (the master too) is one machine."""
    if host_ip is None or not host_ip.startswith("127."):
        return None
    if master_ip is not None and master_ip.startswith("127."):
        return None
    return (f"this host's name {host!r} resolves to {host_ip} (loopback), so gloo would listen where the other "
            f"nodes cannot reach it (MASTER_ADDR={master}): set GLOO_SOCKET_IFNAME to the network interface "
            "they reach (e.g. GLOO_SOCKET_IFNAME=eth0), or map the hostname to its real address in /etc/hosts")


def port_in_use(port: int, host: str = "") -> str | None:
    """Why `port` cannot be listened on here (what a TCPStore / c10d rendezvous would hit), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
