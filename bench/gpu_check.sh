#!/usr/bin/env bash
# GPU validation in one command (issues 7, 16): build, the training loop's loss call timed first, GPU
# tests, copy bandwidth and fused-loss rows, train-step benchmark, and a markdown table of results vs
# the targets, printed last.
#
#   OUT=/some/dir bash bench/gpu_check.sh            # on the GPU machine (one H200), from anywhere
#   OUT=/some/dir bash bench/gpu_check.sh --with-compile   # also the torch.compile(G) R101 step
#   OUT=/some/dir bash bench/gpu_check.sh --with-real-size # also the real-size torchrun rehearsal
#   bash bench/gpu_check.sh --cpu-dry-run            # same steps on a CPU machine, tiny shapes
#
# Order: what decides the next change first (build, the loss kernels' correctness on every CUDA
# backend, the training loop's own loss call, the bandwidth rows, the train step and where its time
# goes), then the rest of the GPU tests, then the graph tests in their own process (a failed capture can
# leave the CUDA allocator unusable for the rest of a process). Every step is time-boxed with `timeout`
# against one budget (GPU_CHECK_BUDGET_S, default 360 s: the check must end inside 6.5 minutes with 30 s
# to spare, so that a 15-minute device lease holds start-up, this run and one rerun); a step that fails,
# times out or has no time left is reported in the table and the script goes on, and every benchmark
# rewrites its JSON after each case or round, so a timeout or a failing provider keeps the rows already
# measured (a provider that raises is recorded with its error text while the others go on). The
# dry run also makes one train-step provider fail on purpose (bench_step --fail), so the table shows a
# failure's row beside the others. The torch.compile R101 step (minutes of inductor warm-up) and the
# real-size rehearsal run only when asked, after the rest, under their own limits (GPU_CHECK_COMPILE_S,
# default 240 s; 130 s) outside the budget. Files under $OUT (flat, at most 8):
# build.log, run.log (every other step's output, with "@@step" markers the table is built from),
# bench_loss_production.json, bench_loss.json, bench_step.json, bench_step_compile.json,
# step_profile.json, summary.md. $OUT defaults to a new temp dir.
# Python: $PYTHON, else python3 (GPU) / .venv/bin/python when present (dry run).
# Exit status: 0 when every step ran and exited 0 (targets missed do not fail it), else 1.
set -uo pipefail

MODE=gpu
WITH_COMPILE=0
WITH_REAL_SIZE=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) MODE=cpu ;;
    --with-compile) WITH_COMPILE=1 ;;
    --with-real-size) WITH_REAL_SIZE=1 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --cpu-dry-run, --with-compile, --with-real-size or --help)" >&2
       exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
if [[ -z "${PYTHON:-}" ]]; then
  if [[ $MODE == cpu && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$OUT"
RUNLOG="$OUT/run.log"
: > "$RUNLOG"
# The source tree itself is the package (pwda_fast/kernels/__init__.py finds kernels/); setup.py finds
# the CUDA toolkit from the nvcc on PATH unless CUDA_HOME is set.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The dry run's budget is generous: its steps are tiny, and a loaded CI machine must not turn a slow
# step into a "time budget spent" failure (the 360 s is the GPU lease's arithmetic, not the dry run's).
DEFAULT_BUDGET=360
[[ $MODE == cpu ]] && DEFAULT_BUDGET=900
BUDGET="${GPU_CHECK_BUDGET_S:-$DEFAULT_BUDGET}"
COMPILE_LIMIT="${GPU_CHECK_COMPILE_S:-240}"
T0=$SECONDS
FAILED=0

say() { printf '[%4ds] %s\n' "$((SECONDS - T0))" "$*"; }

# step NAME CAP_S LOGFILE CMD...: run CMD under `timeout` (at most CAP_S, and never past the budget,
# keeping 10 s for the table), output appended to LOGFILE, "@@step" markers in run.log.
# OWN_LIMIT=1 step ...: CAP_S alone bounds it (the opt-in compile step, run after the budgeted ones).
step() {
  local name=$1 cap=$2 log=$3; shift 3
  # The caps are sized for the GPU machine; a loaded CPU is slower (opt-in steps keep their own limit).
  [[ $MODE == cpu && ${OWN_LIMIT:-0} != 1 ]] && cap=$((cap * 3))
  local left=$((BUDGET - (SECONDS - T0) - 10))
  ((${OWN_LIMIT:-0} == 1)) && left=$cap
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    echo "@@step $name skipped time budget" >> "$RUNLOG"
    say "$name: skipped (time budget spent)"; FAILED=1; return 0
  fi
  echo "@@step $name start limit=${limit}" >> "$RUNLOG"
  [[ $log != "$RUNLOG" ]] && echo "@@step $name start limit=${limit}" >> "$log"
  local t=$SECONDS rc
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  echo "@@step $name rc=$rc seconds=$((SECONDS - t)) limit=$limit" >> "$RUNLOG"
  say "$name: rc=$rc in $((SECONDS - t)) s (limit $limit s)"
  ((rc != 0)) && FAILED=1
  return 0
}

skip() {  # skip NAME REASON
  echo "@@step $1 skipped $2" >> "$RUNLOG"
  say "$1: skipped ($2)"
}

if [[ $MODE == gpu ]]; then
  DEV=cuda
  PRODUCTION_ARGS=(--shapes production --rounds 10 --calls 20)
  LOSS_ARGS=(--shapes bandwidth --rounds 5 --calls 10)
  UPSAMPLE_ARGS=()
  REAL_SIZE_ARGS=(--iters 50 --workers 4 8)
  STEP_ARGS=(--preset paper)
  TIMING_ARGS=(--iters 3 --rounds 3 --warmup 2)  # after 6 agreement steps: graphs captured at step 3
  FAIL_ARGS=()
  COMPILE_TIMING_ARGS=(--iters 3 --rounds 2 --warmup 3)
  # Compiled kernels kept in the (ignored) build folder: a rerun on the same machine starts warm.
  export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ROOT/build/inductor_cache}"
  export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$ROOT/build/triton_cache}"
