#!/usr/bin/env bash
# The GPU checks in one prepared command for a CUDA machine: the tests marked `gpu`
# (numerics on cuda, CUDA-graph capture with a tensor tau, one kernel per flat group)
# and the GPU benchmark table. Logs and JSON go to $OUT (the device tool) or ./gpu-check/.
# Needs torch, pytest and hypothesis; stable-baselines3 only for the SB3 row of the table.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
out="${OUT:-gpu-check}"
mkdir -p "$out"
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' | tee "$out/env.txt"
"$py" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
"$py" -m rlweights bench --device cuda --rounds "${ROUNDS:-30}" --json "$out/bench-cuda.json" \
  2>&1 | tee "$out/bench-cuda.md"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, bench exit $bench"
exit $((tests != 0 || bench != 0))
