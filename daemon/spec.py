"""The run spec: what a swarm trains and how. Loaded from TOML, signed by the seed, verified by joiners."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import tomllib
from swarmd.daemon.identity import NodeIdentity, peer_id_from_public_key, verify_signature
from swarmd.protocols.codecs import CODECS
from swarmd.swarm.model import ModelConfig
from swarmd.swarm.stage import PRECISIONS

DEFAULT_SPEC_PATH = Path(__file__).with_name("default_run.toml")


class SpecError(ValueError):
    """The run spec is invalid, or its signature does not check out."""


@dataclass(frozen=True)
class PipelineConfig:
    """How microbatches move: stage count, microbatch shape, in-flight and timing bounds."""

    stages: int = 2
    microbatch_size: int = 8
    seq_len: int = 64
    max_inflight: int = 4  # microbatches one driver keeps in the pipeline at once
    hop_timeout_s: float = 10.0  # one RPC hop, send to ack
    microbatch_deadline_s: float = 60.0  # a microbatch's whole forward + backward
    # Older weight versions a stage keeps so that every backward runs on the weights its forward saw; an
    # inner step that would need one more waits, its gradients accumulating, until the oldest is back.
    weight_stashes: int = 1
    # In-flight microbatches whose autograd graph (activations) a stage keeps for their backward; the others
    # keep only their inputs and re-run the forward at backward time. 0: re-run every forward.
    kept_graphs: int = 4
    # Largest |x| a stage accepts in the activations and gradients it receives ("norm" beyond): a finite but
    # absurd value (3e38) would overflow to Inf in the next matmul. Raise it for models whose hidden states
    # run larger (some large LLMs show a few activations in the thousands).
    max_activation: float = 1e6


@dataclass(frozen=True)
class OptimizerConfig:
    """The inner optimizer (AdamW), stepped once per local batch, and the precision of the passes it steps on."""

    lr: float = 3e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    microbatches_per_step: int = 1
    # "bf16": forward and backward under bf16 autocast on CUDA, with fp32 weights and AdamW state (the master copy)
    # and fp32 activations on the wire. A node on a CPU (or a GPU without bf16) computes in fp32 and says so.
    precision: str = "fp32"


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from: the embedded corpus or local text/jsonl files."""

    source: str = "builtin"  # "builtin" or "files"
    paths: tuple[str, ...] = ()
    jsonl_field: str = "text"
    val_fraction: float = 0.05  # the corpus's last bytes: validation windows, never trained on


@dataclass(frozen=True)
class CompressionConfig:
    """Codec per network channel (see swarmd.protocols.codecs)."""

    activations: str = "int8"
    gradients: str = "int8"
    averaging: str = "int8-ef"  # outer-step payloads (phi and theta - phi)
    block_size: int = 256


@dataclass(frozen=True)
class EvaluationConfig:
    """Held-out evaluation while training: drivers send forward-only microbatches of validation windows."""

    every_steps: int = 100  # a driver's inner steps between evaluation passes (0: never)
    batches: int = 8  # validation microbatches per pass (the same ones every pass)


OUTER_METHODS = ("noloco", "diloco", "none")


