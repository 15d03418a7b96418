"""Network addresses, shared by `keel serve` and `keel federate serve`/`join` (both refuse exposed binds by default)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses; a name other than localhost counts as exposed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
