#!/usr/bin/env bash
# The issue-22 and issue-34 figures on an accelerator (GPU or TPU), in one run of under 12 minutes; nothing to install beyond
# the project's requirements with jax[cuda12] (or jax[tpu]). PyTorch is used when it is importable.
#
#   bash benchmarks/accelerator.sh [OUT_FILE]        # default: $OUT/accelerator.txt, else ./accelerator.txt
#
# It writes, in order: the devices; the loop overhead (digits model and CIFAR ResNet-32, through the real loop
# against the compiled step alone); the LUCIR train step against PyTorch in float32 and bfloat16; the digits
# quick start cold and warm with its split; an 8-run digits sweep as one command against 8 commands (10 epochs). Each part has its own time limit, so one slow part cannot take the
# others' time.
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}/accelerator.txt}"
mkdir -p "$(dirname "$out")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # the quick start's child processes share the device

part() {  # part SECONDS TITLE COMMAND...
  local limit=$1 title=$2
  shift 2
  echo "## $title" | tee -a "$out"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -e '^\s*$' -e 'it/s\]' | tail -n 40 | tee -a "$out"
  echo "($title: exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s)" | tee -a "$out"
}

: > "$out"
part 60 devices python -c "import incremental_jax, jax; print(jax.__version__, jax.devices())"
part 120 'loop overhead' python benchmarks/loop_overhead.py --models=digits,resnet32 --steps=64
if python -c "import torch" 2>/dev/null; then
  part 75 'vs torch float32' python benchmarks/vs_torch.py --dtype=float32 --rounds=5
  part 75 'vs torch bfloat16' python benchmarks/vs_torch.py --dtype=bfloat16 --rounds=5
else
  echo "## vs torch: PyTorch is not installed here; skipped" | tee -a "$out"
fi
part 150 'quick start (lucir.py:digits), cold and warm' python benchmarks/loop_overhead.py --quick_start
part 240 'sweep: 8 digits runs as one command against 8 commands (10 epochs)' python benchmarks/sweep.py --epochs=10
echo "figures written to $out"
