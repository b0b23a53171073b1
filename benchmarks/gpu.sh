#!/usr/bin/env bash
# The GPU benchmark and the GPU-only tests, in one command, on a lent GPU machine (see DEVELOPERS.md, "GPUs").
# Prepare on the development machine first, from the project root: ../shared/gpu/prepare.sh (wheels in .whl/,
# CIFAR-10 in .gpu-data/); then on the GPU machine, from the project root:
#
#   benchmarks/gpu.sh          # about 8 minutes: GPU tests, then 32 px resnet18 (fastai recipe and the fast one)
#   benchmarks/gpu.sh full     # adds 128 px resnet50
#
# Results go to $OUT (or benchmarks/) as results_gpu_<setting>.txt, one file per setting, written as each ends;
# each ends with the benchmark's JSON line. The device is named in the files.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-quick}
out=${OUT:-benchmarks}; mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
data=/tmp/data/cifar10
[ -d "$data" ] || { mkdir -p /tmp/data && tar xzf .gpu-data/cifar10-jpg.tgz -C /tmp/data; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_device.txt"
python3 -c "import torch, fastai; print('torch', torch.__version__, 'fastai', fastai.__version__)" | tee -a "$out/gpu_device.txt"

echo "=== GPU tests"
python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tail -15 | tee "$out/results_gpu_tests.txt"

run() {  # name, then overhead.py arguments
  local name=$1; shift
  echo "=== $name"
  timeout 900 python3 benchmarks/overhead.py --data "$data" --device cuda --fp16 --workers 12 "$@" 2>&1 \
    | grep -v Warning | tee "$out/results_gpu_$name.txt"
}
run 32px_resnet18 --arch resnet18 --size 32 --bs 128 --n-per-class 1000 --epochs 2 --rounds 3
run 32px_resnet18_fast --arch resnet18 --size 32 --bs 128 --n-per-class 1000 --epochs 2 --rounds 2 --recipe fast \
    --only fastai fastai+cskd fastai+cskd-cache
if [ "$mode" = full ]; then
  run 128px_resnet50 --arch resnet50 --size 128 --bs 128 --n-per-class 400 --epochs 2 --rounds 2
fi
