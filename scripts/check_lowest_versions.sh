#!/usr/bin/env bash
# Install the LOWEST versions pyproject.toml declares (every "pkg>=X" as "pkg==X") in a throwaway venv and run
# a short training, eval and SFT (plus the data-source, flag and reward-adapter tests) on them.
# Usage: scripts/check_lowest_versions.sh [VENV_DIR]   (default: a temporary folder, removed afterwards)
# Slow (a full install); not part of `make test`. Exit status: pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -n "${1:-}" ]; then VENV=$1; else TMP=$(mktemp -d); VENV=$TMP/venv; trap 'rm -rf "$TMP"' EXIT; fi

"$PYTHON" -m venv "$VENV"
LOWEST=$("$VENV/bin/python" - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
dev = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]
out = []
for d in deps + [x for x in dev if x.startswith("pytest")]:
    m = re.match(r"\s*([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([^,;\s]+)", d)
    out.append(f"{m.group(1)}=={m.group(2)}" if m else d)
print("\n".join(out))
PY
)
echo "lowest declared versions:"; echo "$LOWEST"
"$VENV/bin/pip" install -q --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/pip" install -q $LOWEST
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/pip" freeze | grep -iE '^(torch|torchvision|transformers|accelerate|tokenizers|datasets|pyarrow|av|numpy)=='
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_sources.py tests/test_config_flags.py tests/test_reward_adapters.py tests/test_lmms_export.py \
    "tests/test_trainer.py::test_two_steps" \
    "tests/test_evaluate.py::test_eval_writes_results_metrics_and_protocol" \
    "tests/test_sft.py::test_bad_rows_are_counted_when_skipping" "tests/test_sft.py::test_command_line_and_yaml"
