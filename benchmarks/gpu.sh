#!/usr/bin/env bash
# One H200 run, under 8 minutes (see benchmarks/gpu.py); --tiny runs it on a CPU.
cd "$(dirname "$0")/.." && PYTHONPATH=. exec "${PYTHON:-python}" benchmarks/gpu.py "$@"
