"""FSDP2 over two CPU processes (gloo), launched as a user would: `accelerate launch --config_file
configs/accelerate/fsdp-cpu-2proc.yaml -m video_ktr train ...`.

accelerate 1.15 cannot set up FSDP without GPUs; the trainers then shard the model themselves with PyTorch's
``fully_shard`` (training/distributed_fsdp.py). One unbroken 4-step run, and the same run SIGKILLed (the
launcher and both workers) once its step-2 checkpoint exists, then resumed with 'latest': the same
parameters at step 4 (1e-6), run_info.json says FSDP2 with sharded parameters (each process holding half of
the elements), and the saved model loads with ``AutoModelForImageTextToText.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.procs import run_and_kill
from video_ktr.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "accelerate" / "fsdp-cpu-2proc.yaml"
# 2 processes x 1 prompt x 2 completions of up to 8 tokens; a reward with a signal (count_e), a cosine schedule
# (the resumed scheduler must continue it), Adam's moments carried over the kill; the KL term's reference model
# sharded the same way (training/reference.py through the trainers' own wrapper)
RUN = ["--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "1", "--num_generations", "2",
       "--max_completion_length", "8", "--learning_rate", "1e-3", "--token_selection", "none",
       "--reward_funcs", "tests.reward_fixtures:count_e"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(tiny_setup, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
            "--main_process_port", str(_free_port()), "-m", "video_ktr", "train",
            *tiny_setup.train_args(out, *RUN, *extra)]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ckpt.TEST_SAVE_DELAY and not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(cmd: list[str], log: Path) -> str:
    with log.open("w") as fh:
        proc = subprocess.run(cmd, env=_env(), cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return log.read_text()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_killed_and_resumed_equals_the_unbroken_run(tiny_setup, tmp_path):
    from transformers import AutoModelForImageTextToText

    full = tmp_path / "full"
    _run(_launch(tiny_setup, full), tmp_path / "full.log")
    info = json.loads((full / "run_info.json").read_text())
    assert (info["world_size"], info["distributed"], info["sharded_parameters"]) == (2, "FSDP2", True), info
    assert info["launch_requested"] == "FSDP" and info["fsdp_wrapping"].startswith("video_ktr")
    assert 0.45 < info["parameter_shard_fraction"] < 0.55, info  # each process holds about half of the elements
    state = json.loads((full / "checkpoint-2" / ckpt.STATE_FILE).read_text())
    assert (state["optimizer_state"], state["optimizer_processes"]) == ("sharded", 2)
    assert len(state["rng_per_process"]) == 2 and not (full / "checkpoint-2" / "optimizer.pt").exists()
    _each_process_wrote_its_own_shards(full / "checkpoint-2" / ckpt.OPTIMIZER_DIR)
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and any(m["grad_norm"] > 0 for m in metrics)
    assert any(m["kl"] > 0 for m in metrics)  # the sharded reference answered, and differs from the moved policy

    killed = tmp_path / "killed"
    run_and_kill(_launch(tiny_setup, killed), tmp_path / "killed.log",
                 lambda: (killed / "checkpoint-2" / ckpt.STATE_FILE).is_file(), env=_env(), cwd=ROOT, whole_tree=True)
    assert not (killed / "model.safetensors").exists()  # killed before the end
    text = _run(_launch(tiny_setup, killed, "--resume_from_checkpoint", "latest"), tmp_path / "resumed.log")
    assert "at step 2" in text, text[-3000:]

    a, b, start = _weights(full), _weights(killed), _weights(tiny_setup.model_dir)
    assert a.keys() == b.keys() == start.keys()  # the tied output head saved once, as without sharding
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), (key, (a[key] - b[key]).abs().max())
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the 4 steps did move the weights

    _resumes_in_one_process(killed / "checkpoint-2")

    model = AutoModelForImageTextToText.from_pretrained(str(killed), dtype=torch.float32)
    loaded = model.state_dict()
    names, unmatched = ckpt._match_keys(list(loaded), b)  # transformers' class names its keys its own way
    assert not unmatched, unmatched[:5]
    for key, value in b.items():
        assert torch.equal(loaded[names[key]], value), key


def _each_process_wrote_its_own_shards(folder: Path) -> None:
    """Process 0's file holds the first rows of every Adam moment, process 1's the rest: no file holds a whole
    moment, and each about half of the moments' bytes (the whole state was never gathered for the save)."""
    from video_ktr.training import optimizer_shards

    pieces: dict[str, dict[str, list[int]]] = {}
    moment_bytes = {"__0_0.distcp": 0, "__1_0.distcp": 0}
    for index, info in optimizer_shards.storage(folder).items():
        if index.fqn.endswith(("exp_avg", "exp_avg_sq")):
            pieces.setdefault(index.fqn, {}).setdefault(info.relative_path, []).append(int(index.offset[0]))
            moment_bytes[info.relative_path] += info.length
    assert pieces and all(set(files) == {"__0_0.distcp", "__1_0.distcp"} for files in pieces.values()), pieces
    assert all(files["__0_0.distcp"] == [0] and files["__1_0.distcp"][0] > 0 for files in pieces.values())
    share = moment_bytes["__0_0.distcp"] / sum(moment_bytes.values())
    assert 0.4 < share < 0.6, moment_bytes


