"""Stage state transfer: a joiner downloads its stage's current weights from a live replica."""

from __future__ import annotations

import torch
from swarmd.daemon.compute import ComputeLane
from swarmd.daemon.transport import Transport
from swarmd.protocols import rpc
from swarmd.protocols.codecs import encode_tensor
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.wire import Message, encode_message
from swarmd.swarm.stage import StageWorker

STATE_TIMEOUT_S = 120.0


def _snapshot(worker: StageWorker) -> tuple[int, list[str], list]:
    state = worker.model.state_dict()
    names = sorted(state)
    return worker.inner_step, names, [encode_tensor(state[n].detach().cpu(), "none") for n in names]


async def serve_state(transport: Transport, stage: int, worker: StageWorker, lane: ComputeLane) -> None:
    """Answer state requests for ``stage`` with the model weights and inner step (a lane snapshot)."""

    async def on_state(sender: str, message: Message) -> bytes:
        if message.fields["stage"] != stage:
            raise ProtocolError("wrong_stage", f"this node serves stage {stage}, not {message.fields['stage']}")
        step, names, tensors = await lane.run(_snapshot, worker)
        return encode_message("state", {"stage": stage, "inner_step": step, "names": names}, tensors)

    await transport.serve(rpc.STATE, "state", on_state, ("state_request",), channel="state")


def _load(worker: StageWorker, names: list[str], tensors: list[torch.Tensor], step: int) -> None:
    own = worker.model.state_dict()
    if sorted(own) != names:
        raise ProtocolError("shape", "the peer's stage has different parameters than ours")
    for name, tensor in zip(names, tensors):
        if tensor.shape != own[name].shape or tensor.dtype != own[name].dtype:
            raise ProtocolError("shape", f"{name}: {tuple(tensor.shape)} {tensor.dtype} != ours")
    worker.model.load_state_dict(dict(zip(names, tensors)))
    worker.inner_step = step


async def download_stage_state(
    transport: Transport, peer_id: str, stage: int, worker: StageWorker, lane: ComputeLane
) -> None:
    """Fetch and verify ``stage``'s weights from ``peer_id`` and load them (shapes, dtypes, finiteness)."""
    reply = await transport.call(
        peer_id, rpc.STATE, "state", encode_message("state_request", {"stage": stage}),
        timeout=STATE_TIMEOUT_S, channel="state", expected_kinds=("state",),
    )
    fields = reply.fields
    if fields["stage"] != stage or len(fields["names"]) != len(reply.tensors):
        raise ProtocolError("malformed", "state reply does not match the request")
    await lane.run(_load, worker, fields["names"], reply.tensors, fields["inner_step"])
