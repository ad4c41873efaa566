#!/usr/bin/env bash
# Two-GPU check of dorafactors' distributed support: single GPU vs FSDP2 vs DeepSpeed ZeRO-3 (and FSDP1,
# FSDP2 with adapters sharded alone), 20 steps of a small Llama-shaped DoRA model, same seed and data.
#
#   bash examples/distributed/run_2gpu.sh            # from the repository root; results to $OUT or ./dist_run
#   SMOKE=1 bash examples/distributed/run_2gpu.sh    # the same on CPU (gloo) with a tiny model: checks the script
#
# Installs the carried wheels from .whl/ (offline) into /tmp/site, runs each job in its own process with a
# timeout (a failure is recorded, not fatal), compares losses (examples/distributed/compare.py) and writes
# logs, per-run JSON and summary.json. Budget: < 6 minutes. Exit status: 0 when FSDP2 and ZeRO-3 match.
set -u
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
RES=${OUT:-$ROOT/dist_run}
mkdir -p "$RES"
LOG="$RES/driver.log"
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

export NCCL_NVLS_ENABLE=0          # NVLink multicast stays off
export DS_BUILD_OPS=0              # DeepSpeed: no op builds (we use a torch optimizer)
export DS_SKIP_CUDA_CHECK=1
export TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=4
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

echo "== install carried wheels ($(ls .whl/*.whl 2>/dev/null | wc -l) files) [$(elapsed)s]"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || echo "WARN: wheel install failed"
fi
export PYTHONPATH=/tmp/site:$ROOT:${PYTHONPATH:-}

echo "== environment [$(elapsed)s]"
$PY - <<'EOF' 2>&1 | tee "$RES/env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for name in ("transformers", "peft", "accelerate", "deepspeed", "triton", "pydantic", "hjson"):
    try:
        m = importlib.import_module(name); print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as exc:
        print(name, "IMPORT FAILED:", type(exc).__name__, exc)
try:
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    # a ZeRO-3 run with a torch optimizer (zero_allow_untested_optimizer) needs no compiled / JIT-built op
    print("deepspeed accelerator:", acc.device_name(), "| comm backend:", acc.communication_backend_name())
except Exception as exc:
    print("deepspeed accelerator check:", type(exc).__name__, exc)
EOF

# run NAME TIMEOUT_S CMD...   -> $RES/NAME.log, $RES/NAME.json (from the script), $RES/NAME.status.json
run() {
  local name=$1 limit=$2; shift 2
  echo "== $name (timeout ${limit}s) [$(elapsed)s]"
  local t=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t ))
  local reason="ok"
  # a failed mode reports the worker's own exception, not torchrun's ChildFailedError banner
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then reason="timeout after ${limit}s";
  elif [ $rc -ne 0 ]; then reason="exit $rc: $($PY examples/distributed/first_error.py "$RES/$name.log" --one-line | tr -d '"\\' | cut -c1-300)"; fi
  printf '{"mode": "%s", "rc": %d, "seconds": %d, "reason": "%s"}\n' "$name" "$rc" "$took" "$reason" > "$RES/$name.status.json"
  echo "   -> $reason (${took}s)"
  if [ $rc -ne 0 ]; then
    $PY examples/distributed/first_error.py "$RES/$name.log" | sed 's/^/   | /'
  else
    tail -n 3 "$RES/$name.log" | sed 's/^/   | /'
  fi
}

TRAIN=examples/distributed/train_dora.py
COMMON="--steps 20 --hidden 1024 --intermediate 2816 --layers 4 --vocab 8192 --seq 512 --batch 8 --rank 64"
if [ "${SMOKE:-0}" = "1" ]; then  # CPU smoke test of this script (gloo, tiny model): SMOKE=1 bash run_2gpu.sh
  COMMON="--device cpu --steps 4 --hidden 64 --intermediate 128 --layers 2 --heads 4 --kv-heads 2 --vocab 256 --seq 32 --batch 4 --rank 8"
  export DS_ACCELERATOR=cpu PEFT_DORA_FUSED=0
fi
port=29500
next_port() { port=$((port + 7)); echo $port; }

run single 80  env CUDA_VISIBLE_DEVICES=0 $PY $TRAIN --mode single $COMMON --out "$RES/single.json"
run fsdp2  90 $PY -m torch.distributed.run --nproc_per_node=2 --master_port=$(next_port) $TRAIN --mode fsdp2 $COMMON --out "$RES/fsdp2.json"
run zero3  130 $PY -m torch.distributed.run --nproc_per_node=2 --master_port=$(next_port) $TRAIN --mode zero3 $COMMON --out "$RES/zero3.json"
# cheap extras, only while the budget allows (total limit ~6 minutes)
if [ "$(elapsed)" -lt 250 ]; then
  run fsdp1 70 $PY -m torch.distributed.run --nproc_per_node=2 --master_port=$(next_port) $TRAIN --mode fsdp1 $COMMON --out "$RES/fsdp1.json"
fi
if [ "$(elapsed)" -lt 290 ]; then
  run fsdp2_adapters 60 $PY -m torch.distributed.run --nproc_per_node=2 --master_port=$(next_port) $TRAIN --mode fsdp2_adapters $COMMON --out "$RES/fsdp2_adapters.json"
fi

echo "== compare [$(elapsed)s]"
$PY examples/distributed/compare.py "$RES" --out "$RES/summary.json"
rc=$?
echo "== done in $(elapsed)s; results in $RES"
exit $rc
