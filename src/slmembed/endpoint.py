"""Where a server listens and the key it asks for, settled before the model loads: a key that could not guard the
server (set but empty or blank, padded, or not sendable in an HTTP header) is refused rather than dropped, and the
listening sockets are bound, so a bad host or a taken port is one line at once. Torch-free, so these refusals are
immediate."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from slmembed.errors import SlmembedError

KEY_VARIABLE = "SLMEMBED_API_KEY"

BIND_ERRORS = {  # errno of a failed bind: what it means to the user
    errno.EADDRINUSE: "the port is in use (another server?)",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "cannot assign the address: it is not one of this machine's",
}


def api_key(given: str | None) -> str | None:
    """The key every request but /health must send: ``given`` (--api-key), else $SLMEMBED_API_KEY, else None (no
    key). A key that is set but empty or blank, padded with whitespace, or not printable ASCII is an error: a server
    started with one would be open, or unreachable."""
    where, key = ("--api-key", given) if given is not None else (f"${KEY_VARIABLE}", os.environ.get(KEY_VARIABLE))
    if key is None:
        return None
    if not key.strip():
        raise SlmembedError(f"{where} is set but {'blank' if key else 'empty'}: give the key clients must send, or "
                            "leave it unset to serve without one")
    if key != key.strip():
        raise SlmembedError(f"{where} has leading or trailing whitespace, which HTTP drops from a header: remove it")
    bad = next((i for i, c in enumerate(key) if not " " <= c <= "~"), None)
    if bad is not None:
        raise SlmembedError(f"{where} has a character (at position {bad + 1}) that cannot be sent in an HTTP header: "
                            "use printable ASCII")
    return key


def address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextmanager
def listening(host: str, port: int) -> Iterator[list[socket.socket]]:
    """Sockets listening on every address ``host`` resolves to (as asyncio's ``create_server`` binds them), closed on
    exit; SlmembedError naming host:port if ``host`` is blank or does not resolve, or an address cannot be bound.
    Connections made before a server takes the sockets wait for it."""
    if not host.strip():
        raise SlmembedError("--host is empty: give the address to listen on (127.0.0.1, the default, is this machine "
                            "only; 0.0.0.0 is every interface)")
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SlmembedError(f"cannot listen on {address(host, port)}: the host does not resolve "
                            f"({exc.strerror})") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, where in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio's: a host may resolve to both an IPv4 and an IPv6 address
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(where)
                sock.listen()
            except OSError as exc:
                shown = address(host, port) + ("" if where[0] == host else f" ({where[0]})")
                raise SlmembedError(f"cannot listen on {shown}: {BIND_ERRORS.get(exc.errno, exc.strerror)}") from None
        yield sockets
    finally:
        for sock in sockets:
            sock.close()
