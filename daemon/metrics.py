"""Every Prometheus metric a node exports, defined once, in a registry owned by the node."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from swarmd.protocols.errors import REJECT_REASONS
from swarmd.protocols.rpc import METRIC_LABELS

CHANNELS = ("activations", "gradients", "averaging", "state")
RPCS = tuple(METRIC_LABELS.values())
MICROBATCH_RESULTS = ("completed", "dropped", "expired")
OUTER_RESULTS = ("paired", "solo", "rejected", "failed")
CHECKPOINT_RESULTS = ("written", "failed")
# Latency buckets from loopback (sub-ms) to slow volunteer links (tens of seconds).
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class NodeMetrics:
    """The node's metric catalog. Labels take small fixed value sets only (no peer or microbatch ids)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.info = Info("swarmd", "Static facts about this node", registry=r)
        self.stage = Gauge("swarmd_stage", "Pipeline stage this node serves (-1: none)", registry=r)
        self.num_stages = Gauge("swarmd_stages", "Number of pipeline stages in the run", registry=r)
        self.inner_steps = Counter("swarmd_inner_steps", "Inner optimizer steps taken", registry=r)
        self.outer_steps = Counter("swarmd_outer_steps", "Outer steps by result", ["result"], registry=r)
        self.outer_exchange = Histogram(
            "swarmd_outer_exchange_duration_seconds", "Swap of outer payloads with a partner, first chunk to verdict",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.partner_wait = Histogram(
            "swarmd_outer_partner_wait_seconds", "Time from an outer boundary until paired (or the deadline)",
            buckets=LATENCY_BUCKETS, registry=r,
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


class MetricsServer:
    """The /metrics HTTP endpoint (prometheus_client's server thread: I/O at the edge, off the loop)."""

    def __init__(self, metrics: NodeMetrics, host: str, port: int):
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
        self._server: WSGIServer = server
        self._thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