else
  DEV=cpu
  PRODUCTION_ARGS=(--shapes tiny --rounds 2 --no-compile)
  LOSS_ARGS=(--shapes tiny --rounds 3)
  UPSAMPLE_ARGS=(--shape 1 8 9 17 --size 65 129 --rounds 2 --calls 2 --no-compile)
  REAL_SIZE_ARGS=(--cpu-dry-run)
  STEP_ARGS=(--preset toy --crop 32 64 --batch 1 --threads 1)
  TIMING_ARGS=(--iters 1 --rounds 1 --warmup 1)
  FAIL_ARGS=(--fail "engine bf16 channels_last")
  COMPILE_TIMING_ARGS=(--iters 1 --rounds 1 --warmup 1)
fi
say "gpu_check ($MODE) in $ROOT, OUT=$OUT, python=$PYTHON, budget ${BUDGET}s"

# 0. What is here: versions, device, which backends can run (one JSON line after "@@probe").
step probe 60 "$RUNLOG" "$PYTHON" -c '
import json, sys, torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError as e:
    info["triton"] = None
print("@@probe " + json.dumps(info))'
if [[ $MODE == gpu ]] && ! grep -q '"cuda_available": true' "$RUNLOG"; then
  say "no CUDA device visible: the GPU steps are skipped (use --cpu-dry-run on a CPU machine)"
  for s in build gpu_tests_kernels bench_loss_production bench_loss bench_upsample bench_step step_profile \
    gpu_tests gpu_tests_graphs real_size bench_step_compile; do
    skip $s "no CUDA device"
  done
  FAILED=1
else
  # 1. Build the extension in place (sm_90 only, to save time). A stale .so from an earlier build
  #    is removed first, so a failed build shows as "ext unavailable" rather than testing old code.
  #    Dry run: evaluate setup.py with the same environment, compile nothing (minutes on 2 cores).
  if [[ $MODE == gpu ]]; then
    rm -f pwda_fast/_C*.so
    step build 120 "$OUT/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" \
      "$PYTHON" setup.py build_ext --inplace
  else
    step build 60 "$OUT/build.log" env TORCH_CUDA_ARCH_LIST=9.0 "$PYTHON" setup.py --name
  fi
  # Which backends can run now (after the build): one JSON line after "@@backends".
  step backends 30 "$RUNLOG" "$PYTHON" -c '
