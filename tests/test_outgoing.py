"""What a pipeline hop sends: encode_outgoing's checks on our own tensors, and what it hands the wire."""

from __future__ import annotations

import torch
from swarmd.daemon.pipeline import encode_outgoing
from swarmd.protocols.codecs import decode_tensor, encode_tensor
from swarmd.protocols.limits import DEFAULT_LIMITS


def test_activations_are_encoded_with_the_targets_after_them():
    acts = torch.randn(2, 8, 16)
    targets = torch.randint(0, 256, (2, 8))
    out = encode_outgoing(acts, "int8", 64, 1e6, "our activations", (encode_tensor(targets, "none"),))
    assert out.error is None and out.shape == (2, 8, 16) and len(out.tensors) == 2
    decoded = decode_tensor(out.tensors[0].meta, out.tensors[0].payload, DEFAULT_LIMITS)
    assert decoded.shape == acts.shape
    assert torch.allclose(decoded, acts, atol=float(acts.abs().max()) / 127)  # int8: within one step of a block
    assert torch.equal(decode_tensor(out.tensors[1].meta, out.tensors[1].payload, DEFAULT_LIMITS), targets)


def test_our_own_oversized_or_nonfinite_tensor_is_not_sent():
    for bad in (torch.full((2, 8, 16), 1e7), torch.full((2, 8, 16), float("nan"))):
        out = encode_outgoing(bad, "int8", 64, 1e6, "our input gradients")
        assert out.tensors == [] and out.shape == (2, 8, 16)
        assert "our input gradients" in out.error  # the log line names what failed, on our side
