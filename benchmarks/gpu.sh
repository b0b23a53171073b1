#!/usr/bin/env bash
# CS-KD's overhead on a GPU, and the GPU-only tests, in one command. Run it from a clone of the repository
# with the project installed as the README says (`pip install -e ".[dev]"`: the tests need pytest), and
# CIFAR-10 in the layout of fastai's `untar_data(URLs.CIFAR)`, as a folder or a .tgz of one:
#
#   benchmarks/gpu.sh ~/.fastai/data/cifar10          # GPU tests, then 32 px resnet18 (fastai's recipe and a fast one)
#   benchmarks/gpu.sh ~/.fastai/data/cifar10 full     # adds 128 px resnet50
#   CSKD_CIFAR10=~/.fastai/data/cifar10 benchmarks/gpu.sh
#
# Results go to benchmarks/ (or the folder in $CSKD_BENCH_OUT) as results_gpu_<setting>.txt, one file per
# setting, written as each ends; each ends with the benchmark's JSON line. gpu_device.txt names the GPU.
set -uo pipefail
usage="usage: benchmarks/gpu.sh CIFAR10_PATH [full]   (or set CSKD_CIFAR10; the path is a folder or .tgz in untar_data(URLs.CIFAR)'s layout)"
data=${1:-${CSKD_CIFAR10:-}}
mode=${2:-quick}
if [ -z "$data" ]; then echo "benchmarks/gpu.sh: no CIFAR-10 path given." >&2; echo "$usage" >&2; exit 2; fi
if [ ! -e "$data" ]; then echo "benchmarks/gpu.sh: $data does not exist." >&2; echo "$usage" >&2; exit 2; fi
case "$mode" in quick|full) ;; *) echo "benchmarks/gpu.sh: unknown mode '$mode' (quick or full)." >&2; exit 2;; esac
data=$(cd "$(dirname "$data")" && pwd)/$(basename "$data")     # absolute, before changing directory
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
out=${CSKD_BENCH_OUT:-benchmarks}; mkdir -p "$out"

$py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: PyTorch sees no CUDA GPU here.')" || exit 1
$py -c "import torch, fastai, cskd_fastai; d = torch.cuda.get_device_properties(0)
print(f'{d.name}, {d.total_memory/2**30:.0f} GiB; torch {torch.__version__} (CUDA {torch.version.cuda}), fastai {fastai.__version__}, cskd_fastai {cskd_fastai.__version__}')" \
  | tee "$out/gpu_device.txt" || exit 1

echo "=== GPU tests"
if $py -c "import pytest" 2>/dev/null; then
  $py -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tail -15 | tee "$out/results_gpu_tests.txt"
else
  echo "pytest is not installed (pip install -e \".[dev]\"): GPU tests skipped" | tee "$out/results_gpu_tests.txt"
fi

run() {  # name, then overhead.py arguments
  local name=$1; shift
  echo "=== $name"
  $py benchmarks/overhead.py --data "$data" --device cuda --fp16 --workers "${CSKD_BENCH_WORKERS:-8}" "$@" 2>&1 \
    | grep -v Warning | tee "$out/results_gpu_$name.txt"
}
run 32px_resnet18 --arch resnet18 --size 32 --bs 128 --n-per-class 1000 --epochs 2 --rounds 3
run 32px_resnet18_fast --arch resnet18 --size 32 --bs 128 --n-per-class 1000 --epochs 2 --rounds 2 --recipe fast \
    --only fastai fastai+cskd fastai+cskd-cache
if [ "$mode" = full ]; then
  run 128px_resnet50 --arch resnet50 --size 128 --bs 128 --n-per-class 400 --epochs 2 --rounds 2
fi
