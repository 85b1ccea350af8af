"""A small Llama-style decoder, split by layers into pipeline stages.

One file, one config dataclass (in the spirit of nanoGPT / torchtitan):

* ``ModelConfig``  - the architecture, (de)serialisable for the run spec.
* ``layer_ranges`` - which contiguous layers each of ``S`` stages owns.
* ``StageModel``   - the part of the model one stage serves; stage 0 owns the token
  embedding, the last stage owns the final norm and the (untied) LM head.
* ``build_stage``  - builds a stage with deterministic weights.

Initialisation is keyed by parameter *name*, and names carry the global layer index
(``layers.5.attention.wq.weight``), so a stage holds exactly the same weights as the
matching slice of the full model built with the same seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02  # GPT-2 / Llama-style init scale


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the decoder. ``ffn_hidden=None`` picks the SwiGLU size (≈ 8/3·dim, multiple of 32)."""

    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int | None = None
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"head dim dim/n_heads = {self.dim // self.n_heads} must be even for rotary embeddings")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.ffn_hidden is None:
            # SwiGLU keeps the MLP parameter count of a 4·dim GELU MLP: 2/3 · 4·dim, rounded up to 32.
            hidden = int(8 * self.dim / 3)
            object.__setattr__(self, "ffn_hidden", 32 * math.ceil(hidden / 32))
        elif not isinstance(self.ffn_hidden, int) or isinstance(self.ffn_hidden, bool) or self.ffn_hidden < 1:
            raise ValueError(f"ModelConfig.ffn_hidden must be a positive integer or None, got {self.ffn_hidden!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the run spec (``ffn_hidden`` resolved, so every peer agrees on it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a run-spec dict; unknown keys are an error (a typo must not silently use a default)."""
        if not isinstance(data, dict):
            raise ValueError(f"model config must be a mapping, got {type(data).__name__}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; allowed keys are {sorted(allowed)}")
        return cls(**data)


def layer_ranges(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Split ``n_layers`` into ``n_stages`` contiguous half-open ranges whose sizes differ by at most one.

    Earlier stages get the extra layers (stage 0 also carries the embedding, the last stage the head,
    and the head of a byte-level model is cheap).
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    if n_stages > n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {n_stages} stages: every stage needs at least one layer")
    base, extra = divmod(n_layers, n_stages)
    ranges, start = [], 0
    for stage in range(n_stages):
        size = base + (1 if stage < extra else 0)
        ranges.append((start, start + size))
        start += size
    return ranges


# --------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in fp32 even if activations are lower precision
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim] for rotary embeddings (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q or k [B, H, T, hd] by position; cos/sin are [T, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary position embeddings."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wk = nn.Linear(config.dim, config.dim, bias=False)
        self.wv = nn.Linear(config.dim, config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        shape = (batch, seq, self.n_heads, self.head_dim)
        q = self.wq(x).view(shape).transpose(1, 2)
        k = self.wk(x).view(shape).transpose(1, 2)
        v = self.wv(x).view(shape).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, dim))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


# --------------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class InputSpec:
    """What a stage accepts: ``tokens`` (int64 [B, T], values < vocab_size) or ``hidden`` (float [B, T, dim])."""

    kind: str  # "tokens" or "hidden"
    dtype: torch.dtype
    feature_shape: tuple[int, ...]  # () for tokens, (dim,) for hidden states
    max_seq_len: int
    vocab_size: int

    def shape(self, batch: int, seq: int) -> tuple[int, ...]:
        """The full input shape for a batch of ``batch`` sequences of ``seq`` tokens."""
        return (batch, seq, *self.feature_shape)


def _param_generator(seed: int, name: str) -> torch.Generator:
    """A generator private to one parameter: derived from (seed, name) with a stable hash, not Python's hash()."""
    digest = hashlib.sha256(f"swarmd-init:{seed}:{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class StageModel(nn.Module):
    """The layers ``[layer_start, layer_end)`` of the decoder, plus the embedding (stage 0) and head (last stage).

    ``forward``: stage 0 maps int64 tokens [B, T] to hidden [B, T, D]; middle stages map hidden to hidden;
    the last stage maps to logits [B, T, V]. With a single stage it is the whole model: tokens to logits.
    """

    def __init__(self, config: ModelConfig, stage: int, num_stages: int, seed: int = 0):
        super().__init__()
        ranges = layer_ranges(config.n_layers, num_stages)
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage must be in [0, {num_stages}), got {stage}")
        self.config = config
        self.stage = stage
        self.num_stages = num_stages
        self.seed = seed
        self.layer_start, self.layer_end = ranges[stage]

        # Build on the meta device: no memory, and no draws from the caller's global RNG (nn.Linear's
        # default init would consume it); the real values come from reset_parameters below.
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim) if self.is_first else None
            # Keyed by the global layer index so parameter names (and thus init) match the full model.
            self.layers = nn.ModuleDict({str(i): Block(config) for i in range(self.layer_start, self.layer_end)})
            self.norm = RMSNorm(config.dim, config.norm_eps) if self.is_last else None
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False) if self.is_last else None
        self.to_empty(device="cpu")
        # Rotary tables are derived, not learned: non-persistent, so they stay out of checkpoints.
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters(seed)

    @property
    def is_first(self) -> bool:
        """True if this stage embeds tokens."""
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        """True if this stage produces logits."""
        return self.stage == self.num_stages - 1

    @property
    def input_spec(self) -> InputSpec:
        """The shape/dtype contract of this stage's input (the daemon checks incoming activations against it)."""
        c = self.config
        if self.is_first:
            return InputSpec("tokens", torch.int64, (), c.max_seq_len, c.vocab_size)
        return InputSpec("hidden", self._param_dtype(), (c.dim,), c.max_seq_len, c.vocab_size)

    def expected_input(self, batch: int, seq: int) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of the input for ``batch`` sequences of ``seq`` tokens."""
        spec = self.input_spec
        return spec.shape(batch, seq), spec.dtype

    def output_shape(self, batch: int, seq: int) -> tuple[int, ...]:
        """Shape of this stage's output: logits [B, T, V] on the last stage, hidden [B, T, D] elsewhere."""
        return (batch, seq, self.config.vocab_size if self.is_last else self.config.dim)

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Initialise every parameter from a generator derived from (seed, parameter name)."""
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layers)  # GPT-2: scale residual writes by depth
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            std = residual_std if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else INIT_STD
            values = torch.randn(param.shape, generator=_param_generator(seed, name), dtype=torch.float32)
            param.copy_(values * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run this stage: tokens or hidden states in, hidden states or logits out."""
        if self.is_first:
            x = self.tok_embeddings(x)
        seq = x.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        for block in self.layers.values():
            x = block(x, cos, sin)
        if self.is_last:
            x = self.output(self.norm(x))
        return x


def build_stage(config: ModelConfig, stage: int, num_stages: int, seed: int) -> StageModel:
    """The model part for ``stage`` of ``num_stages``, with weights fixed by ``seed`` (``num_stages=1``: full model)."""
    return StageModel(config, stage, num_stages, seed)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits [B, T, V] against int64 targets [B, T] (computed in fp32)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters in ``module``."""
    return sum(p.numel() for p in module.parameters())
