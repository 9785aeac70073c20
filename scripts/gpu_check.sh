#!/usr/bin/env bash
# The GPU checks in one prepared command for a CUDA machine: the tests marked `gpu`
# (numerics on cuda, CUDA-graph capture with a tensor tau, one kernel per flat group, a whole
# SAC update captured and replayed, --compile --cudagraphs training), the GPU benchmark table
# of the ops and, where gymnasium and SB3 are there, the agents' table (bench-train). Logs and
# JSON go to $OUT when it is set, else to ./gpu-check/.
# Needs torch, pytest and hypothesis; stable-baselines3 only for the SB3 row of the table.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
out="${OUT:-gpu-check}"
mkdir -p "$out"
# Packages a GPU machine without network access lacks (gymnasium, stable-baselines3 and their
# needs) can be put as wheels in .whl/; without them the agent checks are skipped.
if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' | tee "$out/env.txt"
# -o addopts="": the tests in one process, without pyproject's pytest-xdist options
"$py" -m pytest -q -o addopts="" -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
"$py" -m rlweights bench --device cuda --rounds "${ROUNDS:-30}" --json "$out/bench-cuda.json" \
  2>&1 | tee "$out/bench-cuda.md"
bench=${PIPESTATUS[0]}
agents=0
if "$py" -c 'import gymnasium, stable_baselines3' 2>/dev/null; then
  # native SAC and TD3 eager / --compile / --compile --cudagraphs against SB3 on this GPU
  "$py" -m rlweights bench-train --device cuda --algos sac td3 --rounds 1 \
    --impls native compile cudagraphs sb3 --steps "${STEPS:-2000}" \
    --json "$out/bench-train-cuda.json" 2>&1 | tee "$out/bench-train-cuda.md"
  agents=${PIPESTATUS[0]}
else
  echo "gymnasium / stable-baselines3 missing: no agent table (carry their wheels in .whl/)"
fi
echo "gpu tests exit $tests, bench exit $bench, agents bench exit $agents"
exit $((tests != 0 || bench != 0 || agents != 0))
