#!/usr/bin/env bash
# The speed benchmarks at BLIP-2's size on one CUDA GPU, in bf16 (fp32 beside it where the ratio is asked), in about
# 8 minutes on an H100 / H200 class GPU. Each prints its table and the model FLOPs utilisation against the device's
# bf16 data-sheet peak (benchmarks/_timing.py; override with PEAK_TFLOPS=...). Logs go to $LOG_DIR (default
# gpu_logs/).
#
#   bash benchmarks/run_gpu.sh
#
# 1. stage-1 step at BLIP-2's Q-Former size (768 x 12, 32 queries, 257 x 1408 image features), batch 32: the step
#    with the cross-attention keys / values reused against the old step, fp32 and bf16 autocast;
# 2. stage-2 step and greedy generate at BLIP-2 OPT-2.7B's own sizes (ViT-g, Q-Former, OPT-2.7B; 3.8B parameters, bf16
#    weights) against transformers' Blip2ForConditionalGeneration with the same weights;
# 3. a stage-1 epoch from the frozen vision-feature cache against one from pixels (ViT-B/16 + Q-Former 256).
#
# Needs torch with CUDA and vlbridge's dependencies (transformers >= 5.20, datasets). On a machine without network,
# put their wheels in .whl/ at the repository root: they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
LOG_DIR="${LOG_DIR:-gpu_logs}"
mkdir -p "$LOG_DIR"
PEAK=()
if [[ -n "${PEAK_TFLOPS:-}" ]]; then PEAK=(--peak-tflops "$PEAK_TFLOPS"); fi

python3 -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__)" \
    || exit 1

status=0
run() {  # name, time limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log" || { echo "!! $name failed or ran past ${limit}s"; status=1; }
}

run stage1_reuse 150 python3 benchmarks/bench_stage1.py --device cuda --compare-reuse --batch-size 32 \
    --precisions fp32,bf16 --warmup 3 --repeats 10 "${PEAK[@]}"
run stage2_blip2 240 python3 benchmarks/bench_generative.py --device cuda --size blip2 --precisions bf16 \
    --warmup 2 --repeats 5 "${PEAK[@]}"
run feature_cache 90 python3 benchmarks/bench_feature_cache.py --device cuda --repeats 3
exit $status
