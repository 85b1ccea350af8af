"""hivemind's process-based DHT and averager (the DiLoCo baseline) leave client sockets in /tmp when they stop:
the cleanup removes exactly the dead ones made since a node started them."""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

from swarmd.daemon.p2p_host import remove_dead_hivemind_sockets


def test_dead_sockets_made_since_the_start_go_and_live_or_older_ones_stay():
    token = secrets.token_hex(4)
    live_path, dead_path, old_path = (Path(f"/tmp/hivemind-test{token}-{name}.sock") for name in ("live", "dead", "old"))
    live = socket.socket(socket.AF_UNIX)
    dead = socket.socket(socket.AF_UNIX)
    old = socket.socket(socket.AF_UNIX)
    try:
        old.bind(str(old_path))
        old.close()  # its file stays behind: a dead socket
        long_ago = time.time() - 3600
        os.utime(old_path, (long_ago, long_ago))
        since = time.time() - 1.0
        live.bind(str(live_path))
        live.listen()
        dead.bind(str(dead_path))
        dead.close()
        remove_dead_hivemind_sockets(since)
        assert live_path.exists(), "a socket some process still listens on was removed"
        assert not dead_path.exists(), "a dead socket made since the start was left behind"
        assert old_path.exists(), "a socket from before the start is not ours to remove"
    finally:
        live.close()
        for path in (live_path, dead_path, old_path):
            path.unlink(missing_ok=True)
