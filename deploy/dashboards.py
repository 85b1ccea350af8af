"""Generate swarmd's Grafana dashboards (deploy/grafana/dashboards/*.json) with grafana-foundation-sdk.

    python deploy/dashboards.py          # (re)write the JSON beside the provisioning files
    python deploy/dashboards.py --check  # exit 1 if the committed JSON differs from what this generates

Every query uses names from the metrics catalog (daemon/metrics.py, daemon/host_metrics.py, and the seed's
swarm-wide gauges). A node is Prometheus' ``instance``; a node's stage comes from the ``swarmd_stage`` gauge
(its value, -1 for none), turned into a ``stage`` label by ``count_values`` and joined on ``instance``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement, SortOrder, TooltipDisplayMode
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, DataSourceRef, VariableRefresh, VariableSort

OUT = Path(__file__).resolve().parent / "grafana" / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="prometheus")  # the provisioned datasource's uid
RATE = "$__rate_interval"
NODE = 'instance=~"$instance"'

# {instance, stage} = 1 for every node that serves a stage: multiply a per-node series by it to add its stage
STAGE = 'count_values without () ("stage", swarmd_stage >= 0)'


def by_stage(expr: str) -> str:
    """``expr`` (one series per node, or per node and ``le``) with the node's ``stage`` label added."""
    return f"({expr}) * on (instance) group_left (stage) {STAGE}"


def quantile(q: float, histogram: str, by: str, selector: str = "") -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({histogram}_bucket{{{selector}}}[{RATE}])))"


def query(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def p50_p95(histogram: str, by: str = "instance", selector: str = NODE) -> list[prometheus.Dataquery]:
    """The median and the 95th percentile of ``histogram`` per ``by``, as two queries."""
    return [query(quantile(q, histogram, by, selector), f"{{{{{by}}}}} {name}") for q, name in ((0.5, "p50"), (0.95, "p95"))]


class Board:
    """One dashboard: panels laid out left to right, ids in order."""

    def __init__(self, uid: str, title: str, description: str, per_node: bool = True):
        self.builder = (
            db.Dashboard(title).uid(uid).description(description).tags(["swarmd"])
            .time("now-1h", "now").refresh("30s").tooltip(DashboardCursorSync.CROSSHAIR).readonly()
        )
        if per_node:
            self.builder.with_variable(
                db.QueryVariable("instance").label("node").datasource(DATASOURCE)
                .query("label_values(swarmd_stage, instance)").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                .sort(VariableSort.ALPHABETICAL_ASC).multi(True).include_all(True).all_value(".*")
            )
        self.next_id = 1

    def panel(self, kind: Callable[[], timeseries.Panel | stat.Panel], title: str, description: str, unit: str,
              targets: list[prometheus.Dataquery], width: int = 12, height: int = 8) -> None:
        p = kind().id(self.next_id).title(title).description(description).unit(unit).datasource(DATASOURCE)
        for ref, target in zip("ABCDEFGH", targets, strict=False):
            p.with_target(target.ref_id(ref))
        if isinstance(p, timeseries.Panel):
            p.legend(cb.VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM)
                     .show_legend(True))
            p.tooltip(cb.VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING))
        else:
            p.reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        self.builder.with_panel(p.span(width).height(height))
        self.next_id += 1

    def series(self, title: str, description: str, unit: str, *targets: prometheus.Dataquery, width: int = 12) -> None:
        self.panel(timeseries.Panel, title, description, unit, list(targets), width)

    def stat(self, title: str, description: str, unit: str, *targets: prometheus.Dataquery, width: int = 6) -> None:
        self.panel(stat.Panel, title, description, unit, list(targets), width, height=4)


