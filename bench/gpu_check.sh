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
# times out or has no time left is reported in the summary and the script goes on.
#
# One harness: the benchmarks are the pytest-benchmark suites `make bench` runs (bench/test_bench_*.py),
# here with GPU sizes. Every step, benchmark row, test count and measured fact goes into one file,
# $OUT/rows.jsonl (bench/rows.py's schema), appended as each is measured: a crash or a timeout keeps
# every row written before it, and a provider that raises is a row with its error text while the
# others are timed. bench/rows.py renders the summary from it, with the same tables as BENCHMARKS.md.
# The dry run also makes one train-step provider fail on purpose (--bench-fail), so the summary shows a
# failure's row beside the others. The torch.compile R101 step (minutes of inductor warm-up) and the
# real-size rehearsal run only when asked, after the rest, under their own limits (GPU_CHECK_COMPILE_S,
# default 240 s; 130 s) outside the budget. Files under $OUT: build.log, run.log (every step's output),
# rows.jsonl, summary.md. $OUT defaults to a new temp dir.
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
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
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
ROWS="$OUT/rows.jsonl"
: > "$RUNLOG"
: > "$ROWS"
# The source tree itself is the package (pwda_fast/kernels/__init__.py finds kernels/); setup.py finds
# the CUDA toolkit from the nvcc on PATH unless CUDA_HOME is set.
# PWDA_BENCH_ROWS: tests/conftest.py appends each test step's counts and failures there.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PWDA_BENCH_ROWS="$ROWS"
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
# keeping 10 s for the summary), output appended to LOGFILE, its status one "step" row.
# OWN_LIMIT=1 step ...: CAP_S alone bounds it (the opt-in steps, run after the budgeted ones).
step() {
  local name=$1 cap=$2 log=$3; shift 3
  # The caps are sized for the GPU machine; a loaded CPU is slower (opt-in steps keep their own limit).
  [[ $MODE == cpu && ${OWN_LIMIT:-0} != 1 ]] && cap=$((cap * 3))
  local left=$((BUDGET - (SECONDS - T0) - 10))
  ((${OWN_LIMIT:-0} == 1)) && left=$cap
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    skip "$name" "time budget spent"; FAILED=1; return 0
  fi
  echo "@@step $name start limit=${limit}" >> "$log"
  local t=$SECONDS rc
  PWDA_BENCH_STEP=$name timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  printf '{"kind": "step", "name": "%s", "rc": %d, "seconds": %d, "limit": %d}\n' \
    "$name" "$rc" "$((SECONDS - t))" "$limit" >> "$ROWS"
  say "$name: rc=$rc in $((SECONDS - t)) s (limit $limit s)"
  ((rc != 0)) && FAILED=1
  return 0
}

skip() {  # skip NAME REASON
  printf '{"kind": "step", "name": "%s", "skipped": "%s"}\n' "$1" "$2" >> "$ROWS"
  say "$1: skipped ($2)"
}

# The bench suites (bench/conftest.py), each appending its rows to $ROWS.
SUITE=("$PYTHON" -m pytest -q -p no:cacheprovider --bench-device)
if [[ $MODE == gpu ]]; then
  DEV=cuda
  PRODUCTION_ARGS=(--bench-shapes production --bench-rounds 10 --bench-calls 20)
  LOSS_ARGS=(--bench-shapes bandwidth --bench-rounds 5 --bench-calls 10)
  UPSAMPLE_ARGS=()
  REAL_SIZE_ARGS=(--iters 50 --workers 4 8)
  STEP_ARGS=(--bench-preset paper --bench-iters 3 --bench-rounds 3 --bench-warmup 2)  # after 6 agreement steps
  PROFILE_ARGS=(--preset paper)
  COMPILE_ARGS=(--bench-preset paper --bench-iters 3 --bench-rounds 2 --bench-warmup 3)
  # Compiled kernels kept in the (ignored) build folder: a rerun on the same machine starts warm.
  export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ROOT/build/inductor_cache}"
  export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$ROOT/build/triton_cache}"
else
  DEV=cpu
  PRODUCTION_ARGS=(--bench-shapes tiny --bench-rounds 2 -k "not compile")
  LOSS_ARGS=(--bench-shapes tiny --bench-rounds 3)
  UPSAMPLE_ARGS=(--bench-rounds 2 --bench-calls 2 -k "not compile")
  REAL_SIZE_ARGS=(--cpu-dry-run)
  STEP_ARGS=(--bench-preset toy --bench-iters 1 --bench-rounds 1 --bench-warmup 1 --bench-threads 1
             --bench-fail "engine bf16 channels_last")
  PROFILE_ARGS=(--preset toy --crop 32 64 --batch 1 --threads 1)
  COMPILE_ARGS=(--bench-preset toy --bench-iters 1 --bench-rounds 1 --bench-warmup 1 --bench-threads 1)
