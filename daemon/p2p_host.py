"""Start a hivemind P2P (the node's p2pd) with its unix sockets in this process's temp folder.

hivemind names p2pd's control sockets ``/tmp/hivemind-*`` whatever TMPDIR says, and a p2pd killed with its
node (SIGKILL, OOM, a pulled plug) leaves them there for good. Placing them under ``tempfile.gettempdir()``
keeps the default (``/tmp``) for users and lets a test or a demo that gives its nodes a private TMPDIR remove
everything its nodes leave.
"""

from __future__ import annotations

import tempfile
from typing import Any

from hivemind.p2p import P2P

# the longest socket name hivemind appends to the prefix ("p2pclient-" + 11-char token + ".sock") plus
# "hivemind-"; a unix socket path must fit in 108 bytes
_SOCKET_NAME_BYTES = 40
_SUN_PATH_BYTES = 107


def p2p_class(folder: str | None = None) -> type[P2P]:
    """A P2P subclass whose sockets live in ``folder`` (default: the temp folder); plain P2P when the path
    would be too long for a unix socket."""
    folder = folder or tempfile.gettempdir()
    if len(folder.encode()) + 1 + _SOCKET_NAME_BYTES > _SUN_PATH_BYTES:
        return P2P
    return type("FolderSocketP2P", (P2P,), {"_UNIX_SOCKET_PREFIX": f"/unix{folder.rstrip('/')}/hivemind-"})


async def create_p2p(**kwargs: Any) -> P2P:
    """``P2P.create(**kwargs)`` with the sockets in the temp folder."""
    return await p2p_class().create(**kwargs)
