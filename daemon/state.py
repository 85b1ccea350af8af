"""Stage state transfer: a joiner downloads its stage's current weights from a live replica, and with them
the replica's inner AdamW state and its outer state (phi, outer momentum, outer step count) when the run
averages (NoLoCo, DiLoCo).

A fresh AdamW on trained weights takes its first steps with empty moment estimates (full-size, sign-like
updates): the joiner would knock its copy of the weights off course before it ever averages.

Without the outer state a joiner would start with phi = theta: its first pseudo-gradient would miss the
inner progress the replica made before the join, and under DiLoCo its phi would differ from the stage's
shared one for good. With it, the joiner is a clone of the replica it downloaded from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from swarmd.daemon.compute import ComputeLane
from swarmd.daemon.transport import Transport
from swarmd.protocols import rpc
from swarmd.protocols.codecs import encode_tensor
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.wire import Message, encode_message
from swarmd.swarm.model import count_parameters
from swarmd.swarm.outer import OuterState
from swarmd.swarm.stage import StageWorker

STATE_TIMEOUT_S = 120.0
# Names of the outer-state tensors after the model's own: '/' never appears in a torch state_dict name.
OUTER_NAMES = ("outer/phi", "outer/delta")
OPTIM_PREFIX = "optim/"  # optim/<parameter index>/<key>: the inner optimizer's per-parameter state
ADAM_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})

OuterSource = Callable[[], "OuterState | None"]  # the outer state to share, read on the lane


def _no_outer() -> OuterState | None:
    return None


def _snapshot(worker: StageWorker, outer: OuterSource) -> tuple[dict, list]:
    """On the lane, so weights, inner step and outer state are one consistent moment."""
    state = worker.model.state_dict()
    names = sorted(state)
    tensors = [encode_tensor(state[n].detach().cpu(), "none") for n in names]
    for index, entry in sorted(worker.optimizer.state_dict()["state"].items()):
        for key in sorted(entry):
            names.append(f"{OPTIM_PREFIX}{index}/{key}")
            tensors.append(encode_tensor(torch.as_tensor(entry[key]).detach().cpu(), "none"))
    fields = {"inner_step": worker.inner_step, "names": names}
    if (own := outer()) is not None:
        fields["names"] = names + list(OUTER_NAMES)
        fields["outer_step"] = own.outer_step
        tensors += [encode_tensor(own.phi.detach().cpu(), "none"), encode_tensor(own.delta.detach().cpu(), "none")]
    return fields, tensors


async def serve_state(
    transport: Transport, stage: int, worker: StageWorker, lane: ComputeLane, outer: OuterSource = _no_outer
) -> None:
    """Answer state requests for ``stage`` with the model weights, the inner step and, when ``outer()``
    returns one, the outer state (a lane snapshot)."""

    async def on_state(sender: str, message: Message) -> bytes:
        if message.fields["stage"] != stage:
            raise ProtocolError("wrong_stage", f"this node serves stage {stage}, not {message.fields['stage']}")
        fields, tensors = await lane.run(_snapshot, worker, outer)
        return encode_message("state", {"stage": stage, **fields}, tensors)

    await transport.serve(rpc.STATE, "state", on_state, ("state_request",), channel="state")


def optimizer_state_from_reply(
    names: list[str], tensors: list[torch.Tensor], params: list[torch.Tensor]
) -> tuple[list[str], list[torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """Split the inner optimizer's entries (optim/<index>/<key>) off a state reply, checked against our
    ``params`` (in param-group order): known AdamW keys, matching shapes, float, second moments >= 0."""
    model_names, model_tensors = [], []
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in zip(names, tensors):
        if not name.startswith(OPTIM_PREFIX):
            model_names.append(name)
            model_tensors.append(tensor)
            continue
        index_text, _, key = name[len(OPTIM_PREFIX):].partition("/")
        if not index_text.isdigit() or int(index_text) >= len(params) or key not in ADAM_KEYS:
            raise ProtocolError("malformed", f"unknown optimizer state entry {name!r}")
        index = int(index_text)
        shape = () if key == "step" else tuple(params[index].shape)
        if tuple(tensor.shape) != shape or not tensor.is_floating_point():
            raise ProtocolError("shape", f"{name}: {tuple(tensor.shape)} {tensor.dtype}, expected {shape} float")
        if key == "exp_avg_sq" and bool((tensor < 0).any()):
            raise ProtocolError("malformed", f"{name}: negative second moments")
        state.setdefault(index, {})[key] = tensor
    if any(set(entry) != ADAM_KEYS for entry in state.values()):
        raise ProtocolError("malformed", f"every optimizer state entry needs exactly {sorted(ADAM_KEYS)}")
    return model_names, model_tensors, state


def _load(worker: StageWorker, names: list[str], tensors: list[torch.Tensor], step: int) -> None:
    params = [p for group in worker.optimizer.param_groups for p in group["params"]]
    names, tensors, optimizer_state = optimizer_state_from_reply(names, tensors, params)
    own = worker.model.state_dict()
    if sorted(own) != names:
        raise ProtocolError("shape", "the peer's stage has different parameters than ours")
    for name, tensor in zip(names, tensors):
        if tensor.shape != own[name].shape or tensor.dtype != own[name].dtype:
            raise ProtocolError("shape", f"{name}: {tuple(tensor.shape)} {tensor.dtype} != ours")
    worker.model.load_state_dict(dict(zip(names, tensors)))
    if optimizer_state:  # hyperparameters stay ours (the spec's); the moments come from the peer
        groups = worker.optimizer.state_dict()["param_groups"]
        worker.optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})
    worker.inner_step = step


def outer_from_reply(
    names: list[str], tensors: list[torch.Tensor], outer_step: int | None, numel: int
) -> tuple[list[str], list[torch.Tensor], OuterState | None]:
    """Split a state reply into the model's (names, tensors) and the outer state, checked against the
    model's ``numel`` parameters (flat float32 phi and delta; finiteness was checked by the codec)."""
    if outer_step is None:
        return names, tensors, None
    if tuple(names[-len(OUTER_NAMES):]) != OUTER_NAMES:
        raise ProtocolError("malformed", f"a state reply with an outer step must end with {OUTER_NAMES}")
    phi, delta = tensors[-2:]
    for name, t in zip(OUTER_NAMES, (phi, delta)):
        if t.dtype != torch.float32 or tuple(t.shape) != (numel,):
            raise ProtocolError("shape", f"{name}: {tuple(t.shape)} {t.dtype}, expected ({numel},) float32")
    return names[:-2], tensors[:-2], OuterState(phi=phi, delta=delta, outer_step=outer_step)


async def download_stage_state(
    transport: Transport, peer_id: str, stage: int, worker: StageWorker, lane: ComputeLane
) -> OuterState | None:
    """Fetch and verify ``stage``'s weights from ``peer_id`` and load them (shapes, dtypes, finiteness).
    Returns the peer's outer state, for the joiner's outer service to adopt (None if it sent none)."""
    reply = await transport.call(
        peer_id, rpc.STATE, "state", encode_message("state_request", {"stage": stage}),
        timeout=STATE_TIMEOUT_S, channel="state", expected_kinds=("state",),
    )
    fields = reply.fields
    if fields["stage"] != stage or len(fields["names"]) != len(reply.tensors):
        raise ProtocolError("malformed", "state reply does not match the request")
    names, tensors, outer = outer_from_reply(
        fields["names"], reply.tensors, fields.get("outer_step"), count_parameters(worker.model)
    )
    await lane.run(_load, worker, names, tensors, fields["inner_step"])
    return outer
