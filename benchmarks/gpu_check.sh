#!/usr/bin/env bash
# One script for one H100/H200 with no network: the CUDA-marked tests and the throughput table.
#
#   bash benchmarks/gpu_check.sh              # from the repository root; results in $OUT
#
# Before (on a machine with network, once): bash benchmarks/fetch_gpu_wheels.sh  -> .whl/ (torchao)
# Everything lands in $OUT (default ./gpu_check_out), at most 8 files, none deeper than $OUT/x:
#   summary.md          GPU, driver/CUDA/torch versions, date, part statuses, the throughput table
#   env.txt             nvidia-smi, python/torch/CUDA/cuDNN versions, installed wheels
#   install.log         installing the wheels from .whl/ (--no-index: nothing is downloaded)
#   pytest_gpu.log      python -m pytest -m gpu (every test module; collection errors do not stop it)
#   throughput_4096.log, throughput_16384.log, throughput.jsonl   benchmarks/throughput.py
# Each part runs under its own `timeout` and is logged; a failing or timed-out part does not stop
# the next. Budget (seconds, worst case): env 15 + install 25 + throughput@4096 215 + pytest 140
# + throughput@16384 60 + 4 x 5 kill grace = 475 s, under 8 minutes. Rows run in priority order
# and throughput.py starts no row after its --budget-s, so a cut loses the least important rows. Override with T_INSTALL, T_THR4K, T_PYTEST,
# T_THR16K; WHEEL_DIR (default .whl), PYTHON (default python3).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-$REPO/.whl}
T_INSTALL=${T_INSTALL:-25}; T_THR4K=${T_THR4K:-215}; T_PYTEST=${T_PYTEST:-140}; T_THR16K=${T_THR16K:-60}
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
SUMMARY="$OUT/summary.md"
STATUS=()

part() {  # part NAME SECONDS LOG COMMAND...: run under timeout, log everything, record the status
  local name=$1 secs=$2 log=$3; shift 3
  local t0=$(date +%s)
  echo "=== $name (timeout ${secs}s) ===" | tee -a "$log"
  timeout --kill-after=5 "$secs" "$@" >>"$log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  local what="ok"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMED OUT"
  [ $rc -ne 0 ] && [ "$what" = ok ] && what="exit $rc"
  STATUS+=("| $name | $what | ${dt}s | $(basename "$log") |")
  echo "=== $name: $what after ${dt}s ===" | tee -a "$log"
  tail -n 25 "$log"
}

# --- environment ----------------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -a)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
  nvidia-smi 2>&1 | head -n 15
  timeout 30 "$PY" - <<'EOF' 2>&1
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "memory GiB", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
else:
    print("NO CUDA DEVICE VISIBLE")
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# --- wheels brought along (torchao) ----------------------------------------------------------------
if ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
  part "install wheels" "$T_INSTALL" "$OUT/install.log" \
    "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    "$WHEEL_DIR"/*.whl
  export PYTHONPATH="/tmp/gpu_check_site:$PYTHONPATH"
  ls "$WHEEL_DIR" >>"$OUT/env.txt"
else
  echo "no wheels in $WHEEL_DIR: torchao rows will say 'not installed'" | tee "$OUT/install.log"
  STATUS+=("| install wheels | skipped: no $WHEEL_DIR | 0s | install.log |")
fi
"$PY" -c "import torchao; print('torchao', torchao.__version__)" >>"$OUT/env.txt" 2>&1

# --- throughput at 4096: every row, in priority order (the headline figures) ------------------------
part "throughput seq 4096" "$T_THR4K" "$OUT/throughput_4096.log" \
  "$PY" benchmarks/throughput.py --seq 4096 --budget-s $(( T_THR4K - 70 )) --out "$OUT/throughput.jsonl"

# --- CUDA-marked tests --------------------------------------------------------------------------------
part "pytest -m gpu" "$T_PYTEST" "$OUT/pytest_gpu.log" \
  "$PY" -m pytest -m gpu -v -rA -p no:cacheprovider --continue-on-collection-errors tests

# --- throughput at 16384: the bf16 rows (fewer micro-batches: each one is 4x longer) -----------------
part "throughput seq 16384" "$T_THR16K" "$OUT/throughput_16384.log" \
  "$PY" benchmarks/throughput.py --seq 16384 --microbatches 2 --steps 3 --rows local-bf16-fsdp,local-bf16-fsdp-compile \
  --budget-s $(( T_THR16K - 40 )) --out "$OUT/throughput.jsonl"

# --- summary ------------------------------------------------------------------------------------------
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo '```'
  cat "$OUT/env.txt"
  echo '```'
  echo
  echo "| part | status | time | log |"
  echo "|---|---|---|---|"
  printf '%s\n' "${STATUS[@]}"
  echo
  echo "## pytest -m gpu"
  echo '```'
  grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$OUT/pytest_gpu.log" | tail -n 30
  echo '```'
  for seq in 4096 16384; do
    echo
    echo "## throughput, seq $seq"
    echo
    # the table and the lines around it that benchmarks/throughput.py prints last
    if grep -q '^| row ' "$OUT/throughput_$seq.log" 2>/dev/null; then
      grep -E "^measured " "$OUT/throughput_$seq.log" | tail -n 1
      echo
      sed -n '/^| row /,$p' "$OUT/throughput_$seq.log"
    else  # no table (crashed or timed out): the rows that finished, then the end of the log
      echo "no table printed; finished rows (throughput.jsonl) and the end of the log:"
      echo '```'
      grep -E '"row": ' "$OUT/throughput_$seq.log" 2>/dev/null | cut -c1-400
      tail -n 15 "$OUT/throughput_$seq.log" 2>/dev/null
      echo '```'
    fi
  done
  echo
  echo "total $(( $(date +%s) - START ))s"
} >"$SUMMARY" 2>&1
cat "$SUMMARY"
