"""`swarmd doctor`: its checks on plain values, the dial-back's limits, the reachability line, and (slow) the
doctor against a live local seed."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from swarm_harness import swarm, write_spec
from swarmd.daemon import doctor
from swarmd.daemon.dialback import DialBack, dial_error, dial_target
from swarmd.daemon.doctor import FAIL, OK, WARN, Check, GpuProbe
from swarmd.daemon.p2p_host import nat_options, reachability
from swarmd.daemon.spec import DEFAULT_SPEC_PATH, RunSpec
from swarmd.protocols.errors import ProtocolError
from swarmd.protocols.wire import Message, PROTOCOL_VERSION, decode_message
from swarmd.protocols.limits import DEFAULT_LIMITS

ME = "12D3KooWRs9XB8NiGxhrKiZzo41X6qjHeBYJWytxeFZmk2WHi128"
OTHER = "12D3KooWKtC1Msc9g7mtNUTu8BiQVmH8xppcWBUsdHRs59CC2fQN"
GiB = 1 << 30
SPEC = RunSpec.load(DEFAULT_SPEC_PATH)


# ---- local checks


def test_open_files():
    assert doctor.check_open_files(65536, 65536).status == OK
    assert doctor.check_open_files(resource.RLIM_INFINITY, resource.RLIM_INFINITY).status == OK
    low = doctor.check_open_files(1024, 1048576)
    assert low.status == WARN and "ulimit -n 65536" in low.fix
    stuck = doctor.check_open_files(256, 256)
    assert stuck.status == FAIL and "hard limit" in stuck.fix


def test_ports():
    assert doctor.check_port("libp2p port", "--port", "0.0.0.0", 0, None).status == OK
    assert doctor.check_port("metrics port", "--metrics-port", "0.0.0.0", 9100, None).status == OK
    busy = doctor.check_port("libp2p port", "--port", "0.0.0.0", 31337, "Address already in use")
    assert busy.status == FAIL and "--port" in busy.fix and "31337" in busy.fix


def test_port_probe_sees_a_listener():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert doctor.port_error("127.0.0.1", s.getsockname()[1]) is not None
    assert doctor.port_error("127.0.0.1", 0) is None


def test_disk():
    need, why = doctor.disk_needed(None)
    assert need == doctor.MIN_FREE_DISK and "at least" in why
    assert doctor.check_disk(Path("/x"), 10 * GiB, need, why).status == OK
    assert doctor.check_disk(Path("/x"), int(1.5 * GiB), need, why).status == WARN
    full = doctor.check_disk(Path("/x"), GiB // 2, need, why)
    assert full.status == FAIL and "--node-dir" in full.fix
    assert doctor.disk_needed(SPEC)[0] >= doctor.MIN_FREE_DISK  # the demo's model is small: the floor holds


def test_stage_parameters_estimate_is_close():
    from swarmd.swarm.model import build_stage

    real = max(sum(p.numel() for p in build_stage(SPEC.model, s, SPEC.pipeline.stages, 0).parameters())
               for s in range(SPEC.pipeline.stages))
    assert 0.9 * real <= doctor.stage_parameters(SPEC) <= 1.1 * real


def test_activation_estimate_is_close_to_what_a_stage_saves():
    """The estimate per microbatch against the tensors autograd saves in a forward of the demo's stages (its
    parameters excluded): within 0.8-1.5x."""
    from swarmd.swarm.model import build_stage

    b, s, stages = SPEC.pipeline.microbatch_size, SPEC.pipeline.seq_len, SPEC.pipeline.stages
    per_microbatch = doctor.activation_bytes(SPEC) / (SPEC.pipeline.kept_graphs + 1)
    for stage in range(stages):
        model = build_stage(SPEC.model, stage, stages, 0)
        weights = {p.data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.data_ptr() not in weights:
                saved[t.data_ptr()] = max(saved.get(t.data_ptr(), 0), t.numel() * t.element_size())
            return t

        x = torch.randint(0, 256, (b, s)) if stage == 0 else torch.randn(b, s, SPEC.model.dim, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        assert 0.8 * sum(saved.values()) <= per_microbatch <= 1.5 * sum(saved.values()), (stage, saved)


def test_gpu_skipped_politely_on_cpu():
    checks = doctor.check_gpu(GpuProbe(), "cpu", SPEC)
    assert [c.status for c in checks] == [OK, OK] and all("skipped" in c.detail for c in checks)
    missing = doctor.check_gpu(GpuProbe(), "cuda", SPEC)
    assert missing[0].status == FAIL and "CUDA build of torch" in missing[0].fix


def test_gpu_memory_and_triton():
    gpu = GpuProbe([("NVIDIA H200", 140 * GiB, 139 * GiB)], "12.8", "3.7.1")
    assert [c.status for c in doctor.check_gpu(gpu, "cuda", SPEC)] == [OK, OK, OK]
    full = GpuProbe([("NVIDIA T4", 16 * GiB, GiB // 4)], "12.8", None, "ImportError: no triton")
    checks = {c.name: c for c in doctor.check_gpu(full, "cuda:0", SPEC)}
    assert checks["gpu memory"].status == FAIL and checks["triton"].status == WARN
    assert doctor.check_gpu(gpu, "cuda:3", SPEC)[0].status == FAIL  # no such device


# ---- network checks on plain values


def test_clock():
    assert doctor.check_clock(0.1, 0.02, OTHER).status == OK
    assert doctor.check_clock(1.2, 0.02, OTHER).status == WARN
    late = doctor.check_clock(-5.0, 0.02, OTHER)
    assert late.status == FAIL and "ahead of" in late.detail and "timedatectl" in late.fix
    assert doctor.check_clock(1.2, 2.0, OTHER).status == OK  # within what a 2 s round trip can explain


def test_versions():
    local = {"swarmd": "0.1.0", "torch": "2.13.0+cpu", "hivemind": "1.1.12"}
    assert [c.status for c in doctor.check_versions(local, {**local, "torch": "2.13.1+cu128"}, PROTOCOL_VERSION)] == [OK]
    off = doctor.check_versions(local, {**local, "torch": "2.12.0", "hivemind": "1.1.11"}, PROTOCOL_VERSION)
    assert [c.status for c in off] == [WARN] and "pip install hivemind==1.1.11 torch==2.12.0" in off[0].fix
    wire = doctor.check_versions(local, {**local, "swarmd": "0.2.0"}, PROTOCOL_VERSION + 1)
    assert wire[0].status == FAIL and "swarmd 0.2.0" in wire[0].fix
    assert doctor.check_versions(local, {}, PROTOCOL_VERSION)[0].status == WARN  # an older node says nothing


def test_dialback_classification():
    direct, relay = f"/ip4/203.0.113.7/tcp/31337/p2p/{ME}", f"/ip4/198.51.100.1/tcp/4001/p2p/{OTHER}/p2p-circuit/p2p/{ME}"
    ok = doctor.classify_dialback([direct], ["ok"], OTHER, 31337, True)
    assert ok.status == OK and ok.detail.startswith("reachable")
    relayed = doctor.classify_dialback([direct, relay], ["failed: connection refused", "ok"], OTHER, 31337, True)
    assert relayed.status == WARN and relayed.detail.startswith("relayed") and "forward TCP port 31337" in relayed.fix
    down = doctor.classify_dialback([direct], ["failed: dial tcp4: i/o timeout"], OTHER, 0, False, 0)
    assert down.status == FAIL and down.detail.startswith("unreachable") and "i/o timeout" in down.detail
    assert "fixed --port" in down.fix and "--no-nat-traversal" in down.fix
    assert doctor.classify_dialback([], [], OTHER, 0, True).status == FAIL


def test_line_and_exit_code():
    checks = [Check("a", OK, "fine", "never shown"), Check("b", WARN, "hmm", "do x"), Check("c", FAIL, "bad", "do y")]
    assert checks[0].line() == "ok    a: fine"
    assert checks[2].line() == "FAIL  c: bad | fix: do y"
    assert doctor.exit_code(checks[:2]) == 0 and doctor.exit_code(checks) == 1


# ---- the dial-back's limits (the asked node's side)


def test_dial_target_takes_only_the_callers_plain_addresses():
    assert dial_target(f"/ip4/203.0.113.7/tcp/31337/p2p/{ME}", ME) == "/ip4/203.0.113.7/tcp/31337"
    assert dial_target("/dns4/example.org/tcp/31337", ME) == "/dns4/example.org/tcp/31337"
    relay = f"/ip4/198.51.100.1/tcp/4001/p2p/{OTHER}/p2p-circuit"
    assert dial_target(f"{relay}/p2p/{ME}", ME) == relay
    for bad in (f"/ip4/203.0.113.7/tcp/31337/p2p/{OTHER}",  # someone else
                "/ip4/203.0.113.7/tcp/0", "/ip4/203.0.113.7/udp/1/quic", "/unix/tmp/x.sock", "nonsense",
                f"{relay}/p2p/{OTHER}"):
        with pytest.raises(ValueError):
            dial_target(bad, ME)


def test_dial_error_keeps_the_reason():
    text = ("Connect failed. msg=failed to dial: failed to dial 12D3: all dials failed\n  * [/ip4/127.0.0.1/tcp/1] "
            "dial tcp4 127.0.0.1:1: connect: connection refused")
    assert dial_error(text) == "dial tcp4 127.0.0.1:1: connect: connection refused"
    assert dial_error("context deadline exceeded") == "context deadline exceeded"


def test_dialback_is_bounded():
    MAX_DIALS = DEFAULT_LIMITS.dialback_max_addrs
    dialed: list[tuple[str, str]] = []

    async def fake_dial(caller: str, target: str) -> str:
        dialed.append((caller, target))
        return "ok"

    async def scenario() -> None:
        service = DialBack()
        service._dial = fake_dial
        maddrs = [f"/ip4/10.0.0.{i}/tcp/1/p2p/{ME}" for i in range(MAX_DIALS)] + [f"/ip4/1.2.3.4/tcp/1/p2p/{OTHER}"]
        reply = decode_message(await service.handle(ME, Message("dialback_request", {"maddrs": maddrs}, [])),
                               DEFAULT_LIMITS)
        results = reply.fields["results"]
        assert results[:MAX_DIALS] == ["ok"] * MAX_DIALS and results[MAX_DIALS].startswith("skipped")
        assert all(caller == ME for caller, _ in dialed) and len(dialed) == MAX_DIALS
        with pytest.raises(ProtocolError) as again:  # the same caller within dialback_peer_interval_s
            await service.handle(ME, Message("dialback_request", {"maddrs": []}, []))
        assert again.value.reason == "busy"
        for i in range(10):  # fresh identities run into the node-wide rate
            try:
                await service.handle(f"peer{i}", Message("dialback_request", {"maddrs": []}, []))
            except ProtocolError as e:
                assert e.reason == "busy"
                break
        else:
            raise AssertionError("no node-wide limit")
        refused = await DialBack().handle(ME, Message("dialback_request", {"maddrs": [f"/ip4/1.2.3.4/tcp/1/p2p/{OTHER}"]}, []))
        assert decode_message(refused, DEFAULT_LIMITS).fields["results"][0].startswith("refused")

    asyncio.run(scenario())


# ---- NAT traversal and the banner's reachability line


def test_nat_options():
    off = nat_options(False, ["/ip4/1.2.3.4/tcp/1/p2p/" + OTHER])
    assert not any(off.values())
    on = nat_options(True, ["/ip4/1.2.3.4/tcp/1/p2p/" + OTHER])
    assert on["use_relay"] and on["use_auto_relay"] and on["auto_nat"] and on["nat_port_map"]
    assert on["trusted_relays"] == ["/ip4/1.2.3.4/tcp/1/p2p/" + OTHER]
    assert nat_options(True, [])["trusted_relays"] is None  # a seed: relays found through p2pd's DHT


def test_reachability_line():
    assert reachability([f"/ip4/127.0.0.1/tcp/1/p2p/{ME}"], False)[0] == "local"
    kind, line = reachability([f"/ip4/10.0.0.2/tcp/1/p2p/{ME}", f"/ip4/1.2.3.4/tcp/4001/p2p/{OTHER}/p2p-circuit/p2p/{ME}"],
                              True)
    assert kind == "relayed" and OTHER in line
    kind, line = reachability([f"/ip4/127.0.0.1/tcp/1/p2p/{ME}", f"/ip4/93.184.216.34/tcp/1/p2p/{ME}"], True)
    assert kind == "public" and line.startswith("reachability unknown")
    kind, line = reachability([f"/ip4/192.168.1.5/tcp/1/p2p/{ME}"], True)
    assert kind == "private" and line.startswith("reachability unknown") and "relay" in line
    assert "--no-nat-traversal" in reachability([f"/ip4/192.168.1.5/tcp/1/p2p/{ME}"], False)[1]


# ---- the command


def _swarmd(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarmd.daemon.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.parametrize("args", [
    ["doctor", "/ip4/1.2.3.4/tcp/5"],  # no peer id
    ["doctor", "--port", "70000"],
    ["doctor", "--relay-wait", "-1"],
    ["doctor", "--host", "localhost"],
])
def test_bad_arguments_are_one_line_and_exit_2(args, capsys):
    from swarmd.daemon.cli import main

    assert main(args) == 2  # refused before anything starts
    err = capsys.readouterr().err
    assert err.startswith("swarmd doctor: error:") and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_doctor_against_a_live_seed(tmp_path: Path, swarm_env: dict[str, str]) -> None:
    """The seed dials the doctor back on 127.0.0.1 (reachable), and not at an announced port where nothing
    listens (unreachable, exit 1); the versions and clock agree."""
    spec = write_spec(tmp_path / "run.toml")
    with swarm(tmp_path, swarm_env) as s:
        s.start_seed(spec, "--no-train")
        common = ["--host", "127.0.0.1", "--no-nat-traversal", "--metrics-port", "-1", "--node-dir",
                  str(tmp_path / "doctor")]
        out = _swarmd("doctor", s.seed_addr, *common, env=swarm_env)
        lines = {line.split(":")[0]: line for line in out.stdout.splitlines()}
        assert out.returncode == 0, out.stdout + out.stderr
        assert lines["ok    dial-back"].startswith("ok    dial-back: reachable"), out.stdout
        assert "ok    versions" in lines and "ok    clock" in lines and "ok    run spec" in lines, out.stdout
        with __import__("socket").socket() as closed:  # a port nothing listens on
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        out = _swarmd("doctor", s.seed_addr, *common, "--announce", f"/ip4/127.0.0.1/tcp/{port}", env=swarm_env)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "FAIL  dial-back: unreachable" in out.stdout and "| fix: " in out.stdout, out.stdout
