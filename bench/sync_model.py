"""Outer-sync time per replica for N = 16 to 1024, projected from the costs bench/averaging.py measured.

    python bench/averaging.py --no-shaped --sizes 1M,10M --replicas 2,4,8,16 --straggler --json avg.json
    python bench/sync_model.py avg.json [--params 10M] [--network loopback] [--max-n 1024]

The model, per method, fitted by least squares on relative errors to the measured N = 2..16 points (every size
of one network):

- NoLoCo: ``t = pair0 + pair1 * log2(N) + bytes * tau``. One partner whatever N is, so the bytes per replica
  (phi and theta - phi as int8 blocks, measured) do not grow with N; pairing reads the DHT ready board, whose
  lookups take O(log N) hops.
- all-reduce (hivemind's butterfly): ``t = match0 + match1 * (N - 1) + 2 (N - 1) / N * P * b * tau``.
  Matchmaking gathers the N - 1 other members one request at a time, and each member exchanges a part with
  each of the N - 1 others in both phases; the bytes per replica are computed for b bytes per element.

It then prints the fit against every measured point, the fitted per-message costs, the projection for one
model size, and the N at which the two curves cross. With ``--straggler`` (default on) it adds the waiting
a synchronous all-reduce forces in the straggler scenario: every replica waits for the slowest of N, whose
compute time is log-normal (sigma 0.5) with one replica 4x slower; the expected wait E[max] - E[own] is
computed by Monte Carlo. NoLoCo pairs with whoever is ready, so no such term enters its curve; its measured
straggler waits are printed beside it.

Limits, stated where the numbers are read (bench/RESULTS.md): on one 2-core machine the N = 16 points share
two cores between 16 peers, so the per-N terms absorb CPU contention that separate machines would not have;
the projection is of this fit, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

MIB = 1 << 20
ALLREDUCE_BYTES_PER_ELEMENT = {"allreduce": 4, "allreduce-fp16": 2, "allreduce-int8": 1}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMG" else text) * scale)


def lstsq(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares with non-negative coefficients (a cost is never negative): normal equations, and a
    coefficient that comes out negative is dropped (fixed at 0) and the rest refitted."""
    k = len(rows[0])
    active = list(range(k))
    while True:
        a = [[sum(r[i] * r[j] for r in rows) for j in active] for i in active]
        b = [sum(r[i] * y for r, y in zip(rows, ys)) for i in active]
        sol = _solve(a, b)
        if all(x >= 0 for x in sol) or len(active) == 1:
            out = [0.0] * k
            for i, x in zip(active, sol):
                out[i] = max(0.0, x)
            return out
        active.pop(min(range(len(sol)), key=lambda i: sol[i]))


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (tiny systems)."""
    n = len(b)
    m = [row[:] + [bi] for row, bi in zip(a, b)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        if abs(m[c][c]) < 1e-300:
            continue
        for r in range(n):
            if r != c:
                f = m[r][c] / m[c][c]
                m[r] = [x - f * y for x, y in zip(m[r], m[c])]
    return [m[i][n] / m[i][i] if abs(m[i][i]) > 1e-300 else 0.0 for i in range(n)]


def features(method: str, n: int, sent_bytes: float) -> list[float]:
    """The model's terms for one point: [1, per-N term, bytes sent per replica]."""
    return [1.0, math.log2(n) if method == "noloco" else n - 1.0, sent_bytes]


def allreduce_bytes(method: str, n: int, numel: int) -> float:
    return 2 * (n - 1) / n * numel * ALLREDUCE_BYTES_PER_ELEMENT[method]


def straggler_wait(n: int, base_s: float, sigma: float = 0.5, slow: float = 4.0, draws: int = 4000) -> float:
    """E[max_i c_i - c_j] over replicas j: the mean wait a synchronous step forces per replica and outer step."""
    rng = random.Random(n)
    total = 0.0
    for _ in range(draws):
        c = [base_s * rng.lognormvariate(0.0, sigma) * (slow if i == 0 else 1.0) for i in range(n)]
        total += max(c) - sum(c) / n
    return total / draws


