#!/usr/bin/env bash
# Install the LOWEST versions pyproject.toml declares (every "pkg>=X" of the dependencies, of the peft extra and
# pytest's as "pkg==X") in a throwaway venv and run a short training, eval and SFT, the LoRA merge and the
# data-source, flag, reward-adapter and lmms-eval export tests on them, from this checkout.
# Usage: scripts/check_lowest_versions.sh [VENV_DIR]   (default: a temporary folder, removed afterwards)
# Slow: a full install from the package index (on Linux, PyPI's torch wheel is the CUDA build, about 3 GB with
# its nvidia-* libraries); not part of `make test`. Exit status: pip's or pytest's. Last run: docs/ecosystem.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -n "${1:-}" ]; then VENV=$1; else TMP=$(mktemp -d); VENV=$TMP/venv; trap 'rm -rf "$TMP"' EXIT; fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
LOWEST=$("$VENV/bin/python" - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
reqs = project["dependencies"] + extras["peft"] + [x for x in extras["dev"] if x.startswith("pytest")]
out = []
for d in reqs:
    m = re.match(r"\s*([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([^,;\s]+)", d)
    if not m:
        raise SystemExit(f"pyproject.toml: {d!r} has no lower bound to check")
    out.append(f"{m.group(1)}=={m.group(2)}")
print("\n".join(out))
PY
)
echo "lowest declared versions:"; echo "$LOWEST"
# shellcheck disable=SC2086
"$VENV/bin/pip" install -q $LOWEST
"$VENV/bin/pip" install -q --no-deps -e .
echo "installed:"
"$VENV/bin/pip" freeze | grep -iE '^(torch|torchvision|transformers|accelerate|tokenizers|safetensors|av|pillow|numpy|pyyaml|rouge.score|tqdm|matplotlib|pyarrow|datasets|huggingface.hub|peft|pytest)=='
"$VENV/bin/python" --version
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_sources.py tests/test_config_flags.py tests/test_reward_adapters.py tests/test_lmms_export.py tests/test_hub.py \
    tests/test_probes.py tests/test_report.py \
    "tests/test_trainer.py::test_two_steps" \
    "tests/test_evaluate.py::test_eval_writes_results_metrics_and_protocol" \
    "tests/test_sft.py::test_sft_loss_falls_and_metrics_are_logged" "tests/test_sft.py::test_saved_model_reloads_with_identical_logits" \
    "tests/test_sft.py::test_bad_rows_are_counted_when_skipping" "tests/test_sft.py::test_command_line_and_yaml"
