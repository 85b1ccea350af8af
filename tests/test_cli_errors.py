"""`swarmd join` and `swarmd status` given a bad, unreachable or wrong peer address, or node options out of
range: one clear line on stderr, exit code 2, no traceback, and no p2pd socket left in the temp folder."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from swarmd.daemon.cli import main
from swarmd.daemon.demo import node_command, start_child, stop_children, wait_ready

NOBODY = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"  # a well-formed peer id that no node here has


def _closed_port() -> int:
    """A local TCP port that nothing listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hivemind_files() -> set[str]:
    return set(glob.glob("/tmp/hivemind-*"))


def _left_in_tmp(before: set[str]) -> set[str]:
    """/tmp/hivemind-* files new since ``before`` that no live process has bound (/proc/net/unix lists those):
    left behind. A bound one belongs to a node still running, e.g. another test on this machine."""
    bound = {fields[7] for line in Path("/proc/net/unix").read_text().splitlines()[1:]
             if len(fields := line.split()) > 7}
    return _hivemind_files() - before - bound


def _fails_cleanly(command: str, maddr: str, env: dict[str, str], expected: str) -> None:
    """Run the real CLI; assert exit code 2, one stderr line holding ``expected``, no traceback, no socket."""
    extra = ["--host", "127.0.0.1", "--no-nat-traversal", "--metrics-port", "-1",
             "--node-dir", str(Path(env["TMPDIR"]) / "node")] if command == "join" else []
    before = _hivemind_files()
    result = subprocess.run(node_command(command, maddr, *extra), env=env, capture_output=True, text=True,
                            timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"swarmd {command}: error: ") and expected in lines[0], lines[0]
    assert not list(Path(env["TMPDIR"]).glob("*.sock")), list(Path(env["TMPDIR"]).iterdir())
    assert not _left_in_tmp(before), _left_in_tmp(before)


@pytest.fixture(scope="module")
def seed_maddr() -> Iterator[str]:
    """A live seed's multiaddr (its own TMPDIR: its sockets are expected to exist)."""
    folder = tempfile.mkdtemp(prefix="swarmd-", dir="/tmp")
    env = {**os.environ, "TMPDIR": folder, "HIVEMIND_LOGLEVEL": "ERROR", "PYTHONUNBUFFERED": "1"}
    child = start_child("seed", ["seed", "--host", "127.0.0.1", "--no-nat-traversal", "--metrics-port", "-1",
                                 "--no-train"], Path(folder) / "seed", env)
    try:
        yield wait_ready(child, 60)["maddrs"][0]
    finally:
        stop_children([child])
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize(("command", "maddr", "expected"), [
    ("join", "/ip4/999.1.1.1/tcp/x", "is not a valid multiaddr"),
    ("status", "not-a-maddr", "is not a valid multiaddr"),
    ("join", "/ip4/127.0.0.1/tcp/4001", "has no /p2p/<peer id> part"),
    ("status", "/ip4/127.0.0.1/tcp/4001/p2p/QmBad", "is not a valid multiaddr"),  # a syntactically bad peer id
])
def test_bad_multiaddr(command: str, maddr: str, expected: str, swarm_env: dict[str, str]) -> None:
    _fails_cleanly(command, maddr, swarm_env, expected)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["join", "status"])
def test_unreachable_seed(command: str, swarm_env: dict[str, str]) -> None:
    _fails_cleanly(command, f"/ip4/127.0.0.1/tcp/{_closed_port()}/p2p/{NOBODY}", swarm_env, "could not reach")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["join", "status"])
def test_wrong_peer_id(command: str, seed_maddr: str, swarm_env: dict[str, str]) -> None:
    """The seed's address with another node's id: p2pd cannot authenticate the peer it was told to expect."""
    where = seed_maddr.rpartition("/p2p/")[0]
    _fails_cleanly(command, f"{where}/p2p/{NOBODY}", swarm_env, f"but not as peer {NOBODY}")


@pytest.mark.parametrize(("argv", "expected"), [
    (["join", "not-a-maddr"], "is not a valid multiaddr"),
    (["status", "/ip4/999.1.1.1/tcp/x"], "is not a valid multiaddr"),
    (["status", "/ip4/127.0.0.1/tcp/4001"], "has no /p2p/<peer id> part"),
    (["join", "/ip4/127.0.0.1/tcp/4001/p2p/QmBad"], "is not a valid multiaddr"),
    (["join", f"/p2p/{NOBODY}"], "says which peer but not where it listens"),
    (["join", "--port", "70000"], "--port 70000 is out of range"),
    (["seed", "--port", "-1"], "--port -1 is out of range"),
    (["join", "--metrics-port", "-2"], "--metrics-port -2 is out of range"),
    (["join", "--threads", "-1"], "--threads -1 is out of range"),
    (["join", "--duration", "nan"], "--duration nan is out of range"),
    (["seed", "--host", "localhost"], "is not an IPv4 address"),
    (["join", "--announce", "/ip4/203.0.113.7/tcp/0"], "has no explicit TCP port"),
    (["join", "--seed-id", "not-an-id"], "is not a peer id"),
    (["status", "--watch", "-1"], "--watch -1.0 is out of range"),
])
def test_bad_argument_fails_before_starting(argv: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    """Checked before p2pd starts (so in-process: nothing to clean up). The multiaddr cases complete the
    subprocess ones above: each command, each kind of bad address."""
    peer = [f"/ip4/127.0.0.1/tcp/4001/p2p/{NOBODY}"] if argv[0] != "seed" else []
    assert main([argv[0], *peer, *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and err.startswith(f"swarmd {argv[0]}: error: "), err
