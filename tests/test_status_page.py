"""The status page's pieces without a swarm: the JSON document, the history ring, the board the HTTP thread
reads, and the node's HTTP endpoint (/, /status.json, /healthz, /metrics) over real HTTP."""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import urllib.error
import urllib.request

import pytest
from swarmd.daemon.metrics import MetricsServer, NodeMetrics
from swarmd.daemon.records import Heartbeat, StageEntry
from swarmd.daemon.status_page import PAGE, History, NodeStatus, StatusBoard, encode_document, status_document
from swarmd.daemon.swarm_view import swarm_view

FAR = 1e12


def _entry(peer: str, step: int, tput: float, loss: float | None = None) -> StageEntry:
    return StageEntry(peer, Heartbeat(tput, 0, step, 8 * step, (), loss=loss, outer_steps=(2, 1, 0, 0)), FAR)


VIEW = swarm_view([[_entry("a", 10, 4.0, 3.5), _entry("b", 12, 6.0, 3.0)], [_entry("c", 11, 5.0, 3.25)]])
NODE = NodeStatus(peer_id="a", role="volunteer", stage=0, inner_step=10, outer_step=1, loss=3.5,
                  eval_loss=math.nan, throughput=4.0)


def test_document_shape():
    history = History()
    history.add(100.0, 3.5, math.nan, 12.0)
    doc = status_document("run1", VIEW, NODE, history.points(), now=123.0)
    assert doc == json.loads(encode_document(doc))  # plain JSON all the way down
    assert doc["run_id"] == "run1" and doc["time"] == 123.0 and doc["nodes"] == 3
    assert doc["stages"] == [
        {"stage": 0, "peers": 2, "throughput": 10.0, "inner_step_min": 10, "inner_step_max": 12, "loss": 3.25,
         "outer_steps": {"paired": 4, "solo": 2, "rejected": 0, "failed": 0}},
        {"stage": 1, "peers": 1, "throughput": 5.0, "inner_step_min": 11, "inner_step_max": 11, "loss": 3.25,
         "outer_steps": {"paired": 2, "solo": 1, "rejected": 0, "failed": 0}},
    ]
    assert doc["node"] == {"peer_id": "a", "role": "volunteer", "stage": 0, "inner_step": 10, "outer_step": 1,
                           "loss": 3.5, "eval_loss": None, "throughput": 4.0}  # NaN: none yet -> null
    assert doc["history"] == [{"t": 100.0, "loss": 3.5, "eval_loss": None, "samples_per_s": 12.0}]
    # `swarmd status --json`: the same document, without a node or its history
    reader = status_document("run1", VIEW)
    assert reader["node"] is None and reader["history"] == [] and reader["stages"] == doc["stages"]


def test_document_is_valid_json_whatever_peers_claim():
    # two hostile peers each announce the largest finite throughput: the sum overflows to inf, which JSON has no
    # word for (Python would write Infinity and a browser's JSON.parse would refuse the whole document)
    huge = swarm_view([[_entry("x", 1, 1.7e308), _entry("y", 1, 1.7e308)], []])
    assert math.isinf(huge.stages[0].throughput)
    text = encode_document(status_document("run1", huge))
    assert json.loads(text)["stages"][0]["throughput"] is None
    assert b"Infinity" not in text and b"NaN" not in text


def test_history_is_a_bounded_ring():
    history = History(maxlen=5)
    for i in range(12):
        history.add(float(i), 5.0 - i * 0.1, math.inf if i == 3 else None, float(i))
    points = history.points()
    assert len(history) == 5 and [p["t"] for p in points] == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert all(p["eval_loss"] is None for p in points)
    assert History().points() == [] and History()._points.maxlen == 360


def test_board_hands_over_finished_bytes():
    board = StatusBoard()
    assert json.loads(board.json())["stages"] == []
    doc = status_document("run1", VIEW, NODE)
    board.publish(doc)
    before = board.json()
    doc["run_id"] = "changed later"  # the loop may reuse its objects: what was published stays as it was
    assert json.loads(before)["run_id"] == "run1" and board.json() == before
    seen: list[bytes] = []
    readers = [threading.Thread(target=lambda: seen.extend(board.json() for _ in range(200))) for _ in range(4)]
    for t in readers:
        t.start()
    for i in range(200):
        board.publish(status_document(f"run{i}", VIEW))
    for t in readers:
        t.join()
    assert all(json.loads(b)["nodes"] == 3 for b in seen)  # never a torn document


def test_page_is_self_contained():
    text = PAGE.decode()
    # nothing fetched from anywhere but this node: no src/href, no URL but the SVG namespace (an identifier)
    assert not re.search(r"\b(src|href)\s*=", text)
    assert re.findall(r"https?://[^\s\"']+", text) == ["http://www.w3.org/2000/svg"]
    assert 'fetch("status.json"' in text  # relative: works behind a reverse proxy's path prefix too
    assert "innerHTML" not in text  # record values are set as text, never parsed


def _get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_http_endpoints():
    metrics = NodeMetrics()
    metrics.inner_steps.inc(7)
    board = StatusBoard()
    board.publish(status_document("run1", VIEW, NODE))
    server = MetricsServer(metrics, "127.0.0.1", 0, status_json=board.json, page=PAGE)
    port = server.port
    try:
        status, headers, body = _get(port, "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html") and body == PAGE
        assert "connect-src 'self'" in headers["Content-Security-Policy"]
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        status, headers, body = _get(port, "/status.json")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body)["node"]["peer_id"] == "a"
        assert _get(port, "/healthz")[:3:2] == (200, b"ok\n")
        status, _, body = _get(port, "/metrics")
        assert status == 200 and b"swarmd_inner_steps_total 7.0" in body
        assert _get(port, "/nope")[0] == 404
        assert _get(port, "/status.json", method="POST")[0] == 405
        board.publish(status_document("run2", VIEW))  # the next read sees the next document
        assert json.loads(_get(port, "/status.json")[2])["run_id"] == "run2"
    finally:
        server.close()
    with pytest.raises(OSError):  # closed: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
