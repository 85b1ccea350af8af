"""Every Prometheus metric a node exports, defined once, in a registry owned by the node."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from swarmd.daemon.host_metrics import HostCollector
from swarmd.protocols.errors import REJECT_REASONS
from swarmd.protocols.rpc import METRIC_LABELS

if TYPE_CHECKING:
    from swarmd.daemon.swarm_view import SwarmView  # it imports this module

CHANNELS = ("activations", "gradients", "averaging", "state")
RPCS = tuple(METRIC_LABELS.values())
MICROBATCH_RESULTS = ("completed", "dropped", "expired")
OUTER_RESULTS = ("paired", "solo", "rejected", "failed")
CHECKPOINT_RESULTS = ("written", "failed")
# Latency buckets from loopback (sub-ms) to slow volunteer links (tens of seconds).
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Inner steps: from a small model on loopback (tens of ms) to many microbatches over slow links (minutes).
STEP_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class NodeMetrics:
    """The node's metric catalog. Labels take small fixed value sets only (no peer or microbatch ids)."""

    def __init__(self, p2pd_pid: int | None = None) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.info = Info("swarmd", "Static facts about this node", registry=r)
        self.stage = Gauge("swarmd_stage", "Pipeline stage this node serves (-1: none)", registry=r)
        self.num_stages = Gauge("swarmd_stages", "Number of pipeline stages in the run", registry=r)
        self.inner_steps = Counter("swarmd_inner_steps", "Inner optimizer steps taken", registry=r)
        self.inner_step_duration = Histogram(
            "swarmd_inner_step_duration_seconds", "Wall time between consecutive inner steps of this node",
            buckets=STEP_BUCKETS, registry=r,
        )
        self.last_inner_step = Gauge(
            "swarmd_last_inner_step_timestamp_seconds", "Unix time of this node's latest inner step", registry=r
        )
        self.outer_steps = Counter("swarmd_outer_steps", "Outer steps by result", ["result"], registry=r)
        self.outer_exchange = Histogram(
            "swarmd_outer_exchange_duration_seconds", "Swap of outer payloads with a partner, first chunk to verdict",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.partner_wait = Histogram(
            "swarmd_outer_partner_wait_seconds", "Time from an outer boundary until paired (or the deadline)",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.pulls_clipped = Counter(
            "swarmd_outer_pulls_clipped", "Paired outer steps with a partner met for the first time that lay far: "
            "its pull was clipped", registry=r,
        )
        self.divergence = Gauge(
            "swarmd_replica_divergence", "||phi - phi_partner|| / ||phi|| at the latest exchange", registry=r
        )
        self.samples = Counter("swarmd_samples", "Samples processed by this node's stage", registry=r)
        self.tokens = Counter("swarmd_tokens", "Tokens processed by this node's stage", registry=r)
        self.loss = Gauge("swarmd_loss", "Training loss of the latest completed microbatch", registry=r)
        self.eval_loss = Gauge(
            "swarmd_eval_loss",
            "Held-out loss: on a driver the mean of its latest evaluation pass, on the last stage the mean of the "
            "latest evaluation microbatches it scored",
            registry=r,
        )
        self.eval_passes = Counter("swarmd_eval_passes", "Evaluation passes this driver completed", registry=r)
        self.staleness = Histogram(
            "swarmd_gradient_staleness_steps",
            "Inner steps between a microbatch's forward and its backward on this stage (the gradient is taken at "
            "the forward's weights and applied this many steps later)",
            buckets=STALENESS_BUCKETS, registry=r,
        )
        self.weight_stashes = Gauge(
            "swarmd_weight_stashes", "Copies of older weights kept for microbatches in flight", registry=r
        )
        self.throughput = Gauge(
            "swarmd_throughput_samples_per_second", "Measured compute throughput of this node", registry=r
        )
        self.rpc_latency = Histogram(
            "swarmd_rpc_duration_seconds", "RPC latency, caller side, send to reply",
            ["rpc"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.handler_latency = Histogram(
            "swarmd_handler_duration_seconds", "RPC handling time, server side, request read to reply",
            ["rpc"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.bytes_sent = Counter("swarmd_sent_bytes", "Payload bytes sent, by channel", ["channel"], registry=r)
        self.bytes_received = Counter(
            "swarmd_received_bytes", "Payload bytes received, by channel", ["channel"], registry=r
        )
        self.compression_ratio = Gauge(
            "swarmd_compression_ratio", "Raw fp32 bytes over wire bytes of the latest tensor sent, by channel",
            ["channel"], registry=r,
        )
        self.live_peers = Gauge("swarmd_live_peers", "Live peers per stage, as seen in the DHT", ["stage"], registry=r)
        self.state_sync = Histogram(
            "swarmd_state_sync_seconds", "Download of a stage's whole state at a join or a move, first manifest to done",
            buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800), registry=r,
        )
        self.checkpoints = Counter("swarmd_checkpoints", "Checkpoints written, by result", ["result"], registry=r)
        self.stage_moves = Counter("swarmd_stage_moves", "Moves of this node to another stage (rebalancing)", registry=r)
        self.queue_depth = Gauge("swarmd_queue_depth", "Tasks waiting for or running on the compute lane", registry=r)
        self.inflight = Gauge("swarmd_inflight_microbatches", "Microbatches held for backward", registry=r)
        self.route_failures = Counter(
            "swarmd_route_failures", "Hops that failed or timed out and were rerouted", registry=r
        )
        self.microbatches = Counter(
            "swarmd_microbatches", "Microbatches by how they ended, on the driver", ["result"], registry=r
        )
        self.rejected = Counter(
            "swarmd_rejected_messages", "Incoming messages rejected, by reason", ["reason"], registry=r
        )
        self.dropped_requests = Counter(
            "swarmd_dropped_requests", "Incoming requests whose stream ended before the whole request arrived",
            registry=r,
        )
        self.open_streams = Gauge(
            "swarmd_open_streams", "Inbound RPC streams being served now (bounded by Limits.max_open_streams)",
            registry=r,
        )
        # swarmd_process_* (node and p2pd) and swarmd_gpu_* (where NVML is present), read at scrape time
        self.host = HostCollector(p2pd_pid)
        r.register(self.host)
        # Pre-create the fixed label values so every series exists (and dashboards show 0, not "no data").
        for channel in CHANNELS:
            self.bytes_sent.labels(channel)
            self.bytes_received.labels(channel)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for result in MICROBATCH_RESULTS:
            self.microbatches.labels(result)
        for result in OUTER_RESULTS:
            self.outer_steps.labels(result)
        for result in CHECKPOINT_RESULTS:
            self.checkpoints.labels(result)
        for rpc in RPCS:
            self.rpc_latency.labels(rpc)
            self.handler_latency.labels(rpc)

    def set_live_peers(self, peers_per_stage: list[int]) -> None:
        for stage, count in enumerate(peers_per_stage):
            self.live_peers.labels(str(stage)).set(count)


class SwarmMetrics:
    """Swarm-wide gauges from the run's DHT records, exported by the seed (or a node run with --swarm-metrics)
    into its registry. Labels: stage and result only, never a peer, so one scrape of one node shows the
    whole swarm, NATed volunteers included."""

    def __init__(self, registry: CollectorRegistry, num_stages: int):
        r = registry
        self.num_stages = num_stages
        self.nodes = Gauge("swarmd_swarm_nodes", "Live serving peers in the run's records, all stages", registry=r)
        self.peers = Gauge("swarmd_swarm_peers", "Live serving peers per stage, from the run's records",
                           ["stage"], registry=r)
        self.throughput = Gauge(
            "swarmd_swarm_throughput_samples_per_second", "Summed announced throughput of the stage's peers",
            ["stage"], registry=r,
        )
        self.inner_step_min = Gauge("swarmd_swarm_inner_step_min", "Lowest inner step among the stage's peers "
                                    "(NaN: no peer)", ["stage"], registry=r)
        self.inner_step_max = Gauge("swarmd_swarm_inner_step_max", "Highest inner step among the stage's peers "
                                    "(NaN: no peer)", ["stage"], registry=r)
        self.loss = Gauge(
            "swarmd_swarm_loss", "Mean of the latest training losses the stage's peers announce (the last stage: "
            "the model's loss; NaN: none announced)", ["stage"], registry=r,
        )
        self.outer_steps = Gauge(
            "swarmd_swarm_outer_steps", "Outer steps by result, summed over the stage's live peers (falls when a "
            "peer leaves)", ["stage", "result"], registry=r,
        )
        self.joins = Counter("swarmd_swarm_joins", "Peers that appeared in the run's records between two reads",
                             registry=r)
        self.leaves = Counter("swarmd_swarm_leaves", "Peers that disappeared from the run's records between two "
                              "reads (left, withdrawn or expired)", registry=r)
        self._seen: frozenset[str] | None = None

    def update(self, view: SwarmView) -> None:
        """Set the gauges to ``view``; count the peers that joined or left since the previous view. The first
        view is the baseline: a node that starts watching a running swarm counts no joins for those present."""
        nan = float("nan")
        self.nodes.set(view.nodes)
        for s in view.stages:
            stage = str(s.stage)
            self.peers.labels(stage).set(s.peers)
            self.throughput.labels(stage).set(s.throughput)
            self.inner_step_min.labels(stage).set(nan if s.inner_step_min is None else s.inner_step_min)
            self.inner_step_max.labels(stage).set(nan if s.inner_step_max is None else s.inner_step_max)
            self.loss.labels(stage).set(nan if s.loss is None else s.loss)
            for result, count in s.outer_by_result().items():
                self.outer_steps.labels(stage, result).set(count)
        if self._seen is not None:
            self.joins.inc(len(view.peer_ids - self._seen))
            self.leaves.inc(len(self._seen - view.peer_ids))
        self._seen = view.peer_ids


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # a scrape every few seconds is not news
        pass


def _plain(start_response: Callable, status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
           extra: tuple[tuple[str, str], ...] = ()) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"), *extra])
    return [body]


# The page may run its own inline script and style and fetch from this node only: nothing from outside.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def status_app(registry: CollectorRegistry, status_json: Callable[[], bytes], page: bytes) -> Callable:
    """The node's HTTP endpoints: /metrics (Prometheus), / (the status page), /status.json, /healthz."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        path, method = environ.get("PATH_INFO", "/"), environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if method not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", b"GET only\n", extra=(("Allow", "GET, HEAD"),))
        if path == "/":
            return _plain(start_response, "200 OK", page, "text/html; charset=utf-8",
                          (("Content-Security-Policy", PAGE_POLICY),))
        if path == "/status.json":
            return _plain(start_response, "200 OK", status_json(), "application/json")
        if path == "/healthz":
            return _plain(start_response, "200 OK", b"ok\n")
        return _plain(start_response, "404 Not Found", b"not found: try /, /metrics, /status.json or /healthz\n")

    return app


class MetricsServer:
    """The node's HTTP endpoint: /metrics, the status page, /status.json, /healthz. A WSGI server in its own
    daemon thread (I/O at the edge, off the event loop); it reads only the registry (thread-safe) and the
    status JSON, which the loop hands over as finished bytes."""

    def __init__(self, metrics: NodeMetrics, host: str, port: int,
                 status_json: Callable[[], bytes] = lambda: b"{}", page: bytes = b""):
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("_Server", (ThreadingWSGIServer,), {"address_family": family})
        self._server: WSGIServer = make_server(host, port, status_app(metrics.registry, status_json, page),
                                               server_class, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="swarmd-http", daemon=True)
        self._thread.start()
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
