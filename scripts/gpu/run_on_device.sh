#!/usr/bin/env bash
# Run THERE, on the lent GPU machine, from the repo root (the `run` tool's working directory),
# with .gpu-wheels/ carried (scripts/gpu/fetch_wheels.sh fills it here). The machine's own python3
# and its CUDA torch are what is tested: nothing here installs or replaces torch.
#
#   1. install the pins the machine lacks (or has at another version) from .gpu-wheels into
#      /tmp/gpu-site, first on PYTHONPATH with the repo itself (no pip install -e: no index there)
#   2. print nvidia-smi and the torch / CUDA versions
#   3. make test-gpu, then make bench-gpu on a random SmolLM2-135M-shaped model (the embedded
#      model's 94 MB GGUF cannot travel), each under its own time limit
#   4. copy the logs and bench/results/gpu.{json,md} to $OUT (at most 8 files come back)
#
# The defaults end in about 7 minutes, so one `run` call (10 minutes at most) fits with room to
# spare. STEPS="bench" (or "test") reruns one half; the limits and bench flags can be overridden:
STEPS=${STEPS:-"test bench"}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-180}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-240}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-$((BENCH_TIMEOUT_S - 60))}  # start nothing new after this; then write and stop
BENCH_ARGS=${BENCH_ARGS:-"--random-smollm2 --tokenizer .gpu-wheels/smollm2-tokenizer"}
PY=${GPU_PY:-python3}
OUT=${OUT:-/tmp/gpu-out}
WHEELS=.gpu-wheels
SITE=/tmp/gpu-site
set -uo pipefail
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# No default model there: the tests build their tiny model (and bench its random SmolLM2) on this tokenizer.
export EDGELLM_TEST_TOKENIZER=$PWD/$WHEELS/smollm2-tokenizer
# The carried pytest may be newer than the plugins of the machine's image: load only ours.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 PYTEST_ADDOPTS="-p pytest_asyncio.plugin"
started=$(date +%s)
since() { echo "[$(( $(date +%s) - started )) s] $*"; }

if [[ ! -f $WHEELS/pins.txt ]]; then
  echo "error: $WHEELS/pins.txt missing: run scripts/gpu/fetch_wheels.sh here and carry $WHEELS" >&2
  exit 2
fi
missing=$("$PY" - "$WHEELS/pins.txt" <<'PYEOF'
import importlib.metadata as md, sys
for pin in open(sys.argv[1]).read().split():
    name, _, version = pin.partition("==")
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have != version:
        print(pin)
        print(f"  {name}: {have or 'absent'} here, installing {version}", file=sys.stderr)
PYEOF
)
if [[ -n $missing ]]; then
  # shellcheck disable=SC2086  # one pin per word
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    --find-links "$WHEELS" $missing || exit 3
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
since "installed: ${missing:-nothing}" | tr '\n' ' '; echo

{
  nvidia-smi
  "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| CUDA", torch.version.cuda, "| available", torch.cuda.is_available(), "|", torch.cuda.get_device_name(0)
if torch.cuda.is_available() else "", "| transformers", transformers.__version__)'
} 2>&1 | tee "$OUT/env.txt"

# make is in the image as described; where it is not, the targets' own commands run instead.
test_cmd=(make test-gpu GPU_PY="$PY")
bench_cmd=(make bench-gpu GPU_PY="$PY" BENCH_GPU_ARGS="$BENCH_ARGS --budget-s $BENCH_BUDGET_S")
if ! command -v make >/dev/null; then
  test_cmd=("$PY" -m pytest -q -m gpu tests/gpu)
  # shellcheck disable=SC2206  # the flags split into words
  bench_cmd=("$PY" -m bench.gpu $BENCH_ARGS --budget-s "$BENCH_BUDGET_S")
fi

rc=0
if [[ " $STEPS " == *" test "* ]]; then
  since "make test-gpu (limit ${TEST_TIMEOUT_S} s)"
  timeout -k 10 "$TEST_TIMEOUT_S" "${test_cmd[@]}" 2>&1 | tee "$OUT/test-gpu.log"
  test_rc=${PIPESTATUS[0]}; since "make test-gpu: exit $test_rc"; (( test_rc )) && rc=1
fi
if [[ " $STEPS " == *" bench "* ]]; then
  since "make bench-gpu (limit ${BENCH_TIMEOUT_S} s, budget ${BENCH_BUDGET_S} s)"
  timeout -k 10 "$BENCH_TIMEOUT_S" "${bench_cmd[@]}" >"$OUT/bench-gpu.log" 2>&1
  bench_rc=$?; since "make bench-gpu: exit $bench_rc"; (( bench_rc )) && rc=1
  grep -v '^\[.*\] {' "$OUT/bench-gpu.log" | tail -n 40  # the per-system JSON lines are in gpu.json
  cp bench/results/gpu.json bench/results/gpu.md "$OUT/" 2>/dev/null || echo "no bench/results/gpu.{json,md}"
fi
since "done, exit $rc"
exit "$rc"