def swarm_overview() -> Board:
    b = Board("swarmd-overview", "swarmd / swarm overview",
              "The whole swarm from the seed's swarm-wide gauges (read from the run's DHT records: NATed volunteers "
              "included) and from the nodes Prometheus scrapes.", per_node=False)
    b.stat("Nodes online", "Live peers in the run's DHT records, all stages (seed's view)", "none",
           query("max(swarmd_swarm_nodes)", "nodes"))
    b.stat("Nodes scraped", "Nodes whose /metrics Prometheus reaches now", "none",
           query('sum(up{job="swarmd"})', "scraped"))
    b.stat("Joins (1h)", "Peers that appeared in the records in the last hour", "none",
           query("max(increase(swarmd_swarm_joins_total[1h]))", "joins"))
    b.stat("Leaves (1h)", "Peers that disappeared from the records in the last hour", "none",
           query("max(increase(swarmd_swarm_leaves_total[1h]))", "leaves"))
    b.series("Peers per stage", "Live peers serving each stage (seed's view)", "none",
             query("max by (stage) (swarmd_swarm_peers)", "stage {{stage}}"))
    b.series("Joins and leaves", "Peers appearing in and disappearing from the records", "none",
             query(f"max(increase(swarmd_swarm_joins_total[{RATE}]))", "joins"),
             query(f"max(increase(swarmd_swarm_leaves_total[{RATE}]))", "leaves"))
    b.series("Inner step, min and max per stage", "Lowest and highest inner step among a stage's replicas "
             "(seed's view): the gap is the spread across nodes", "none",
             query("max by (stage) (swarmd_swarm_inner_step_min)", "stage {{stage}} min"),
             query("max by (stage) (swarmd_swarm_inner_step_max)", "stage {{stage}} max"))
    b.series("Inner step spread per stage", "Highest minus lowest inner step among a stage's replicas", "none",
             query("max by (stage) (swarmd_swarm_inner_step_max) - max by (stage) (swarmd_swarm_inner_step_min)",
                   "stage {{stage}}"))
    b.series("Outer steps per stage by result", "Outer steps summed over a stage's heartbeats (seed's view)",
             "none", query("max by (stage, result) (swarmd_swarm_outer_steps)", "stage {{stage}} {{result}}"))
    b.series("Outer step, min and max per stage", "Outer steps taken by the scraped nodes of each stage since "
             "they started: the gap is the spread across nodes", "none",
             query(f"min by (stage) ({by_stage('sum by (instance) (swarmd_outer_steps_total)')})", "stage {{stage}} min"),
             query(f"max by (stage) ({by_stage('sum by (instance) (swarmd_outer_steps_total)')})", "stage {{stage}} max"))
    b.series("Throughput per stage", "Measured throughput summed over a stage's replicas (seed's view)",
             "none", query("max by (stage) (swarmd_swarm_throughput_samples_per_second)", "stage {{stage}}"))
    b.series("Loss per stage", "Mean of the latest losses the stage's heartbeats carry (seed's view)", "none",
             query("max by (stage) (swarmd_swarm_loss)", "stage {{stage}}"))
    return b


def training() -> Board:
    b = Board("swarmd-training", "swarmd / training", "Loss, throughput and inner-step timing per node.")
    b.series("Loss", "Training loss of each node's latest microbatch, and the held-out loss (drivers: latest "
             "evaluation pass; last stage: latest scored evaluation microbatches)", "none",
             query(f"swarmd_loss{{{NODE}}} and on (instance) swarmd_stage >= 0", "{{instance}} train"),
             query(f"swarmd_eval_loss{{{NODE}}} and on (instance) swarmd_stage >= 0", "{{instance}} held-out"))
    b.series("Tokens per second", "Tokens each node's stage processed, and summed over each stage's replicas",
             "none",
             query(f"rate(swarmd_tokens_total{{{NODE}}}[{RATE}]) and on (instance) swarmd_stage >= 0", "{{instance}}"),
             query(f"sum by (stage) ({by_stage(f'rate(swarmd_tokens_total[{RATE}])')})", "stage {{stage}} total"))
    b.series("Inner step time per stage, p50 and p95", "Wall time between consecutive inner steps, over all "
             "scraped replicas of a stage", "s",
             query(f"histogram_quantile(0.5, sum by (stage, le) ("
                   f"{by_stage(f'rate(swarmd_inner_step_duration_seconds_bucket[{RATE}])')}))", "stage {{stage}} p50"),
             query(f"histogram_quantile(0.95, sum by (stage, le) ("
                   f"{by_stage(f'rate(swarmd_inner_step_duration_seconds_bucket[{RATE}])')}))", "stage {{stage}} p95"))
    b.series("Inner step time per node, p50 and p95", "Wall time between this node's consecutive inner steps", "s",
             *p50_p95("swarmd_inner_step_duration_seconds"))
    b.series("Time since the last inner step", "Seconds since each node's latest inner step (nodes that have "
             "stepped since they started)", "s",
             query(f"time() - (swarmd_last_inner_step_timestamp_seconds{{{NODE}}} > 0)", "{{instance}}"))
    b.series("Inner steps per second", "Inner optimizer steps each node takes", "none",
             query(f"rate(swarmd_inner_steps_total{{{NODE}}}[{RATE}]) and on (instance) swarmd_stage >= 0",
                   "{{instance}}"))
    b.series("Measured throughput", "Each node's measured compute throughput (what routing weighs)", "none",
             query(f"swarmd_throughput_samples_per_second{{{NODE}}} and on (instance) swarmd_stage >= 0",
                   "{{instance}}"))
    b.series("Gradient staleness, p95", "Inner steps between a microbatch's forward and its backward", "none",
             query(quantile(0.95, "swarmd_gradient_staleness_steps", "instance", NODE), "{{instance}}"))
    return b


