#!/usr/bin/env bash
# Everything a GPU is needed for, in one call (issues #3 and #6): the training-throughput table in
# bf16 with torch.compile, the llama2.c-style and nanoGPT references compiled too, MFU against the
# datasheet and the measured peak (stories15m/42m/110m at their own micro-batch x context), the decode
# table in bf16, the CUDA tests, and stories110m at a twice larger micro-batch.
#
#     OUT=/tmp/gpu bash bench/gpu_check.sh      # results and logs go to $OUT (default bench/results)
#     bash bench/gpu_check.sh decode tests      # only these stages (train, decode, tests, train-b64)
#
# Each stage has its own time limit, so that one that hangs leaves the others their time.
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
STAGES=${*:-train decode tests train-b64}
want() { [[ " $STAGES " == *" $1 "* ]]; }
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
    $PY -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
    nproc
} 2>&1 | tee "$OUT/gpu.txt"
# The references are compiled as well on a GPU (both peers default to compile=True there); the eager
# slmkit rows are left out to keep the stage inside its limit.
want train && timeout 360 $PY bench/train_speed.py --device cuda --preset-shape --rounds 5 --steps 5 \
    --variants reference slmkit nanogpt slmkit-gpt2 --out "$OUT/train_speed_cuda.json" 2>&1 | tee "$OUT/train_speed.log"
want decode && timeout 200 $PY bench/decode.py --device cuda --dtype bfloat16 --models stories15m stories260k stories110m \
    --rounds 3 --out "$OUT/decode_cuda.json" 2>&1 | tee "$OUT/decode.log"
want tests && timeout 120 $PY -m pytest -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
want train-b64 && timeout 80 $PY bench/train_speed.py --device cuda --presets stories110m --batch 64 --block 1024 \
    --variants reference slmkit --rounds 3 --steps 4 --out "$OUT/train_speed_cuda_b64.json" 2>&1 \
    | tee "$OUT/train_speed_b64.log"
echo "gpu_check done"