fi
say "gpu_check ($MODE) in $ROOT, OUT=$OUT, python=$PYTHON, budget ${BUDGET}s"

# 0. What is here: versions, device (a "probe" fact row).
step probe 60 "$RUNLOG" "$PYTHON" -c '
import json, os, sys, torch
info = {"kind": "fact", "name": "probe", "python": sys.version.split()[0], "torch": torch.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError as e:
    info["triton"] = None
with open(os.environ["PWDA_BENCH_ROWS"], "a") as f:
    f.write(json.dumps(info) + "\n")'
if [[ $MODE == gpu ]] && ! grep -q '"cuda_available": true' "$ROWS"; then
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
  # Which backends can run now (after the build): a "backends" fact row.
  step backends 30 "$RUNLOG" "$PYTHON" -c '
import json, os
from pwda_fast import ops
problems = {f"{t.key}.{b}": {d: t.problem(b, d) for d in ("cpu", "cuda")} for t in (ops.LOSS, ops.UPSAMPLE)
            for b in t.problems}
with open(os.environ["PWDA_BENCH_ROWS"], "a") as f:
    f.write(json.dumps({"kind": "fact", "name": "backends", "problems": problems}) + "\n")'

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

  # 3. The training loop's own loss call (production case), fwd and fwd+bwd: the key numbers, first.
  step bench_loss_production 45 "$RUNLOG" "${SUITE[@]}" "$DEV" --bench-rows "$ROWS" bench/test_bench_loss.py \
    "${PRODUCTION_ARGS[@]}"

  # 4. Copy bandwidth + fused loss fwd and fwd+bwd: eager, torch.compile, ext, ext_v2, triton; fp32, bf16.
  step bench_loss 50 "$RUNLOG" "${SUITE[@]}" "$DEV" --bench-rows "$ROWS" bench/test_bench_loss.py "${LOSS_ARGS[@]}"

  # 4b. D_aux's leaky_relu(upsample(.)) at image size: eager, torch.compile, the Triton kernel.
  step bench_upsample 30 "$RUNLOG" "${SUITE[@]}" "$DEV" --bench-rows "$ROWS" bench/test_bench_upsample.py \
    "${UPSAMPLE_ARGS[@]}"

  # 5. Train step: eager fp32 NCHW loop vs engine (fp32, bf16, bf16 + CUDA graphs, which first runs 6
  #    steps beside its eager twin: the agreement row); then where the step's time goes.
  step bench_step 60 "$RUNLOG" "${SUITE[@]}" "$DEV" --bench-rows "$ROWS" bench/test_bench_step.py "${STEP_ARGS[@]}"
  step step_profile 45 "$RUNLOG" "$PYTHON" bench/step_profile.py --device "$DEV" "${PROFILE_ARGS[@]}" --rows "$ROWS"

  # 6. The other GPU tests (every file with a gpu mark but the kernels' and the graphs'), then the graph
  #    tests last, in their own process.
  mapfile -t GPU_TEST_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py | grep -v -e test_graphs.py \
    -e test_weighted_adv_loss.py -e test_weighted_adv_loss_v2.py -e test_upsample_leaky_relu.py)
  step gpu_tests 40 "$RUNLOG" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu "${GPU_TEST_FILES[@]}"
  step gpu_tests_graphs 45 "$RUNLOG" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_graphs.py

  # 7. Opt-in, outside the budget: the whole pipeline at real size (generated GTA5 / Cityscapes trees at
  #    their published resolutions, torchrun training with 4 and 8 loader workers; images/s against
  #    the bench step's), and the torch.compile(G) step.
  if [[ $WITH_REAL_SIZE == 1 || $MODE == cpu ]]; then
    OWN_LIMIT=1 step real_size 130 "$RUNLOG" "$PYTHON" bench/real_size_run.py --out "$ROOT/build/real_size" \
      --rows "$ROWS" "${REAL_SIZE_ARGS[@]}"
  else
    skip real_size "opt-in: --with-real-size"
  fi
  if [[ $WITH_COMPILE == 1 || $MODE == cpu ]]; then
    OWN_LIMIT=1 step bench_step_compile "$COMPILE_LIMIT" "$RUNLOG" "${SUITE[@]}" "$DEV" --bench-rows "$ROWS" \
      bench/test_bench_step.py "${COMPILE_ARGS[@]}" --bench-step-compile -k "eager or compile"
  else
    skip bench_step_compile "opt-in: --with-compile"
  fi
fi

# 8. The summary, printed last.
"$PYTHON" bench/rows.py summary "$OUT" --mode "$MODE" > /dev/null 2>> "$RUNLOG" || {
  echo "bench/rows.py summary failed; see $RUNLOG" >&2; FAILED=1; }
say "done in $((SECONDS - T0)) s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo
cat "$OUT/summary.md" 2>/dev/null
exit $FAILED
