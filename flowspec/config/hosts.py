"""Host names and addresses: loopback / bind-all tests, same-address keys, "is this machine".

Used by :mod:`flowspec.config.parse` to check ``host`` fields (and to tell two nodes on
the same address apart), and through :func:`is_local_host` by the launcher, to tell which
nodes run on this machine.
"""

from __future__ import annotations

import ipaddress
import socket


def _is_loopback(host: str) -> bool:
    """Whether a bind address keeps a server on this machine (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


def _host_key(host: str) -> str:
    """Host spelling used to detect two nodes on the same address."""
    h = host.strip().lower().rstrip(".")
    if h == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        return h


def is_local_host(host: str) -> bool:
    """Whether host names this machine: loopback, localhost, or this machine's name or addresses."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    local_names, local_ips = _local_identity()
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        ip = None
    if ip is not None:
        return ip.is_loopback or ip.is_unspecified or str(ip) in local_ips
    if h in local_names:
        return True
    try:
        infos = socket.getaddrinfo(h, None)
    except (OSError, UnicodeError):
        return False
    for info in infos:
        try:
            addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        except ValueError:
            continue
        if addr.is_loopback or str(addr) in local_ips:
            return True
    return False


def _local_identity() -> tuple[set[str], set[str]]:
    """This machine's host names and IP addresses (best effort, without network traffic)."""
    names: set[str] = set()
    ips: set[str] = set()
    try:
        hostname = socket.gethostname().lower()
    except OSError:
        hostname = ""
    if hostname:
        names.update({hostname, hostname.split(".")[0]})
        try:
            for info in socket.getaddrinfo(hostname, None):
                ips.add(str(ipaddress.ip_address(str(info[4][0]).split("%")[0])))
        except (OSError, ValueError, UnicodeError):
            pass
    # the address of the default route's interface: connecting a UDP socket sends nothing
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                ips.add(str(ipaddress.ip_address(s.getsockname()[0].split("%")[0])))
        except (OSError, ValueError):
            pass
    return names, ips
