#!/usr/bin/env bash
# Makes benchmarks/.venv-trl for benchmarks/compare_trl.py: TRL 1.12.0 (the last release with
# PPOTrainer, under trl.experimental.ppo) on the CPU torch 2.13.0 that tether uses. Never part of
# tether's dependencies. torch goes in first and is pinned by a constraint file for everything
# after it: any other torch requirement pulls gigabytes of CUDA wheels.
#   bash benchmarks/setup_trl.sh
set -euo pipefail
cd "$(dirname "$0")"
start=$(date +%s)

if [ ! -x .venv-trl/bin/python ]; then
  python3 -m venv .venv-trl
fi
PIP=".venv-trl/bin/python -m pip"
$PIP install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
$PIP install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"
# transformers: whatever trl 1.12 resolves to (it asks for >=4.56.2); tokenizers for the offline
# tokenizer the comparison builds.
$PIP install -q -c "$constraints" trl==1.12.0 tokenizers 2>&1 | grep -v '^WARNING: Location' || true
.venv-trl/bin/python - <<'PY'
import torch, transformers, trl
assert torch.__version__.startswith("2.13.0"), f"pip replaced torch: {torch.__version__}"
assert not torch.cuda.is_available() and "+cpu" in torch.__version__, torch.__version__
print(f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
PY
echo "TRL venv ready in benchmarks/.venv-trl ($(( $(date +%s) - start )) s)"