import json
from pwda_fast import ops
devs = ["cpu", "cuda"]
print("@@backends " + json.dumps({b: {d: ops.LOSS.problem(b, d) for d in devs} for b in ("ext", "triton")}))'

  # 2. The loss kernels' correctness on every CUDA backend (ext, ext_v2, triton) and the upsample
  #    kernel's: the verdict the next kernel waits for, before anything is timed.
  KERNEL_TESTS=(tests/test_weighted_adv_loss.py tests/test_weighted_adv_loss_v2.py tests/test_upsample_leaky_relu.py)
  step gpu_tests_kernels 60 "$RUNLOG" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu "${KERNEL_TESTS[@]}"
  if [[ $MODE == cpu ]]; then
    # Dry run only: the Triton kernel under the CPU interpreter, on its cheap test cases.
    step triton_interpret 60 "$RUNLOG" env TRITON_INTERPRET=1 "$PYTHON" -m pytest -q -p no:cacheprovider \
      tests/test_weighted_adv_loss.py tests/test_upsample_leaky_relu.py \
      -k "triton and (shape1 or low_precision or channels_last or large_logits or upsample_leaky_relu)"
  fi

  # 3. The training loop's own loss call (production row), fwd and fwd+bwd: the key numbers, first.
  step bench_loss_production 45 "$RUNLOG" "$PYTHON" bench/bench_loss.py --device "$DEV" \
    "${PRODUCTION_ARGS[@]}" --json "$OUT/bench_loss_production.json"

  # 4. Copy bandwidth + fused loss fwd and fwd+bwd: eager, torch.compile, ext, ext_v2, triton; fp32, bf16.
  step bench_loss 50 "$RUNLOG" "$PYTHON" bench/bench_loss.py --device "$DEV" "${LOSS_ARGS[@]}" \
    --json "$OUT/bench_loss.json"

  # 4b. D_aux's leaky_relu(upsample(.)) at image size: eager, torch.compile, the Triton kernels (its table
  #     goes to run.log only: $OUT holds at most 8 files).
  step bench_upsample 30 "$RUNLOG" "$PYTHON" bench/bench_upsample_leaky_relu.py --device "$DEV" "${UPSAMPLE_ARGS[@]}"

  # 5. Train step: eager fp32 NCHW loop vs engine (fp32, bf16, bf16 + CUDA graphs, which first runs 6
  #    steps beside its eager twin: the agreement row); then where the step's time goes.
  step bench_step 60 "$RUNLOG" "$PYTHON" bench/bench_step.py --device "$DEV" "${STEP_ARGS[@]}" \
    "${TIMING_ARGS[@]}" "${FAIL_ARGS[@]}" --json "$OUT/bench_step.json"
  step step_profile 45 "$RUNLOG" "$PYTHON" bench/step_profile.py --device "$DEV" "${STEP_ARGS[@]}" \
    --json "$OUT/step_profile.json"

  # 6. The other GPU tests (every file with a gpu mark but the kernels' and the graphs'), then the graph
  #    tests last, in their own process.
  mapfile -t GPU_TEST_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py | grep -v -e test_graphs.py \
    -e test_weighted_adv_loss.py -e test_weighted_adv_loss_v2.py -e test_upsample_leaky_relu.py)
  step gpu_tests 40 "$RUNLOG" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu "${GPU_TEST_FILES[@]}"
  step gpu_tests_graphs 45 "$RUNLOG" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_graphs.py

  # 7. Opt-in, outside the budget: the whole pipeline at real size (generated GTA5 / Cityscapes trees at
  #    their published resolutions, torchrun training with 4 and 8 loader workers; images/s against
  #    bench_step's), and the torch.compile(G) step.
  if [[ $WITH_REAL_SIZE == 1 || $MODE == cpu ]]; then
    OWN_LIMIT=1 step real_size 130 "$RUNLOG" "$PYTHON" bench/real_size_run.py --out "$ROOT/build/real_size" \
      --bench-step "$OUT/bench_step.json" "${REAL_SIZE_ARGS[@]}"
  else
    skip real_size "opt-in: --with-real-size"
  fi
  if [[ $WITH_COMPILE == 1 || $MODE == cpu ]]; then
    OWN_LIMIT=1 step bench_step_compile "$COMPILE_LIMIT" "$RUNLOG" "$PYTHON" bench/bench_step.py \
      --device "$DEV" "${STEP_ARGS[@]}" "${COMPILE_TIMING_ARGS[@]}" --compile --json "$OUT/bench_step_compile.json"
  else
    skip bench_step_compile "opt-in: --with-compile"
  fi
fi

# 6. The table, printed last.
"$PYTHON" bench/gpu_summary.py --out "$OUT" --mode "$MODE" > /dev/null 2>> "$RUNLOG" || {
  echo "gpu_summary.py failed; see $RUNLOG" >&2; FAILED=1; }
say "done in $((SECONDS - T0)) s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo
cat "$OUT/summary.md" 2>/dev/null
exit $FAILED
