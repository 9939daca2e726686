#!/usr/bin/env bash
# Fetch the wheels the GPU host lacks (Python 3.12, x86-64 Linux, no network there) into .whl/
# (git-ignored), where the package registry is reachable. Diffusers is the one SuperGen needs;
# ftfy (and its wcwidth) lets WanPipeline clean prompts as it does on a full install. Every other
# requirement is in that host's image; scripts/gpu_check.py's docstring says what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.7.0
ls -l .whl
