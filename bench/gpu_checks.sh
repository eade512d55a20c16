#!/usr/bin/env bash
# The GPU checks, in one run on a machine with one CUDA GPU (what a session's lent GPU machine
# runs; it takes about four minutes):
#
#   bash bench/gpu_checks.sh [OUT_DIR]
#
# 1. bench/gpu_check.py: a 1 GiB CUDA state snapshotted through a real agent (pinned slots,
#    side stream, the optimizer pre-hook), restored bit-exactly; its stall per GiB beside a bare
#    device-to-host copy into pinned memory.
# 2. tests/gpu: the same at 64 MiB, and the bundled trainer on the GPU (NCCL, one rank) killed,
#    then its node lost, resuming bit for bit from its slot, then from its peers' fragments.
# 3. bench/snapshot_cpu.py: what one snapshot() call of the default model's state (hundreds of
#    leaves on the GPU) costs the training thread, beside a training step.
# 4. bench/train_overhead.py --ranks 1: steps/s of the default model on the GPU without
#    snapshots and with one every step.
#
# Each part runs even if one before it failed; their outputs go to OUT_DIR (default: $OUT, or
# bench/out/gpu) and the exit status says whether all passed. Where the machine's Python lacks
# memckpt's dependencies, put their wheels in .whl/ (see /work/.library/device/README.md):
# they are installed into /tmp/site first.
set -u -o pipefail
out=${1:-${OUT:-bench/out/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import memckpt.agent" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi -L
# snapshots live in /dev/shm: a VM's or container's default there can be too small for them
if [ "$(df --output=size -k /dev/shm | tail -1)" -lt $((16 << 20)) ]; then mount -o remount,size=32g /dev/shm; fi
df -h /dev/shm
python3 -c "import torch, grpc; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'grpc', grpc.__version__)"

failed=0
part() {  # part NAME SECONDS COMMAND...: runs one check under a time limit, its output teed to OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local status=${PIPESTATUS[0]}
    echo "=== $name: exit $status after $((SECONDS - started)) s"
    [ "$status" -eq 0 ] || failed=1
}
part gpu_check 90 python3 bench/gpu_check.py --size 1GiB --repeats 5 --json
part pytest_gpu 200 python3 -m pytest -q -p no:cacheprovider -o addopts=-ra tests/gpu
part snapshot_cpu 90 python3 bench/snapshot_cpu.py --preset default --repeats 20 --profile
part train_overhead 150 python3 bench/train_overhead.py --ranks 1 --preset default --steps 40 --rounds 2 --json
exit $failed
