"""The node's status page: its JSON document (``/status.json``, ``swarmd status --json``), the node's recent
history, and the self-contained HTML page (``/``) that draws them.

The event loop builds the document and hands it over as finished JSON bytes (``StatusBoard``); the HTTP
thread only ever reads those bytes.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from swarmd.daemon.swarm_view import SwarmView

HISTORY_POINTS = 360  # one point per progress line: 30 minutes at the default 5 s


@dataclass(frozen=True)
class NodeStatus:
    """This node, as its status page shows it. Stage, loss and throughput are None where it has none."""

    peer_id: str
    role: str  # "seed" or "volunteer"
    stage: int | None
    inner_step: int
    outer_step: int | None
    loss: float | None
    eval_loss: float | None
    throughput: float | None  # samples/s its compute lane sustains (what its heartbeat announces)


class History:
    """The node's own recent (time, loss, eval loss, samples/s) points, oldest first; bounded (nodes run for
    weeks). Touched only on the event loop."""

    def __init__(self, maxlen: int = HISTORY_POINTS):
        self._points: deque[dict[str, float | None]] = deque(maxlen=maxlen)

    def add(self, t: float, loss: float | None, eval_loss: float | None, samples_per_s: float | None) -> None:
        self._points.append({"t": _finite(t), "loss": _finite(loss), "eval_loss": _finite(eval_loss),
                             "samples_per_s": _finite(samples_per_s)})

    def points(self) -> list[dict[str, float | None]]:
        return list(self._points)

    def __len__(self) -> int:
        return len(self._points)


def _finite(x: float | None) -> float | None:
    """JSON has no NaN or infinity (a browser's JSON.parse refuses them): those become null."""
    return float(x) if x is not None and math.isfinite(x) else None


def stage_table(view: SwarmView) -> list[dict[str, Any]]:
    return [{
        "stage": s.stage, "peers": s.peers, "throughput": _finite(s.throughput),
        "inner_step_min": s.inner_step_min, "inner_step_max": s.inner_step_max, "loss": _finite(s.loss),
        "outer_steps": s.outer_by_result(),
    } for s in view.stages]


def status_document(run_id: str, view: SwarmView, node: NodeStatus | None = None,
                    history: list[dict[str, float | None]] | None = None, now: float | None = None) -> dict[str, Any]:
    """The status document. ``node`` and ``history`` describe the node that serves it: ``swarmd status --json``
    has neither (``"node": null``, ``"history": []``)."""
    node_doc = None
    if node is not None:
        node_doc = {k: _finite(v) if isinstance(v, float) else v for k, v in asdict(node).items()}
    return {
        "run_id": run_id,
        "time": time.time() if now is None else now,
        "nodes": view.nodes,
        "stages": stage_table(view),
        "node": node_doc,
        "history": list(history or []),
    }


def encode_document(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()


class StatusBoard:
    """The latest status document as JSON bytes: published on the event loop, read by the HTTP thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._json = b'{"run_id":null,"nodes":0,"stages":[],"node":null,"history":[]}'

    def publish(self, doc: dict[str, Any]) -> None:
        data = encode_document(doc)  # serialized here, on the loop: the thread never sees a live object
        with self._lock:
            self._json = data

    def json(self) -> bytes:
        with self._lock:
            return self._json


# The page: no external resource (the server's Content-Security-Policy forbids any). Peer ids and the run id
# come from the records: they are set with textContent, never parsed as HTML.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>swarmd status</title>
<style>
:root{--bg:#f7f7f5;--fg:#1d1d1b;--mute:#6b6b66;--card:#fff;--line:#e3e3de;--a:#2563eb;--b:#d97706;--c:#059669}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;background:var(--bg);color:var(--fg)}
header{display:flex;align-items:baseline;gap:1rem;padding:.9rem 1.4rem;border-bottom:1px solid var(--line);background:var(--card)}
header h1{font-size:1.15rem;margin:0}header .run{font-weight:600}#conn{margin-left:auto;color:var(--mute)}
#conn.down{color:#b91c1c;font-weight:600}
main{padding:1.2rem 1.4rem;display:grid;gap:1.2rem;grid-template-columns:repeat(auto-fit,minmax(520px,1fr))}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:1rem 1.1rem;overflow-x:auto}
section h2{font-size:.95rem;margin:0 0 .7rem;color:var(--mute);font-weight:600;text-transform:uppercase;letter-spacing:.04em}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.25rem 1rem;margin:0}dt{color:var(--mute)}dd{margin:0;font-variant-numeric:tabular-nums}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.85em;word-break:break-all}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}th,td{padding:.35rem .5rem;text-align:right;border-bottom:1px solid var(--line)}
th,td{white-space:nowrap}th:first-child,td:first-child{text-align:left}th{color:var(--mute);font-weight:600}tr.empty td{color:#b91c1c}
svg{width:100%;height:auto;display:block}.axis{stroke:var(--line)}.tick{fill:var(--mute);font-size:11px}
.line{fill:none;stroke-width:2}.s0{stroke:var(--a)}.s1{stroke:var(--b)}.s2{stroke:var(--c)}
.legend{display:flex;gap:1rem;color:var(--mute);font-size:.85rem;margin-top:.3rem}.legend i{display:inline-block;width:.9rem;height:3px;vertical-align:middle;margin-right:.3rem}
.nodata{fill:var(--mute);font-size:13px}
</style></head><body>
<header><h1>swarmd</h1><span>run <span class="run" id="run">&hellip;</span></span><span id="nodes"></span><span id="conn">connecting&hellip;</span></header>
<main>
<section><h2>This node</h2><dl id="node"></dl></section>
<section><h2>Stages</h2><table id="stages"><thead><tr><th>Stage</th><th>Peers</th><th>Samples/s</th><th>Inner step</th><th>Loss</th><th title="outer steps by result: paired / solo / rejected / failed">Outer p/s/r/f</th></tr></thead><tbody id="stage-rows"></tbody></table></section>
<section><h2>Loss</h2><svg id="loss-chart" viewBox="0 0 560 220" role="img" aria-label="loss over time"></svg>
<div class="legend"><span><i style="background:var(--a)"></i>training loss</span><span><i style="background:var(--b)"></i>held-out loss</span></div></section>
<section><h2>Throughput</h2><svg id="tput-chart" viewBox="0 0 560 220" role="img" aria-label="samples per second over time"></svg>
<div class="legend"><span><i style="background:var(--c)"></i>samples/s</span></div></section>
</main>
<script>
"use strict";
const $ = id => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const num = (v, d) => (v === null || v === undefined) ? "\\u2013" : Number(v).toFixed(d);
function el(tag, attrs, text) {
  const e = tag === "tr" || tag === "td" || tag === "dt" || tag === "dd" ? document.createElement(tag) : document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function renderNode(n) {
  const rows = n === null ? [["role", "status reader (no node)"]] : [
    ["peer id", n.peer_id], ["role", n.role], ["stage", n.stage === null ? "\\u2013" : String(n.stage)],
    ["inner step", String(n.inner_step)], ["outer step", n.outer_step === null ? "\\u2013" : String(n.outer_step)],
    ["loss", num(n.loss, 4)], ["held-out loss", num(n.eval_loss, 4)], ["samples/s", num(n.throughput, 1)]];
  $("node").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", k === "peer id" ? {class: "mono"} : {}, v)]));
}
function renderStages(stages) {
  $("stage-rows").replaceChildren(...stages.map(s => {
    const tr = el("tr", {class: "stage-row" + (s.peers === 0 ? " empty" : ""), "data-stage": String(s.stage)});
    const steps = s.inner_step_min === null ? "\\u2013" : (s.inner_step_min === s.inner_step_max ? String(s.inner_step_min) : s.inner_step_min + "\\u2013" + s.inner_step_max);
    const o = s.outer_steps;
    for (const v of [String(s.stage), String(s.peers), num(s.throughput, 1), steps, num(s.loss, 4), [o.paired, o.solo, o.rejected, o.failed].join(" / ")])
      tr.appendChild(el("td", {}, v));
    return tr;
  }));
}
function chart(svg, series, digits) {
  const W = 560, H = 220, L = 52, R = 12, T = 10, B = 26;
  const pts = series.flatMap(s => s.points.filter(p => p[1] !== null));
  const kids = [];
  if (pts.length === 0) {
    kids.push(el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "nodata"}, "no history yet (this node does not train, or just started)"));
    svg.replaceChildren(...kids);
    return;
  }
  let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
  let y0 = Math.min(...pts.map(p => p[1])), y1 = Math.max(...pts.map(p => p[1]));
  if (x1 === x0) x0 -= 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.06; y0 -= pad; y1 += pad;
  const sx = t => L + (t - x0) / (x1 - x0) * (W - L - R), sy = v => T + (y1 - v) / (y1 - y0) * (H - T - B);
  kids.push(el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"}), el("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}));
  for (let i = 0; i <= 3; i++) {
    const v = y0 + (y1 - y0) * i / 3, y = sy(v);
    kids.push(el("line", {x1: L, y1: y, x2: W - R, y2: y, class: "axis"}), el("text", {x: L - 6, y: y + 4, "text-anchor": "end", class: "tick"}, v.toFixed(digits)));
  }
  const ago = t => { const s = Math.round(x1 - t); return s >= 120 ? "-" + Math.round(s / 60) + " min" : "-" + s + " s"; };
  kids.push(el("text", {x: L, y: H - 8, class: "tick"}, ago(x0)), el("text", {x: W - R, y: H - 8, "text-anchor": "end", class: "tick"}, "now"));
  series.forEach((s, i) => {
    let d = "", pen = "M";  // a gap (null) is bridged: the held-out loss only changes at each evaluation pass
    for (const [t, v] of s.points) {
      if (v === null) continue;
      d += pen + sx(t).toFixed(1) + " " + sy(v).toFixed(1) + " "; pen = "L";
    }
    if (d) kids.push(el("path", {d: d.trim(), class: "line s" + (s.color ?? i), "data-series": s.name}));
  });
  svg.replaceChildren(...kids);
}
function render(doc) {
  $("run").textContent = doc.run_id === null ? "\\u2026" : doc.run_id;
  $("nodes").textContent = doc.nodes + " node" + (doc.nodes === 1 ? "" : "s") + " serving";
  renderNode(doc.node);
  renderStages(doc.stages);
  const h = doc.history, t = h.map(p => p.t);
  chart($("loss-chart"), [{name: "loss", points: h.map((p, i) => [t[i], p.loss])}, {name: "eval_loss", points: h.map((p, i) => [t[i], p.eval_loss])}], 3);
  chart($("tput-chart"), [{name: "samples_per_s", color: 2, points: h.map((p, i) => [t[i], p.samples_per_s])}], 1);
}
async function poll() {
  try {
    const reply = await fetch("status.json", {cache: "no-store"});
    if (!reply.ok) throw new Error(reply.status);
    render(await reply.json());
    $("conn").textContent = "updated " + new Date().toLocaleTimeString(); $("conn").className = "";
  } catch (e) {
    $("conn").textContent = "node unreachable"; $("conn").className = "down";
  }
  setTimeout(poll, 2000);
}
poll();
</script></body></html>
""".encode()