def _resumes_in_one_process(folder: Path) -> None:
    """The two processes' shards read back into one unsharded model (DCP reshards): every moment whole, its
    rows from both files (the second half is not the zeros a fresh optimiser starts from)."""
    from types import SimpleNamespace

    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    acc = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, distributed_type="DistributedType.NO",
                          unwrap_model=lambda m: m)
    state = ckpt.TrainState()
    ckpt.load(folder, acc, model, opt, sched, state)
    assert state.step == 2
    names = {id(p): n for n, p in model.named_parameters()}
    for param, moments in opt.state.items():
        assert moments["exp_avg"].shape == param.shape and float(moments["step"]) == 2, names[id(param)]
        if param.shape[0] > 1 and "embed" not in names[id(param)]:  # a token embedding: only the rows used
            low = param.shape[0] - param.shape[0] // 2
            assert moments["exp_avg_sq"][low:].abs().sum() > 0 or moments["exp_avg_sq"][:low].abs().sum() == 0, names[id(param)]
    assert any(m["exp_avg_sq"].abs().sum() > 0 for m in opt.state.values())


@pytest.mark.slow
def test_fsdp2_accumulation_reduces_the_gradients_once_per_step(tiny_setup, tmp_path):
    """Three micro-batches on two FSDP2 processes: with the gradient sync off for the first two (what the trainers
    do; accelerate's no_sync does not see our own CPU wrapping), each unit reduces its gradients once instead of
    three times, and the accumulated gradients equal those reduced at every micro-batch (each process's whole
    gradients, 1e-6 of their scale)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "fsdp_accumulation_launch.py"), str(tiny_setup.model_dir), str(tmp_path)]
    _run(cmd, tmp_path / "accumulation.log")
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"counts-rank{rank}.json").read_text())
        assert counts["synced"] == 3 * counts["unsynced"] and counts["unsynced"] > 1, counts  # one per unit per reduction
        grads = torch.load(tmp_path / f"grads-rank{rank}.pt", weights_only=True)
        assert grads["synced"].keys() == grads["unsynced"].keys() and grads["synced"]
        for name, synced in grads["synced"].items():
            scale = float(synced.abs().max()) or 1.0
            assert torch.allclose(grads["unsynced"][name], synced, rtol=0, atol=1e-6 * scale), name
    zero, one = (torch.load(tmp_path / f"grads-rank{r}.pt", weights_only=True)["unsynced"] for r in (0, 1))
    assert all(torch.equal(zero[n], one[n]) for n in zero)  # reduced: every process has the same gradients