@dataclass(frozen=True)
class AveragingConfig:
    """The outer step every ``inner_steps`` inner steps (see swarmd.swarm.outer and swarmd.swarm.diloco)."""

    inner_steps: int = 50  # H
    # NoLoCo. beta = gamma = 1, mu = 0 makes the outer step plain averaging of the pair's weights; it beat the
    # paper's beta = gamma = 0.7, mu = 0.5 (made for 125M-6.8B models) on the demo swarm (bench/sweep.py, RESULTS.md)
    beta: float = 1.0  # weight of the pair's mean pseudo-gradient (outer learning rate)
    gamma: float = 1.0  # pull toward the pair's mean outer weights
    mu: float = 0.0  # outer momentum
    diloco_lr: float = 0.7  # DiLoCo: outer Nesterov SGD
    diloco_momentum: float = 0.9
    pair_timeout_s: float = 10.0  # wait this long at a boundary for a partner, then step solo
    exchange_timeout_s: float = 60.0  # the whole swap of payloads with a partner
    chunk_elements: int = 1 << 20  # elements per exchanged chunk (per tensor)
    # Robust outer steps (RESULTS.md, "poisoning": what honest replicas show, what each bound stops and what it
    # lets through). A payload past a bound is rejected and its sender banned (swarmd.swarm.outer).
    # reject a partner whose phi is farther than this x ||our phi|| (or our drift), unless we meet it for the
    # first time and it lies within max_distance_ratio x our drift
    max_divergence: float = 1.0
    # ... or, if we paired with it before, farther than this x our own drift (||theta - phi||, or our last solo
    # move); a partner met for the first time that lies farther pulls only as far as one at that distance would
    max_distance_ratio: float = 5.0
    # Honest replicas' progress norms differ by several x in the daemon (a payload covers H inner steps give or
    # take those its snapshot waits on the compute lane; early in training each step counts): only absurd
    # progress is rejected, and what gets through is bounded by max_move.
    max_progress_ratio: float = 8.0  # reject a partner whose theta - phi norm exceeds this x ours
    max_move: float = 1.0  # clip the change of phi in one outer step to this x ||phi||
    stall_timeout_s: float = 10.0  # a partner that sends no chunk of its payload for this long is banned
    max_failures: int = 3  # exchanges with one partner failing in a row before it is banned
    ban_outer_steps: int = 32  # a ban lasts this many of our outer steps, doubling for a repeat offender


@dataclass(frozen=True)
class CheckpointConfig:
    """When a node writes its stage's checkpoint (besides at a clean stop)."""

    every_outer_steps: int = 5  # outer boundaries (every averaging.inner_steps inner steps) between writes; 0: never


@dataclass(frozen=True)
class BalancingConfig:
    """Live rebalancing: a serving peer moves to the stage that limits the swarm when that pays."""

    enabled: bool = True
    min_gain: float = 0.2  # move only if the swarm's bottleneck would rise by this fraction
    check_every_s: float = 30.0  # mean seconds between checks (each one randomized 0.5x-1.5x)
    min_dwell_s: float = 60.0  # seconds on a stage before a peer may move again


