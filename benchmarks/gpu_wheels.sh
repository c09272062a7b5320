#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels benchmarks/gpu_run.sh needs on a GPU image that lacks them
# (jsonschema and its dependencies for lora-lite, the peft this project tests with), into .whl/.
# Python 3.12 x86-64 wheels; pass the target's version as $1 (default 312).
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-312}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp "${plat[@]}" \
  -d .whl jsonschema==4.26.0 referencing==0.37.0 jsonschema-specifications==2025.9.1 rpds-py==2026.9.1 peft==0.21.2
ls -la .whl
