"""The stage-split model is the full model, cut by layers: same weights, same loss, same gradients."""

from __future__ import annotations

import itertools

import pytest
import torch

from swarmd.swarm.model import (
    ModelConfig,
    build_stage,
    count_parameters,
    layer_ranges,
    lm_loss,
)

TINY = ModelConfig(vocab_size=256, dim=32, n_layers=6, n_heads=2, max_seq_len=32)


def test_config_defaults_and_roundtrip():
    config = ModelConfig()
    assert config.ffn_hidden == 352  # 8/3 * 128 = 341.3, rounded up to a multiple of 32
    assert config.ffn_hidden % 32 == 0
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_dict({"dim": 64, "n_heads": 2}).dim == 64


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"dim": 30, "n_heads": 4}, "divisible"),
        ({"dim": 12, "n_heads": 4}, "even"),
        ({"n_layers": 0}, "n_layers"),
        ({"vocab_size": 2.5}, "vocab_size"),
        ({"norm_eps": 0}, "norm_eps"),
        ({"ffn_hidden": -1}, "ffn_hidden"),
    ],
)
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**bad)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['n_layer'\]"):
        ModelConfig.from_dict({"n_layer": 4})


def test_layer_ranges():
    assert layer_ranges(4, 1) == [(0, 4)]
    assert layer_ranges(4, 2) == [(0, 2), (2, 4)]
    assert layer_ranges(7, 3) == [(0, 3), (3, 5), (5, 7)]
    for n_layers in range(1, 10):
        for n_stages in range(1, n_layers + 1):
            ranges = layer_ranges(n_layers, n_stages)
            assert ranges[0][0] == 0 and ranges[-1][1] == n_layers
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
            sizes = [end - start for start, end in ranges]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="at least one layer"):
        layer_ranges(2, 3)
    with pytest.raises(ValueError, match="n_stages"):
        layer_ranges(2, 0)


def test_stage_shapes_and_specs():
    tokens = torch.randint(0, 256, (2, 10))
    full = build_stage(TINY, 0, 1, seed=0)
    assert full.is_first and full.is_last
    assert full(tokens).shape == (2, 10, 256)
    first, middle, last = (build_stage(TINY, s, 3, seed=0) for s in range(3))
    assert first.expected_input(2, 10) == ((2, 10), torch.int64)
    assert middle.expected_input(2, 10) == ((2, 10, 32), torch.float32)
    hidden = first(tokens)
    assert hidden.shape == (2, 10, 32)
    assert middle(hidden).shape == (2, 10, 32)
    assert last(middle(hidden)).shape == (2, 10, 256)
    assert first.output_shape(2, 10) == (2, 10, 32) and last.output_shape(2, 10) == (2, 10, 256)
    assert first.tok_embeddings is not None and first.output is None
    assert last.tok_embeddings is None and last.output is not None
    assert sum(count_parameters(m) for m in (first, middle, last)) == count_parameters(full)


def test_init_deterministic_and_independent_of_global_rng():
    torch.manual_seed(1)
    a = build_stage(TINY, 1, 2, seed=7).state_dict()
    torch.manual_seed(2)
    state = torch.random.get_rng_state()
    b = build_stage(TINY, 1, 2, seed=7).state_dict()
    assert torch.equal(state, torch.random.get_rng_state())  # building drew nothing from the global RNG
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_stage(TINY, 1, 2, seed=8).state_dict()
    assert not torch.equal(a["layers.3.attention.wq.weight"], c["layers.3.attention.wq.weight"])
    # parameters of one layer are not copies of each other
    assert not torch.equal(a["layers.3.attention.wq.weight"], a["layers.3.attention.wk.weight"])


@pytest.mark.parametrize("num_stages", [2, 3])
def test_stage_weights_are_slices_of_full_model(num_stages):
    full = build_stage(TINY, 0, 1, seed=3).state_dict()
    seen = set()
    for stage in range(num_stages):
        for name, tensor in build_stage(TINY, stage, num_stages, seed=3).state_dict().items():
            assert torch.equal(tensor, full[name]), name
            seen.add(name)
    assert seen == set(full)


@pytest.mark.parametrize("num_stages", [2, 3])
def test_split_matches_full_loss_and_gradients(num_stages):
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (3, 12))
    targets = torch.randint(0, 256, (3, 12))
    full = build_stage(TINY, 0, 1, seed=5)
    full_loss = lm_loss(full(tokens), targets)
    full_loss.backward()

    stages = [build_stage(TINY, s, num_stages, seed=5) for s in range(num_stages)]
    x = tokens
    for stage in stages:
        x = stage(x)
    loss = lm_loss(x, targets)
    loss.backward()

    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    full_params = dict(full.named_parameters())
    for stage in stages:
        for name, param in stage.named_parameters():
            torch.testing.assert_close(param.grad, full_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_causal():
    model = build_stage(TINY, 0, 1, seed=0)
    tokens = torch.randint(0, 256, (1, 8))
    changed = tokens.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_lm_loss_near_uniform_at_init():
    model = build_stage(TINY, 0, 1, seed=0)
    tokens = torch.randint(0, 256, (4, 16))
    with torch.no_grad():
        loss = lm_loss(model(tokens), tokens)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.2