@dataclass(frozen=True)
class RunSpec:
    """Everything every peer of a run must agree on."""

    run_id: str
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    outer: str = "noloco"  # how replicas of a stage stay consistent: "noloco", "diloco" or "none"
    access: str = "open"  # "open": anyone may join; "private": only holders of a join token the seed signed
    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    balancing: BalancingConfig = field(default_factory=BalancingConfig)

    def __post_init__(self) -> None:
        _check(bool(self.run_id) and len(self.run_id) <= 64 and self.run_id.replace("-", "").replace("_", "").isalnum(),
               f"run.id {self.run_id!r} must be 1-64 letters, digits, '-' or '_'")
        p, o = self.pipeline, self.optimizer
        _check(1 <= p.stages <= self.model.n_layers, f"pipeline.stages must be in 1..{self.model.n_layers} (model.n_layers)")
        _check(1 <= p.microbatch_size <= 4096, "pipeline.microbatch_size must be in 1..4096")
        _check(2 <= p.seq_len <= self.model.max_seq_len, f"pipeline.seq_len must be in 2..{self.model.max_seq_len}")
        _check(1 <= p.max_inflight <= 64, "pipeline.max_inflight must be in 1..64")
        _check(1 <= p.weight_stashes <= 16, "pipeline.weight_stashes must be in 1..16")
        _check(0 <= p.kept_graphs <= 64, "pipeline.kept_graphs must be in 0..64")
        _check(1.0 <= p.max_activation <= 1e30, "pipeline.max_activation must be in 1..1e30")
        _check(p.hop_timeout_s > 0 and p.microbatch_deadline_s > p.hop_timeout_s,
               "need 0 < pipeline.hop_timeout_s < pipeline.microbatch_deadline_s")
        _check(o.lr > 0 and o.weight_decay >= 0 and o.grad_clip > 0, "optimizer lr, grad_clip > 0; weight_decay >= 0")
        _check(o.microbatches_per_step >= 1, "optimizer.microbatches_per_step must be >= 1")
        _check(o.precision in PRECISIONS, f"optimizer.precision = {o.precision!r}; known: {', '.join(PRECISIONS)}")
        _check(self.data.source in ("builtin", "files"), "data.source must be 'builtin' or 'files'")
        _check(self.data.source == "builtin" or bool(self.data.paths), "data.source = 'files' needs data.paths")
        _check(0 < self.data.val_fraction < 0.5, "data.val_fraction must be in (0, 0.5)")
        for channel in ("activations", "gradients", "averaging"):
            codec = getattr(self.compression, channel)
            _check(codec in CODECS, f"compression.{channel} = {codec!r}; known codecs: {', '.join(CODECS)}")
        a = self.averaging
        _check(self.access in ("open", "private"), f"run.access = {self.access!r}; known: open, private")
        _check(self.outer in OUTER_METHODS, f"run.outer = {self.outer!r}; known: {', '.join(OUTER_METHODS)}")
        _check(1 <= a.inner_steps <= 1_000_000, "averaging.inner_steps must be in 1..1000000")
        _check(all(0 <= x <= 2 for x in (a.beta, a.gamma)) and 0 <= a.mu < 1,
               "averaging: need 0 <= beta, gamma <= 2 and 0 <= mu < 1")
        _check(a.diloco_lr > 0 and 0 <= a.diloco_momentum < 1, "averaging: need diloco_lr > 0, 0 <= diloco_momentum < 1")
        _check(a.pair_timeout_s > 0 and a.exchange_timeout_s > 0, "averaging timeouts must be > 0")
        _check(1024 <= a.chunk_elements <= 1 << 24, "averaging.chunk_elements must be in 1024..16777216")
        _check(a.chunk_elements % self.compression.block_size == 0,
               "averaging.chunk_elements must be a multiple of compression.block_size")
        _check(min(a.max_divergence, a.max_distance_ratio, a.max_move) > 0,
               "averaging: need max_divergence, max_distance_ratio and max_move > 0")
        _check(a.max_progress_ratio > 1, "averaging.max_progress_ratio must be > 1")
        _check(a.stall_timeout_s > 0, "averaging.stall_timeout_s must be > 0")
        _check(1 <= a.max_failures <= 1000 and 1 <= a.ban_outer_steps <= 1_000_000,
               "averaging: need max_failures in 1..1000 and ban_outer_steps in 1..1000000")
        e = self.evaluation
        _check(0 <= e.every_steps <= 1_000_000, "evaluation.every_steps must be in 0..1000000")
        _check(1 <= e.batches <= 1024, "evaluation.batches must be in 1..1024")
        _check(0 <= self.checkpoint.every_outer_steps <= 1_000_000, "checkpoint.every_outer_steps must be in 0..1000000")
        b = self.balancing
        _check(0 < b.min_gain <= 10, "balancing.min_gain must be in (0, 10]")
        _check(b.check_every_s > 0 and b.min_dwell_s >= 0, "balancing: need check_every_s > 0 and min_dwell_s >= 0")

    def to_dict(self) -> dict[str, Any]:
        """The TOML-shaped dict (also what is signed and published)."""
        return {
            "run": {"id": self.run_id, "seed": self.seed, "outer": self.outer, "access": self.access},
            "model": self.model.to_dict(),
            "pipeline": dataclasses.asdict(self.pipeline),
            "optimizer": dataclasses.asdict(self.optimizer),
            "data": {**dataclasses.asdict(self.data), "paths": list(self.data.paths)},
            "compression": dataclasses.asdict(self.compression),
            "averaging": dataclasses.asdict(self.averaging),
            "evaluation": dataclasses.asdict(self.evaluation),
            "checkpoint": dataclasses.asdict(self.checkpoint),
            "balancing": dataclasses.asdict(self.balancing),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunSpec:
        """Build from the TOML-shaped dict; unknown sections or keys are errors, not silently ignored."""
        if not isinstance(raw, dict):
            raise SpecError("run spec must be a table")
        known = {"run", "model", "pipeline", "optimizer", "data", "compression", "averaging", "evaluation",
                 "checkpoint", "balancing"}
        if unknown := set(raw) - known:
            raise SpecError(f"unknown section(s) {sorted(unknown)}; known: {sorted(known)}")
        run = _table(raw, "run")
        if "id" not in run:
            raise SpecError("[run] needs an id")
        _no_unknown("run", run, {"id", "seed", "outer", "access"})
        try:
            model = ModelConfig.from_dict(_table(raw, "model"))
        except (TypeError, ValueError) as e:
            raise SpecError(f"[model]: {e}") from e
        data = dict(_table(raw, "data"))
        if "paths" in data:
            data["paths"] = tuple(str(p) for p in data["paths"])
        try:
            return cls(
                run_id=str(run["id"]),
                seed=int(run.get("seed", 0)),
                outer=str(run.get("outer", "noloco")),
                access=str(run.get("access", "open")),
                model=model,
                pipeline=_build(PipelineConfig, "pipeline", _table(raw, "pipeline")),
                optimizer=_build(OptimizerConfig, "optimizer", _table(raw, "optimizer")),
                data=_build(DataConfig, "data", data),
                compression=_build(CompressionConfig, "compression", _table(raw, "compression")),
                averaging=_build(AveragingConfig, "averaging", _table(raw, "averaging")),
                evaluation=_build(EvaluationConfig, "evaluation", _table(raw, "evaluation")),
                checkpoint=_build(CheckpointConfig, "checkpoint", _table(raw, "checkpoint")),
                balancing=_build(BalancingConfig, "balancing", _table(raw, "balancing")),
            )
        except SpecError:
            raise
        except (TypeError, ValueError) as e:
            raise SpecError(str(e)) from e

    @classmethod
    def load(cls, path: str | Path) -> RunSpec:
        """Read a RUN.toml file."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise SpecError(f"run spec {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"{path}: {e}") from e
        try:
            return cls.from_dict(raw)
        except SpecError as e:
            raise SpecError(f"{path}: {e}") from e


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SpecError(message)


def _table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise SpecError(f"[{name}] must be a table")
    return value


def _no_unknown(section: str, values: dict[str, Any], known: set[str]) -> None:
    if unknown := set(values) - known:
        raise SpecError(f"[{section}] has unknown key(s) {sorted(unknown)}; known: {sorted(known)}")


def _build(kind: type, section: str, values: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(kind)}
    _no_unknown(section, values, set(fields))
    converted = {}
    for name, value in values.items():
        default = fields[name].default
        # TOML ints where floats are expected are fine; anything else of the wrong type is not
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if default is not dataclasses.MISSING and not isinstance(value, type(default)):
            raise SpecError(f"[{section}] {name} = {value!r} should be a {type(default).__name__}")
        converted[name] = value
    return kind(**converted)


# ---- signing -------------------------------------------------------------------------------------

def sign_spec(spec: RunSpec, identity: NodeIdentity) -> bytes:
    """The spec record published in the DHT: the spec, the seed's public key and its signature."""
    body = msgpack.packb(spec.to_dict(), use_bin_type=True)
    return msgpack.packb(
        {"spec": body, "public_key": identity.public_der, "signature": identity.sign(body)}, use_bin_type=True
    )


def spec_signer_key(record: bytes) -> bytes:
    """The public key (DER) in a spec record that ``verify_spec_record`` accepted: the seed's key, which also
    signs the run's join tokens and revocation list."""
    return msgpack.unpackb(record, raw=False, max_bin_len=1 << 20, max_str_len=1 << 16)["public_key"]


def verify_spec_record(record: bytes, trusted_seed_ids: set[str] | None) -> tuple[RunSpec, str]:
    """Check a spec record's signature and, when given, that the signer is one of ``trusted_seed_ids``.

    Returns the spec and the signer's peer id. Raises SpecError with the reason otherwise.
    """
    try:
        outer = msgpack.unpackb(record, raw=False, max_bin_len=1 << 20, max_str_len=1 << 16)
        body, public_der, signature = outer["spec"], outer["public_key"], outer["signature"]
        if not all(isinstance(x, bytes) for x in (body, public_der, signature)):
            raise TypeError("fields must be bytes")
    except (ValueError, TypeError, KeyError, msgpack.ExtraData) as e:
        raise SpecError(f"malformed spec record: {e}") from None
    if not verify_signature(public_der, body, signature):
        raise SpecError("spec record signature is invalid")
    signer = peer_id_from_public_key(public_der)
    if trusted_seed_ids is not None and signer not in trusted_seed_ids:
        raise SpecError(f"spec is signed by {signer}, which is not the seed you asked to join")
    try:
        raw = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.ExtraData) as e:
        raise SpecError(f"malformed spec body: {e}") from None
    return RunSpec.from_dict(raw), signer
