#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md in one run of about 9 minutes on the lent H200: cuDNN
# fused attention against XLA's (outputs and times), the SD1.5 U-Net forward in float32 and
# bfloat16 against diffusers on CUDA, and 512 px 20-step text-to-image latency in both dtypes.
# After `bash benchmarks/gpu_prepare.sh` here, call the device tool from the repo root with
#
#   command: bash benchmarks/gpu_check.sh      carry: [".device"]      timeout_s: 600
#
# Each part has its own time limit, so one slow part cannot use up the others' time, and a part
# that fails is logged while the rest still run. Logs go to $OUT (the device tool's folder that
# comes back), else to ./gpu_check_out; summary.txt lists every part's exit status and seconds.
# PARTS="name ..." picks parts (default: the four of issue 3; finetune_step, the fine-tuning
# gradient with in-step VAE vs precomputed latents in bfloat16, is extra: about 2 minutes).
# GPU_CHECK_SMOKE=1 runs the parts at tiny sizes on any backend, without the U-Net part
# (tests/test_gpu_check.py runs it on the CPU so that this script keeps working).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-gpu_check_out}
PYTHON=${PYTHON:-python3}
SMOKE=${GPU_CHECK_SMOKE:-0}
PARTS=${PARTS:-attention_self attention_cross unet_forward text_to_image}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2

# The wheels gpu_prepare.sh packed, for the image's Python (installed apart, never over it).
if compgen -G ".device/whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/ldm_jax_site .device/whl/*.whl || exit 1
    export PYTHONPATH="/tmp/ldm_jax_site${PYTHONPATH:+:$PYTHONPATH}"
fi
TOKENIZER=.device/clip_tokenizer
[ -d "$TOKENIZER" ] || TOKENIZER=../shared/data/clip_tokenizer

: >"$OUT/summary.txt"
part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    [ "$name" = environment ] || [[ " $PARTS " == *" $name "* ]] || return 0
    echo "=== $name (limit $limit s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

part environment 30 "$PYTHON" -c '
import importlib, jax
for name in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as e:
        print(name, "missing:", e)
print("devices:", jax.devices())'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv | tee -a "$OUT/environment.log"

if [ "$SMOKE" = 1 ]; then
    part attention_self 120 "$PYTHON" benchmarks/attention_layer.py --tokens 256 \
        --impls xla,auto,chunked:64x64 --repeats 2
    part text_to_image 300 "$PYTHON" benchmarks/text_to_image.py --tokenizer "$TOKENIZER" \
        --tiny --size 64 --steps 2 --dtypes float32 --repeats 1
    part finetune_step 300 "$PYTHON" benchmarks/finetune_step.py --tiny --size 32 --repeats 1
    exit 0
fi

# SD1.5's largest self-attention at 512 px (batch 2, 4096 tokens, 8 heads x 40) and its
# cross-attention (77 keys): cuDNN against XLA in bfloat16, outputs compared to the first.
part attention_self 45 "$PYTHON" benchmarks/attention_layer.py --dtype bfloat16 \
    --impls xla,cudnn,auto,chunked --repeats 9
part attention_cross 45 "$PYTHON" benchmarks/attention_layer.py --dtype bfloat16 --keys 77 \
    --impls xla,cudnn,auto --repeats 9
# The issue-3 benchmark: float32 (JAX's default kernel, PyTorch CUDA), then bfloat16.
part unet_forward 220 "$PYTHON" benchmarks/unet_forward.py --repeats 5 --attention auto \
    --bf16-attention xla,cudnn
part text_to_image 240 "$PYTHON" benchmarks/text_to_image.py --tokenizer "$TOKENIZER" \
    --size 512 --steps 20 --dtypes float32,bfloat16 --repeats 3
part finetune_step 150 "$PYTHON" benchmarks/finetune_step.py --size 512 --dtype bfloat16 \
    --repeats 5
cat "$OUT/summary.txt"
