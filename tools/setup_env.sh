#!/usr/bin/env bash
# Set up .venv for memcore from nothing: torch (CPU build), JAX, Triton (its interpreter runs the
# kernel tests on a CPU), matplotlib for the experiments' plots, the test tools, transformers for
# memcore.hf, memcore itself (editable), and mamba-ssm's pure-torch parts as an oracle for the
# Mamba tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# Named exactly so pip takes the CPU build; a bare `torch` would pull a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[jax,triton,test,tasks,hf]"
# mamba-ssm without its CUDA extension (no GPU here): the tests use its pure-torch reference.
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
  pip install -q --no-build-isolation --no-deps "mamba-ssm>=2.2" einops