def pipeline() -> Board:
    b = Board("swarmd-pipeline", "swarmd / pipeline", "Microbatch hops: queues, latency, failures, drops.")
    b.series("Queue depth per stage", "Tasks waiting for or running on the compute lanes of a stage's scraped "
             "replicas, summed", "none",
             query(f"sum by (stage) ({by_stage(f'swarmd_queue_depth{{{NODE}}}')})", "stage {{stage}}"))
    b.series("Microbatches in flight", "Microbatches each node holds for their backward", "none",
             query(f"swarmd_inflight_microbatches{{{NODE}}} and on (instance) swarmd_stage >= 0", "{{instance}}"))
    b.series("Hop latency, p50 and p95", "Caller-side forward and backward RPC latency, send to reply", "s",
             *p50_p95("swarmd_rpc_duration_seconds", "rpc", f'{NODE}, rpc=~"forward|backward"'))
    b.series("Route failures", "Hops that failed or timed out and were rerouted, per second", "none",
             query(f"rate(swarmd_route_failures_total{{{NODE}}}[{RATE}])", "{{instance}}"))
    b.series("Dropped and expired microbatches", "Microbatches the drivers gave up on, per second", "none",
             query(f'sum by (instance, result) (rate(swarmd_microbatches_total{{{NODE}, '
                   f'result=~"dropped|expired"}}[{RATE}]))', "{{instance}} {{result}}"))
    b.series("Completed microbatches", "Microbatches the drivers completed, per second", "none",
             query(f'sum by (instance) (rate(swarmd_microbatches_total{{{NODE}, result="completed"}}[{RATE}]))',
                   "{{instance}}"))
    return b


def averaging() -> Board:
    b = Board("swarmd-averaging", "swarmd / averaging", "Outer steps: NoLoCo exchanges (or the DiLoCo baseline).")
    b.series("Outer steps by result", "Outer steps per second by result (paired, solo, rejected, failed), and the "
             "paired ones with a far partner met for the first time, whose pull was clipped", "none",
             query(f"sum by (result) (rate(swarmd_outer_steps_total{{{NODE}}}[{RATE}]))", "{{result}}"),
             query(f"sum (rate(swarmd_outer_pulls_clipped_total{{{NODE}}}[{RATE}]))", "paired, pull clipped"))
    b.stat("Outer steps taken", "Outer steps by result since the scraped nodes started", "none",
           query(f"sum by (result) (swarmd_outer_steps_total{{{NODE}}})", "{{result}}"), width=12)
    b.series("Exchange duration, p50 and p95", "Swap of outer payloads with a partner, first chunk to verdict",
             "s", *p50_p95("swarmd_outer_exchange_duration_seconds"))
    b.series("Partner wait, p50 and p95", "From an outer boundary until paired (or the deadline)", "s",
             *p50_p95("swarmd_outer_partner_wait_seconds"))
    b.series("Replica divergence", "||phi - phi_partner|| / ||phi|| at each node's latest exchange", "none",
             query(f"swarmd_replica_divergence{{{NODE}}} and on (instance) swarmd_stage >= 0", "{{instance}}"))
    b.series("Averaging bytes", "Outer payload bytes sent and received per second", "Bps",
             query(f'rate(swarmd_sent_bytes_total{{{NODE}, channel="averaging"}}[{RATE}])', "{{instance}} sent"),
             query(f'rate(swarmd_received_bytes_total{{{NODE}, channel="averaging"}}[{RATE}])',
                   "{{instance}} received"))
    return b


