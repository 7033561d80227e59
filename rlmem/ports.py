"""A free TCP port: what the learners' rendezvous, ``rlmem serve``, ``rlmem doctor`` and the tests bind.

The OS picks an unused port for a socket bound to port 0; the socket is closed before the port is
used, so another process could take it in between (rare on one machine; callers that start a server
on it report a clear error if it is taken).
"""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that nothing listens on now (``""``: every interface)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