def crossing(ns: list[int], a: list[float], b: list[float]) -> str:
    """Where curve a (all-reduce) goes from below to above (or back) curve b (NoLoCo)."""
    out = []
    for i in range(1, len(ns)):
        before, after = a[i - 1] - b[i - 1], a[i] - b[i]
        if (before < 0) != (after < 0):
            out.append(f"between N = {ns[i - 1]} and {ns[i]} ({'all-reduce' if after > 0 else 'NoLoCo'} slower after)")
    if out:
        return "; ".join(out)
    return f"no crossing in {ns[0]}..{ns[-1]}: {'all-reduce' if a[-1] > b[-1] else 'NoLoCo'} is slower throughout"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="JSON written by bench/averaging.py --json")
    parser.add_argument("--params", default="10M", help="model size of the projection")
    parser.add_argument("--network", default="loopback")
    parser.add_argument("--max-n", type=int, default=1024)
    parser.add_argument("--straggler-base-s", type=float, default=None,
                        help="median compute per outer step for the straggler term (default: the bench's, else 2)")
    args = parser.parse_args()
    data = json.loads(args.results.read_text())
    params = parse_size(args.params)
    rows = [r for r in data["rows"] if r["network"] == args.network]
    methods = sorted({m for r in rows for m, res in r["results"].items() if "seconds" in res},
                     key=lambda m: (m == "noloco", m))
    if "noloco" not in methods:
        print("no NoLoCo points in the results", file=sys.stderr)
        return 1

    fits: dict[str, list[float]] = {}
    print(f"fit to the measured points ({args.network}); model s vs measured s")
    print("| method | N | params | measured s | model s | error |\n|---|---:|---|---:|---:|---:|")
    nl_bytes_per_param = []
    for m in methods:
        pts = [(r["n"], r["numel"], r["results"][m]) for r in rows if "seconds" in r["results"].get(m, {})]
        xs = [features(m, n, res["sent_mib_per_peer"] * MIB) for n, _, res in pts]
        ys = [res["seconds"] for _, _, res in pts]
        # relative errors: each point scaled by its own time, so the 0.3 s points weigh as much as the 10 s ones
        fits[m] = lstsq([[f / y for f in x] for x, y in zip(xs, ys)], [1.0] * len(ys))
        if m == "noloco":
            nl_bytes_per_param += [res["sent_mib_per_peer"] * MIB / numel for _, numel, res in pts]
        for (n, numel, _), x, y in sorted(zip(pts, xs, ys), key=lambda t: (t[0][1], t[0][0])):
            model = sum(c * f for c, f in zip(fits[m], x))
            print(f"| {m} | {n} | {numel / 1e6:g}M | {y:.2f} | {model:.2f} | {100 * (model - y) / y:+.0f}% |")

    print("\nfitted per-message costs")
    for m, (c0, c1, tau) in fits.items():
        per_n = "per log2(N) (DHT pairing)" if m == "noloco" else "per other member (matchmaking, part exchanges)"
        rate = f"{8 / tau / 1e6:.0f} Mbit/s" if tau > 0 else "inf"
        print(f"- {m}: fixed {c0:.3f} s, {c1:.3f} s {per_n}, {tau * 1e9:.2f} ns per byte sent ({rate})")
    pair = [r["results"]["noloco"].get("pair_wait_s") for r in rows if "pair_wait_s" in r["results"].get("noloco", {})]
    if pair:
        print(f"- NoLoCo measured pairing latency (ready board read + proposal), mean per peer: "
              f"{min(pair):.2f} to {max(pair):.2f} s")

    bpp = sum(nl_bytes_per_param) / len(nl_bytes_per_param)
    ns = [2**k for k in range(1, int(math.log2(args.max_n)) + 1)]
    curves = {}
    for m, coef in fits.items():
        curves[m] = [sum(c * f for c, f in zip(coef, features(
            m, n, bpp * params if m == "noloco" else allreduce_bytes(m, n, params)))) for n in ns]
    base_s = args.straggler_base_s
    if base_s is None:
        base_s = 2.0
        if data.get("stragglers"):
            computes = sorted(c for s in data["stragglers"] for rep in s["compute"][1:] for c in rep)
            base_s = computes[len(computes) // 2]
    wait = [straggler_wait(n, base_s) for n in ns]

    print(f"\nprojection, {params / 1e6:g}M parameters, s per replica per outer sync "
          f"(straggler: + the all-reduce's forced wait, compute median {base_s:.1f} s, sigma 0.5, one replica 4x)")
    ar = [m for m in methods if m != "noloco"]
    head = ["N", "NoLoCo"] + ar + [f"{m} + straggler wait" for m in ar]
    print("| " + " | ".join(head) + " |\n|" + "---:|" * len(head))
    for i, n in enumerate(ns):
        if n < 16 and n != 2:
            continue
        cells = [str(n), f"{curves['noloco'][i]:.2f}"] + [f"{curves[m][i]:.2f}" for m in ar]
        cells += [f"{curves[m][i] + wait[i]:.2f}" for m in ar]
        print("| " + " | ".join(cells) + " |")
    print()
    for m in ar:
        print(f"{m} vs NoLoCo, sync time: {crossing(ns, curves[m], curves['noloco'])}")
        with_wait = [a + w for a, w in zip(curves[m], wait)]
        print(f"{m} vs NoLoCo, with the straggler wait: {crossing(ns, with_wait, curves['noloco'])}")
    for s in data.get("stragglers", []):
        flat = [w for ws in s["waits"] for w in ws]
        print(f"measured straggler scenario, N = {s['n']}, {s['method']}: mean wait {sum(flat) / len(flat):.2f} s "
              f"per replica per outer step" + (f" (model's forced wait for all-reduce {straggler_wait(s['n'], base_s):.2f} s)"
                                               if s["method"] != "noloco" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