def compression() -> Board:
    b = Board("swarmd-compression", "swarmd / compression", "Raw fp32 bytes over wire bytes, per channel.")
    b.series("Compression ratio per channel", "Mean over the scraped nodes of the latest tensor's ratio", "none",
             query(f"avg by (channel) (swarmd_compression_ratio{{{NODE}}})", "{{channel}}"))
    b.series("Compression ratio per node", "Each node's latest tensor's ratio, per channel", "none",
             query(f"swarmd_compression_ratio{{{NODE}}}", "{{instance}} {{channel}}"))
    return b


def network() -> Board:
    b = Board("swarmd-network", "swarmd / network", "Payload bytes per channel and rejected messages.")
    b.series("Bytes sent per channel", "Payload bytes sent per second, summed over the selected nodes", "Bps",
             query(f"sum by (channel) (rate(swarmd_sent_bytes_total{{{NODE}}}[{RATE}]))", "{{channel}}"))
    b.series("Bytes received per channel", "Payload bytes received per second, summed over the selected nodes",
             "Bps", query(f"sum by (channel) (rate(swarmd_received_bytes_total{{{NODE}}}[{RATE}]))", "{{channel}}"))
    b.series("Bytes per node", "Payload bytes each node sends and receives per second, all channels", "Bps",
             query(f"sum by (instance) (rate(swarmd_sent_bytes_total{{{NODE}}}[{RATE}]))", "{{instance}} sent"),
             query(f"sum by (instance) (rate(swarmd_received_bytes_total{{{NODE}}}[{RATE}]))",
                   "{{instance}} received"))
    b.series("Rejected messages by reason", "Incoming messages rejected per second, by reason", "none",
             query(f"sum by (reason) (rate(swarmd_rejected_messages_total{{{NODE}}}[{RATE}]))", "{{reason}}"))
    b.series("Open inbound streams", "Inbound RPC streams each node serves now", "none",
             query(f"swarmd_open_streams{{{NODE}}}", "{{instance}}"))
    b.series("Dropped requests", "Incoming requests whose stream ended before the whole request arrived, per "
             "second", "none", query(f"rate(swarmd_dropped_requests_total{{{NODE}}}[{RATE}])", "{{instance}}"))
    return b


def host() -> Board:
    b = Board("swarmd-host", "swarmd / host", "Memory and CPU of each node and its p2pd; GPUs where NVML is present.")
    b.series("Resident memory", "RSS of the node process and of its p2pd", "bytes",
             query(f"swarmd_process_resident_memory_bytes{{{NODE}}}", "{{instance}} {{process}}"))
    b.series("CPU", "CPU time per second (1 = one core busy) of the node process and of its p2pd", "none",
             query(f"rate(swarmd_process_cpu_seconds_total{{{NODE}}}[{RATE}])", "{{instance}} {{process}}"))
    b.series("GPU memory", "GPU memory in use and in all, per GPU (absent without NVML)", "bytes",
             query(f"swarmd_gpu_memory_used_bytes{{{NODE}}}", "{{instance}} gpu {{gpu}} used"),
             query(f"swarmd_gpu_memory_total_bytes{{{NODE}}}", "{{instance}} gpu {{gpu}} total"))
    b.series("GPU utilization", "Fraction of the last sample period a kernel ran, per GPU (absent without NVML)",
             "percentunit", query(f"swarmd_gpu_utilization_ratio{{{NODE}}}", "{{instance}} gpu {{gpu}}"))
    return b


BOARDS = {"overview": swarm_overview, "training": training, "pipeline": pipeline, "averaging": averaging,
          "compression": compression, "network": network, "host": host}


def render() -> dict[str, str]:
    """{file name: JSON text} of every dashboard."""
    encoder = JSONEncoder(sort_keys=True, indent=2)
    return {f"{name}.json": encoder.encode(make().builder.build()) + "\n" for name, make in BOARDS.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is not up to date")
    args = parser.parse_args()
    rendered = render()
    stale = sorted(name for name, text in rendered.items()
                   if not (OUT / name).exists() or (OUT / name).read_text() != text)
    if args.check:
        for name in stale:
            print(f"{OUT / name} is out of date: run python deploy/dashboards.py", file=sys.stderr)
        return 1 if stale else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (OUT / name).write_text(text)
    print(f"wrote {len(rendered)} dashboards to {OUT} ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
