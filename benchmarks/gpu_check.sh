#!/usr/bin/env bash
# The GPU checks in one run (a CUDA machine with jax[cuda], flax, optax,
# orbax, torch): GPT-2 124M tokens/s and MFU for both twins, the MoE
# dispatch implementations at Mixtral-like width, and a short
# `python -m jaxgpt.train` run on the GPU. Each section has its own time
# limit, so one failure leaves the others' numbers; everything is logged to
# $OUT/gpu.log (default: ./gpu_out).
#
#     bash benchmarks/gpu_check.sh                 # every section
#     bash benchmarks/gpu_check.sh moe chunked     # the named ones (machine always runs)
#
# Optional: wheels under .gpu/*.whl are installed first (a machine with no
# registry), and .gpu/tinyshakespeare.txt is the training corpus if present.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOG=$OUT/gpu.log
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # jax and torch share the card in one process
if compgen -G ".gpu/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

WANTED=" $* "
section() {  # section NAME SECONDS TITLE COMMAND...
    local name=$1 limit=$2 title=$3
    shift 3
    [ "$name" = machine ] || [ "$WANTED" = "  " ] || [[ "$WANTED" == *" $name "* ]] || return 0
    echo -e "\n## $title\n\$ $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v -e "Warning" -e "warnings.warn" | tee -a "$LOG"
    echo "(exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s)" | tee -a "$LOG"
}

section machine 60 "machine" bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv; python3 -c "import jax, flax, optax, orbax.checkpoint, torch; print(\"jax\", jax.__version__, \
    jax.devices(), \"flax\", flax.__version__, \"optax\", optax.__version__, \"torch\", torch.__version__)"'
section gpt2 200 "GPT-2 124M, bf16, attention einsum (ours), batch 16 x 1024, plain loss" \
    python3 benchmarks/bench_train.py --gpt2-124m --gpt2-batch 16 --gpt2-steps 20 --dtype bfloat16 --attention einsum \
    --loss-chunk 0
section gpt2-cudnn 100 "GPT-2 124M, bf16, cuDNN flash attention, batch 16 x 1024, plain loss" \
    python3 benchmarks/bench_train.py --gpt2-124m --gpt2-batch 16 --gpt2-steps 20 --dtype bfloat16 \
    --attention cudnn --loss-chunk 0
section chunked 100 "GPT-2 124M, bf16, cuDNN flash attention, batch 16 x 1024, the chunked loss (1024 tokens)" \
    python3 benchmarks/bench_train.py --gpt2-124m --gpt2-batch 16 --gpt2-steps 20 --dtype bfloat16 \
    --attention cudnn --loss-chunk 1024 --gpt2-scan-only
section moe 200 "MoE dispatch, Mixtral-like width (d_model 1024, d_ff 3584, 8 experts top-2), bf16" \
    python3 benchmarks/bench_moe.py --d-model 1024 --d-ff 3584 --layers 4 --block 1024 --batch 8 --vocab 32000 \
    --dtype bfloat16 --steps 10 --warmup 2 --rounds 2
corpus=shakespeare
[ -f .gpu/tinyshakespeare.txt ] && corpus=.gpu/tinyshakespeare.txt
section train 100 "python -m jaxgpt.train on the GPU (default model, bf16, 500 steps)" \
    python3 -m jaxgpt.train data.corpus=$corpus train.out_dir="$OUT/run" train.max_steps=500 train.dtype=bfloat16
section torch 150 "GPT-2 124M, torchgpt eager and torch.compile (bf16 autocast) beside jaxgpt scan" \
    python3 benchmarks/bench_train.py --gpt2-124m --gpt2-batch 16 --gpt2-steps 20 --dtype bfloat16 --attention einsum \
    --gpt2-scan-only --torch --loss-chunk 0
rm -rf "$OUT/run/checkpoints" "$OUT/run/data"  # keep the device's returned files small
