#!/usr/bin/env bash
# Issue 13 on a lent GPU: in the long-response regime, how large is the engine/trainer gap of
# rollouts at bfloat16 on CUDA kernels, and does it cost accuracy over 200 steps?
#
#   OUT=/a/folder bash experiments/gpu_long.sh      # on the GPU machine, from the repository root
#
# The GPU machine has torch 2.11 and transformers but no vLLM, matplotlib or network: the project
# runs from the tree (PYTHONPATH=src), the engine is the Transformers one, and the warm start must
# travel with the tree (the device tool's carry: .cache/models/tiny-qwen3-bpe-long_addition, the
# "long-addition-cap2000" model the experiments name, built here by `dcmdp pretrain --task
# long_addition --max-steps 2000`). What it runs, side by side on the one GPU:
#   - experiments/run.py long_search_gpu: GRPO with the Transformers engine at float32 (the
#     ceiling) and at bfloat16, seeds 0-2, one process each, under a deadline of $DEADLINE s (the
#     run folders land in $OUT/runs and are summarised on a machine with matplotlib afterwards);
#   - experiments/gradient_bias.py on CUDA: the token gap, the sequence log ratio by response
#     length and the turn of the gradient, for each engine setting, into $OUT/gradient_bias_cuda.json.
# The device tool brings back only a few files from the top of $OUT, so the run folders (weights
# left out) and logs are also packed into $OUT/gpu_long.tgz; unpack it into experiments/runs/ and
# summarise with `python experiments/run.py long_search_gpu --summary-only`.
# SMOKE=1 checks the script on CPU in a few minutes (2 steps, 2 batches, the run folders kept
# apart by --set).
set -u
: "${OUT:?set OUT to the folder for the results}"
DEADLINE=${DEADLINE:-440}
PY=${PY:-python3}
DEVICE=cuda
SET=()
BATCHES=4
if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE=cpu
    SET=(--set run.steps=2 run.eval_every=1 run.eval_problems=4 run.prompts_per_step=2)
    BATCHES=2
fi
export PYTHONPATH=src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
mkdir -p "$OUT/runs" "$OUT/logs"
OUT=$(cd "$OUT" && pwd -P)  # absolute: the link below and tar's -C need it
[ -e experiments/runs ] || ln -s "$OUT/runs" experiments/runs
RUNS=$(cd experiments/runs && pwd -P)
{
    date -u
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    $PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")'
} | tee "$OUT/device.txt"

for seed in 0 1 2; do
    for arm in grpo_fp32_ceiling grpo_hf_bf16; do
        timeout "$DEADLINE" $PY experiments/run.py long_search_gpu --arms $arm --seeds $seed ${SET[@]+"${SET[@]}"} \
            > "$OUT/logs/train.$arm.$seed.log" 2>&1 &
    done
done

timeout "$DEADLINE" $PY experiments/gradient_bias.py --config configs/long_addition.yaml --model long-addition-cap2000 --device $DEVICE --batches $BATCHES \
    --settings transformers:float32 transformers:bfloat16 transformers:float16 \
    transformers:float32:fp8 transformers:float32:int8 transformers:float32:int4 \
    --out "$OUT/gradient_bias_cuda.json" 2>&1 | grep -v "Loading weights" | tee "$OUT/logs/gradient_bias.log"

wait
echo "== where each run got to (finished runs end with an eval at step 200) =="
for f in $(find "$RUNS"/long_search_gpu* -name metrics.jsonl 2>/dev/null | sort); do
    echo "$f: $(grep -c '"kind": "train"' "$f") train rows; last eval: $(grep '"kind": "eval"' "$f" | tail -1 | cut -c1-160)"
done
FOLDERS=$(cd "$RUNS" && ls -d long_search_gpu* 2>/dev/null)
[ -n "$FOLDERS" ] || echo "no run folder under $RUNS: packing the logs only" >&2
if tar czf "$OUT/gpu_long.tgz" --exclude='*.safetensors' --exclude='*.pt' -C "$OUT" logs -C "$RUNS" $FOLDERS; then
    echo "packed $OUT/gpu_long.tgz"
else
    echo "packing $OUT/gpu_long.tgz failed" >&2
    exit 1
fi
