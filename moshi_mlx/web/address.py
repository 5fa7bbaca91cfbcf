"""Where the web server listens: port parsing, an early check that the address is free, and
the URL to open in a browser."""

from __future__ import annotations

import argparse
import ipaddress
import socket

from moshi_mlx.errors import MoshiError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8998


def port(text: str) -> int:
    """The --port type: 0 (any free port) to 65535; argparse names it in its errors."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 0 and 65535, got {value}")
    return value


def check_port_free(host: str, port: int) -> None:
    """Fail before the (long) model load when the address cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise MoshiError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def page_url(host: str, port: int) -> str:
    """The URL a browser on this machine (or, for a named host, on the network) opens."""
    if host in ("", "0.0.0.0", "::", "localhost", "127.0.0.1", "::1"):
        name = "localhost"
    elif ":" in host:
        name = f"[{host}]"
    else:
        name = host
    return f"http://{name}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
