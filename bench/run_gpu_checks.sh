#!/usr/bin/env bash
# The GPU checks in one command, from the repository root: the `cuda` tests, then bench/gpu_step.py (the
# training-step table and bench/kernels.py's kernel table). Record what it prints in bench/RESULTS.md ("GPU").
#
#     bash bench/run_gpu_checks.sh            # outputs under $OUT if set, else a new temp folder
#
# Needs (it installs nothing; a machine without network access must have these already):
#   - one CUDA GPU, Ampere or newer for the bf16 rows and tests;
#   - Python >= 3.10 ($PYTHON, default python3) with torch 2.13.0 built for CUDA (a +cu wheel, not +cpu),
#     triton 3.7.1, and swarmd's other dependencies: hivemind 1.1.12 (its p2pd binary: the swarm tests start
#     real daemons), numpy < 2.4, msgpack, uvloop, prometheus-client, pytest, pytest-timeout;
#   - swarmd itself: installed (pip install -e .), or not: then a PYTHONPATH shim of symlinks stands in for it.
# Time: meant to finish within 8 minutes on an H200 (not yet measured): pytest is cut at 270 s and
# gpu_step.py at 150 s, so a hang cannot eat a 15-minute device lease.
# Exit status: 0 if both passed, 2 if the machine lacks something above, else the first failure's status.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-$(mktemp -d /tmp/swarmd-gpu-checks-XXXXXX)}"
mkdir -p "$OUT_DIR"
echo "outputs in $OUT_DIR"
scratch="$(mktemp -d /tmp/swarmd-gpu-XXXXXX)"  # the shim and hivemind's sockets, removed at the end
trap 'rm -rf "$scratch"' EXIT

if ! "$PYTHON" -c "import swarmd.daemon" 2>/dev/null; then
    shim="$scratch/shim"
    mkdir -p "$shim/swarmd"
    for pkg in daemon swarm protocols kernels; do ln -s "$PWD/$pkg" "$shim/swarmd/$pkg"; done
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    echo "swarmd is not installed: using the shim $shim"
fi

"$PYTHON" - <<'EOF' 2>&1 | tee "$OUT_DIR/env.txt"
import importlib, sys
missing = []
for name in ("torch", "triton", "hivemind", "pytest", "pytest_timeout", "swarmd.daemon.cli"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '')}")
    except Exception as e:  # noqa: BLE001
        missing.append(f"{name} ({type(e).__name__}: {e})")
import torch
if not torch.cuda.is_available():
    missing.append(f"a CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
else:
    print(f"device: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
if missing:
    print("run_gpu_checks: missing " + "; ".join(missing))
    sys.exit(2)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2

unset TRITON_INTERPRET  # the cuda tests run the compiled kernels
export TMPDIR="$scratch/tmp"
mkdir -p "$TMPDIR"

# Only the files that hold `cuda` tests: collecting every test module would need the dev extras (grafana, yaml).
files=$(grep -l "mark.cuda" tests/test_*.py)
start=$SECONDS
timeout -k 10 270 "$PYTHON" -m pytest -m cuda -q -rs $files 2>&1 | tee "$OUT_DIR/pytest_cuda.txt"
tests_rc=${PIPESTATUS[0]}
echo "pytest -m cuda: exit $tests_rc after $((SECONDS - start)) s" | tee -a "$OUT_DIR/pytest_cuda.txt"

start=$SECONDS
timeout -k 10 150 "$PYTHON" bench/gpu_step.py 2>&1 | tee "$OUT_DIR/gpu_step.txt"
bench_rc=${PIPESTATUS[0]}
echo "gpu_step.py: exit $bench_rc after $((SECONDS - start)) s" | tee -a "$OUT_DIR/gpu_step.txt"

[ "$tests_rc" -ne 0 ] && exit "$tests_rc"
exit "$bench_rc"
