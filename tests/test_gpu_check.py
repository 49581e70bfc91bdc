"""benchmarks/gpu_check.py --small: the GPU check's own code, run end to end on the CPU (its dry run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_small_runs_every_part_and_writes_its_figures(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--output_dir", str(tmp_path),
                           "--small", "--budget_s", "900"], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = data["parts"]
    assert set(parts) == {"cli", "rollout", "probes", "step", "estimate", "dist"} and not data.get("errors")
    assert all(r["ok"] for r in parts["cli"].values()) and set(parts["cli"]) == {"train", "resume", "sft", "eval", "infer"}
    r = parts["rollout"]
    assert r["rows"] == 8 and r["tokens_per_row"] == 32
    assert all(r[k]["tokens_per_s"] > 0 for k in ("generate", "hf", "static"))
    assert r["static_same_tokens_run_to_run"] is True and r["static_captured"] == [False, False]  # no CUDA: eager
    assert r["memory_bound"]["weight_bytes_per_step"] > 0
    assert r["static_reused_graph"] == [False, False]  # nothing captured on a CPU, so nothing kept
    pr = parts["probes"]
    assert pr["rows"] == 8 and pr["tokens_per_row"] == 32
    assert set(pr["passes"]) == {"policy_forward_backward", "policy_forward", "visual_probe", "visual_probe_placeholders_kept",
                                 "visual_probe_unshared", "temporal_probe", "temporal_probe_unshared", "reference"}
    assert all(v["seconds_median"] > 0 for v in pr["passes"].values())
    assert pr["passes"]["policy_forward_backward"]["over_policy_forward_backward"] == 1.0
    # float32 on a CPU: the identity probe's exact score 0 stays under the default tolerance
    assert pr["identity_probe_noise_nats"]["dtype"] == "float32" and pr["identity_probe_noise_nats"]["max"] < 1e-5
    s = parts["step"]
    assert set(s["variants"]) == {"none", "all"} and s["steps_measured"] == 2
    assert s["variants"]["all"]["probes"] > s["variants"]["none"]["probes"]  # only KTR runs the probe passes
    assert s["step_ktr_over_grpo_paired_median"] > 0
    assert all(parts["estimate"][v]["estimate_gib"] > 0 for v in ("none", "all"))
    # FSDP2 over two CPU processes saved at step 1 and resumed from a copy of that checkpoint: the unbroken run's weights
    d = parts["dist"]
    assert d["zero3"] == {"ok": None, "not_run": "no GPU"}
    f = d["fsdp2"]
    assert f["ok"] is True and f["run_info"]["distributed"] == "FSDP2" and f["run_info"]["sharded_parameters"] is True
    assert f["checkpoint"]["optimizer_state"] == "sharded" and set(f["checkpoint"]["optimizer_shard_bytes"]) == {
        "__0_0.distcp", "__1_0.distcp"}
    assert f["weights"]["max_abs_move"] > 0 and f["weights"]["max_abs_difference"] <= 1e-6 and f["from_pretrained_loads"] is True
    text = (tmp_path / "summary.md").read_text()
    assert "## Rollout" in text and "## Probe passes" in text and "## Step" in text and "## video-ktr estimate" in text and "FAILED" not in text
    assert "## FSDP2 / ZeRO-3" in text
