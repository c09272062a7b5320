#!/usr/bin/env bash
# The Qwen3-0.6B-shaped speed table (issue 7) on one CUDA GPU: about 5 minutes on an H200, 8 at most.
#
#   here (PyPI reachable), once:  bash benchmarks/gpu_wheels.sh     # wheels the GPU image lacks -> .whl/
#   on the GPU machine:           bash benchmarks/gpu_run.sh [OUT]  # OUT defaults to benchmarks/results
#   (with the device tool: carry [".whl"], command "bash benchmarks/gpu_run.sh $OUT", timeout_s 540;
#   then copy the returned speed-qwen3-0.6b-shape-cuda-bfloat16{,-eva}.{md,json} into benchmarks/results/)
#
# Two runs of benchmarks/speed.py, each under a timeout: every variant but EVA, then EVA alone, because
# PEFT's EVA init cycles its calibration batches until its incremental PCA converges (336 forwards of
# the CPU model), which no other init does. MODEL=tiny DEVICE=cpu WHEELS=none bash benchmarks/gpu_run.sh
# /tmp/x rehearses the script on a CPU in a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
MODEL=${MODEL:-qwen3-0.6b-shape}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

WHEELS=${WHEELS:-.whl}  # WHEELS=none: use what the Python at hand has
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -P -c "import lora_lite.generated.lora" 2>/dev/null; then  # -P: not ./lora_lite
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/lora-lite-site .
  export PYTHONPATH=/tmp/lora-lite-site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -P - <<'PY'
import peft, torch, transformers, lora_lite
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__,
      "peft", peft.__version__, "lora_lite", lora_lite.__file__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), round(torch.cuda.get_device_properties(0).total_memory / 2**30), "GiB")
PY
mkdir -p "$OUT"
ALL_BUT_EVA=lora,pissa,dora,delora,ia3,ia3_ff,hra,antipasto,antipasto_corda,antipasto_ablate,antipasto_arrow
status=0
timeout 330 "$PY" benchmarks/speed.py --model "$MODEL" --device "$DEVICE" --variants "$ALL_BUT_EVA" \
  --out "$OUT" 2>&1 | tee "$OUT/speed-$MODEL-log.txt" || status=$?
timeout 120 "$PY" benchmarks/speed.py --model "$MODEL" --device "$DEVICE" --variants eva --steps 10 \
  --attach-reps 1 --tag eva --out "$OUT" 2>&1 | tee "$OUT/speed-$MODEL-eva-log.txt" ||
  echo "EVA run stopped (exit $?): 124 means PEFT's EVA init had not converged within the 120 s timeout"
ls -la "$OUT"
exit $status
