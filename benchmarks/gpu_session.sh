#!/usr/bin/env bash
# Every GPU check of this project in one run, for a session that is lent a GPU (device `run`):
# throughput with and without torch.compile, the lesion and gradient-path engines on CUDA, a short
# `trainer=gpu` run on synthetic data (eager and compile=true), and the GPU-only tests (no host
# sync in a training step, data held on the device). Results go to $OUT (default ./gpu_out).
# Packages the GPU image lacks travel as wheels in .whl/ (see the device README):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl \
#       hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 ...
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.csv" 2>&1
step() {  # name, then the command; its output and exit status land in $OUT/<name>.log
  local name=$1; shift
  echo "== $name: $*"
  timeout 240 "$@" > "$OUT/$name.log" 2>&1; echo "exit $?" >> "$OUT/$name.log"
  tail -n 3 "$OUT/$name.log"
}
step throughput python3 benchmarks/gpu_throughput.py --json "$OUT/throughput.json"
step throughput_compile python3 benchmarks/gpu_throughput.py --compile --json "$OUT/throughput_compile.json"
step lesion_engine python3 benchmarks/lesion_engine.py --device cuda
step gradient_paths python3 benchmarks/gradient_paths.py --device cuda
step lightning_vs_plain python3 benchmarks/training_step.py --blocks 18 --steps 100 --repeats 2
step trainer_gpu python3 -m src.run trainer=gpu data=synthetic logger=csv trainer.max_steps=300 \
  callbacks.progress_bar=null hydra.run.dir="$OUT/trainer_gpu"
step trainer_gpu_compile python3 -m src.run trainer=gpu data=synthetic logger=csv compile=true \
  trainer.max_steps=300 callbacks.progress_bar=null hydra.run.dir="$OUT/trainer_gpu_compile"
step gpu_tests python3 -m pytest -q -p no:cacheprovider -n0 tests/test_gpu_step.py tests/test_lesion.py -k "gpu or cuda or device"
