"""Port numbers the CLIs and the edge client accept: grpc takes a port modulo 65536, so 99999 would
silently bind or dial 34463, someone else's port perhaps. Check before grpc sees the number."""

from __future__ import annotations

MAX_PORT = 65535


def port_beyond_range(address: str) -> bool:
    """Whether ``address`` (HOST:PORT) names a port past MAX_PORT (other forms are not judged here)."""
    port = address.rpartition(":")[2]
    return port.isdigit() and int(port) > MAX_PORT


def port_range_error(flag: str, port: int, lowest: int = 0) -> str | None:
    """The usage error for a port flag outside lowest..MAX_PORT, or None when it is in range."""
    return None if lowest <= port <= MAX_PORT else f"{flag} must be in {lowest}..{MAX_PORT}, got {port}"
