#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu.sh needs on a GPU machine without package-index access
# (Python 3.12 there; pure-Python wheels plus pydantic-core for manylinux x86_64).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
$PIP download --quiet --dest .gpu-wheels --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any --no-deps \
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth pydantic==2.14.4 pydantic-core==2.50.5 annotated-types \
  typing-inspection typing-extensions
ls .gpu-wheels
