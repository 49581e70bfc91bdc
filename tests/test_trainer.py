"""End-to-end runs of the GRPO-KTR trainer on the tiny model and the synthetic mix of videos and images.

Each configuration runs 2 optimiser steps (2 prompts x 4 completions of up to 16 tokens per step) in
this process; the learning, resume and two-process checks are further down.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.grpo_steps import record_step
from video_ktr.training.grpo_config import TrainConfig
from video_ktr.utils.config import parse_args

REQUIRED = ("step", "loss", "reward", "accuracy_reward", "format_reward", "kl", "completion_length", "key_token_fraction",
            "step_seconds", "grad_norm", "learning_rate", "reward_std", "loss_variance", "clip_ratio")
SIGNAL_KEYS = {"entropy": "entropy_fraction", "visual": "visual_fraction", "temporal": "temporal_fraction"}
REWARDS = ["--reward_funcs", "accuracy,format,tests.reward_fixtures:count_e"]
ROOT = Path(__file__).resolve().parents[1]


def make_trainer(tiny_setup, out, *extra):
    from video_ktr.training.grpo import KTRTrainer

    cfg = parse_args(TrainConfig, tiny_setup.train_args(out, *REWARDS, *extra))
    return KTRTrainer(cfg)


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def run(tiny_setup, out, *extra) -> list[dict]:
    make_trainer(tiny_setup, out, *extra).train()
    return read_metrics(out)


# Two-step runs shared by several tests (each runs once per session, in its own folder).
BASE = ["--max_steps", "2", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant"]
CONFIGS = {
    "none": ["--token_selection", "none"],
    "entropy": ["--token_selection", "entropy"],
    "visual": ["--token_selection", "visual"],
    "temporal": ["--token_selection", "temporal"],
    "random": ["--token_selection", "random"],
    "all": ["--token_selection", "all"],
    "all-batch": ["--token_selection", "all", "--selection_scope", "batch"],
    "all-tgrpo-klvalid": ["--token_selection", "all", "--temporal_grpo", "true", "--kl_on", "valid"],
    "all-iter2-dapo": ["--token_selection", "all", "--num_iterations", "2", "--loss_type", "dapo"],
    "entropy-visual-blank-positive": ["--token_selection", "entropy,visual", "--visual_probe", "blank",
                                      "--positive_probe_scores", "true"],
}


@pytest.fixture(scope="module")
def shared_runs(tiny_setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-runs")
    done: dict[str, tuple[Path, list[dict]]] = {}

    def get(name: str) -> tuple[Path, list[dict]]:
        if name not in done:
            out = root / name
            done[name] = (out, run(tiny_setup, out, *BASE, *CONFIGS[name]))
        return done[name]

    return get


def test_first_steps_mix_videos_and_images(tiny_setup, tmp_path):
    from video_ktr.model.loading import GROUPED_KV_SDPA

    trainer = make_trainer(tiny_setup, tmp_path, "--max_steps", "2")
    # on CPU the policy and the reference take grouped key/value heads as a setting of each model, no env variable
    assert trainer.model.config._attn_implementation == GROUPED_KV_SDPA == trainer.ref_model.config._attn_implementation
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    kinds = []
    for _ in range(2):
        kinds += [s.data_type for _, s in trainer.data.samples_at(trainer.state.micro_step)]
        trainer.state.micro_step += 1
    assert set(kinds) == {"video", "image"}, kinds  # the configurations below see both kinds of rows


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_steps(tiny_setup, shared_runs, name):
    args = CONFIGS[name]
    out, metrics = shared_runs(name)
    cfg = parse_args(TrainConfig, tiny_setup.train_args(out, *REWARDS, *BASE, *args))
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        missing = [k for k in REQUIRED if k not in m]
        assert not missing, missing
        for signal, key in SIGNAL_KEYS.items():
            if signal in cfg.signals:
                assert key in m, key
            if signal not in cfg.signals:
                assert key not in m
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
        assert 0 < m["completion_length"] <= 16
        assert m["count_e_reward"] >= 0
        if cfg.signals:
            assert 0 < m["key_token_fraction"] < 1, m["key_token_fraction"]
        else:
            assert m["key_token_fraction"] == 1.0
        if cfg.beta == 0:
            assert m["kl"] == 0
    if "temporal_grpo" in " ".join(args):
        assert all("temporal_bonus" in m for m in metrics)
    if cfg.num_iterations > 1:
        assert any(m["clip_ratio"] >= 0 for m in metrics)
    # a policy that learns: the loss is not identically zero (count_e differs between completions)
    assert any(abs(m["loss"]) > 0 for m in metrics)
    assert any(m["grad_norm"] > 0 for m in metrics)
    # the final model is a plain checkpoint
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out)
    start = AutoModelForImageTextToText.from_pretrained(tiny_setup.model_dir)
    changed = [n for (n, a), (_, b) in zip(model.named_parameters(), start.named_parameters()) if not torch.equal(a, b)]
    assert changed
    assert (out / "train_config.json").is_file() and (out / "tokenizer.json").is_file()
    info = json.loads((out / "run_info.json").read_text())
    assert (info["world_size"], info["distributed"], info["sharded_parameters"], info["dtype"]) == (1, "single", False, "float32")


def test_random_control_keeps_the_ktr_fraction(shared_runs):
    _, ktr = shared_runs("all")
    _, rnd = shared_runs("random")
    # same seed: the same prompts, samples and KTR masks at step 1 (the models differ afterwards); the
    # random mask keeps the KTR fraction of each prompt group (rounded to whole tokens)
    a, b = ktr[0], rnd[0]
    assert a["reward"] == b["reward"] and a["entropy_fraction"] == b["entropy_fraction"]
    assert abs(a["key_token_fraction"] - b["key_token_fraction"]) <= 0.02


def test_temporal_fraction_is_over_video_rows(tiny_setup, tmp_path):
    trainer = make_trainer(tiny_setup, tmp_path, "--max_steps", "2", "--token_selection", "temporal")
    trainer.state.micro_step = 1  # the micro-batch with an image and a video prompt
    ro = record_step(trainer).rollout
    assert {s.data_type for s in ro.samples} == {"image", "video"}
    G = trainer.cfg.num_generations
    assert ro.probes.temporal_rows.tolist() == [s.data_type == "video" for s in ro.samples for _ in range(G)]
    image_rows = ~ro.probes.temporal_rows
    assert (ro.probes.temporal[image_rows] == 0).all()


@pytest.mark.parametrize("kl_on", ["mask", "valid"])
def test_gradient_is_zero_on_non_key_tokens(tiny_setup, tmp_path, kl_on):
    trainer = make_trainer(tiny_setup, tmp_path, "--max_steps", "1", "--token_selection", "all", "--kl_on", kl_on,
                           "--beta", "0.04", "--max_grad_norm", "0")
    step = record_step(trainer)
    ro, (logp,) = step.rollout, step.logp
    key, valid = step.key, ro.completions.valid
    assert key.any() and (valid & ~key).any()
    grad = logp.grad
    assert torch.all(grad[~valid] == 0)
    # the policy term is exactly 0 off the key tokens. With kl_on=valid the KL term applies there by
    # design; at the first step policy and reference agree up to float rounding (the reference pass
    # shares prompt prefixes, the policy pass does not), so its gradient there is rounding-sized.
    if kl_on == "mask":
        assert torch.all(grad[valid & ~key] == 0)
    else:
        assert grad[valid & ~key].abs().max() < 1e-6
    rows_with_advantage = ro.advantages.abs() > 0
    assert rows_with_advantage.any()
    on_key = grad[key & rows_with_advantage[:, None]]
    assert (on_key != 0).all()
    # and it is the released form: d loss / d logp[i,t] = -A_i / |K_i| / N on key tokens
    N = logp.shape[0]
    expected = -ro.advantages[:, None] / key.sum(1, keepdim=True).clamp(min=1) / N
    assert torch.allclose(grad[key], expected.expand_as(grad)[key], atol=1e-6)


def test_no_advantage_no_policy_gradient(tiny_setup, tmp_path):
    trainer = make_trainer(tiny_setup, tmp_path, "--max_steps", "1", "--beta", "0", "--token_selection", "none",
                           "--reward_funcs", "tests.reward_fixtures:constant")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    m = trainer.train_step()
    assert m["loss"] == 0 and m["grad_norm"] == 0 and m["constant_reward"] == 1.0
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def _params(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_resume_continues_exactly(tiny_setup, tmp_path):
    common = ["--token_selection", "all", "--save_steps", "2", "--learning_rate", "1e-3", "--max_steps", "3"]  # cosine
    full = run(tiny_setup, tmp_path / "full", *common)  # one uninterrupted run
    assert (tmp_path / "full" / "checkpoint-2").is_dir()

    # the same run killed after its step-2 checkpoint, when its log already had a line for step 3
    class Killed(Exception):
        pass

    killed = make_trainer(tiny_setup, tmp_path / "killed", *common)
    step = killed.train_step

    def step_then_die():
        if killed.state.step == 2:
            with (tmp_path / "killed" / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps({"step": 3, "reward": -1.0}) + "\n")  # written, then the process died
            raise Killed
        return step()

    killed.train_step = step_then_die
    with pytest.raises(Killed):
        killed.train()
    assert [m["step"] for m in read_metrics(tmp_path / "killed")] == [1, 2, 3]
    resumed = run(tiny_setup, tmp_path / "killed", *common, "--resume_from_checkpoint", "latest")
    _same_run(full, resumed, tmp_path / "full", tmp_path / "killed")


def test_finished_run_resumes_to_more_steps(tiny_setup, tmp_path, shared_runs):
    # the last step writes checkpoint-N too, so a finished run can be extended (a constant schedule:
    # a schedule's length is --max_steps); the result equals the uninterrupted 2-step run
    full_dir, full = shared_runs("all")
    common = [*BASE, *CONFIGS["all"], "--save_steps", "1"]
    short = run(tiny_setup, tmp_path, *common, "--max_steps", "1")
    assert [m["step"] for m in short] == [1]
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").is_file()
    longer = run(tiny_setup, tmp_path, *common, "--max_steps", "2", "--resume_from_checkpoint", "latest")
    _same_run(full, longer, full_dir, tmp_path)


def _same_run(full, resumed, full_dir, resumed_dir):
    assert [m["step"] for m in resumed] == [m["step"] for m in full]  # the log continues where the checkpoint was
    for a, b in zip(full, resumed):
        for k in ("loss", "reward", "count_e_reward", "key_token_fraction", "completion_length", "learning_rate", "kl"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k, a[k], b[k])
    pa, pb = _params(full_dir), _params(resumed_dir)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=1e-6), k


# ------------------------------------------------------------------ learning


@pytest.mark.slow
@pytest.mark.parametrize("selection,steps", [("none", 25), ("all", 30)])
def test_learns_a_user_reward(tiny_setup, tmp_path, selection, steps):
    """GRPO on 'fraction of the letter e' lifts the reward well above its start.

    Measured, mean of the first vs the last 10 steps (lr 4e-3, 30 steps, seeds 0 / 1): vanilla
    0.11 -> 0.37 / 0.33 (0.34 at 25 steps, seed 0), KTR (all signals, about 47% of the tokens kept)
    0.11 -> 0.28 / 0.23.
    """
    metrics = run(tiny_setup, tmp_path, "--max_steps", str(steps), "--token_selection", selection, "--learning_rate", "4e-3",
                  "--beta", "0", "--lr_scheduler_type", "constant", "--seed", "0", "--max_completion_length", "12",
                  "--reward_funcs", "tests.reward_fixtures:count_e")
    rewards = [m["reward"] for m in metrics]
    first, last = statistics.mean(rewards[:10]), statistics.mean(rewards[-10:])
    assert last > 1.5 * first and last - first > 0.06, (first, last)
    if selection == "all":
        assert statistics.mean(m["key_token_fraction"] for m in metrics) < 0.8


# ------------------------------------------------------------------ two processes


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(tiny_setup, out, nproc, *extra, accelerate_config=None):
    """``torchrun --nproc_per_node N``, or ``accelerate launch --config_file F`` (the documented launch) when given."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    launcher = (["-m", "accelerate.commands.launch", "--config_file", str(accelerate_config), "--main_process_port"]
                if accelerate_config else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port"])
    cmd = [sys.executable, *launcher, str(_free_port()), "-m", "video_ktr", "train", *tiny_setup.train_args(out, *REWARDS, *extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_metrics(out)


@pytest.mark.slow
def test_two_processes_equal_one(tiny_setup, tmp_path, shared_runs):
    """1 process x 2 prompts (batch scope) == 2 processes x 1 prompt (global scope), step by step.

    Completions come from per-row random streams and the data order from the global position, so
    both runs draw the same prompts and tokens; the metrics are reduced over the global batch. Only
    floating-point summation order differs (batching, the gradient all-reduce): metrics agree to
    1e-5 relative (measured: 1e-6). Adam turns the sign of near-zero gradients into full steps, so a
    few weights differ by up to ~5e-5 after 2 steps (lr 1e-3); the mean difference is ~1e-6 of the update.
    """
    one_dir, one = shared_runs("all-batch")
    two = _torchrun(tiny_setup, tmp_path / "two", 2, *BASE, *CONFIGS["all"], "--per_device_train_batch_size", "1",
                    "--selection_scope", "global", accelerate_config=ROOT / "configs" / "accelerate" / "cpu-2proc.yaml")
    assert len(two) == 2  # one writer: the main process
    info = json.loads((tmp_path / "two" / "run_info.json").read_text())
    assert (info["world_size"], info["distributed"], info["sharded_parameters"]) == (2, "DDP", False)
    for a, b in zip(one, two, strict=True):
        for k in ("loss", "reward", "reward_std", "count_e_reward", "key_token_fraction", "entropy_fraction",
                  "visual_fraction", "temporal_fraction", "entropy", "completion_length", "kl", "learning_rate",
                  "grad_norm", "loss_variance"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k, a[k], b[k])
    pa, pb, p0 = _params(one_dir), _params(tmp_path / "two"), _params(tiny_setup.model_dir)
    diff = torch.cat([(pa[k] - pb[k]).abs().flatten() for k in pa])
    update = torch.cat([(pa[k] - p0[k]).abs().flatten() for k in pa])
    assert diff.max() < 2e-3 and diff.mean() < 1e-3 * update.mean(), (diff.max(), diff.mean(), update.mean())


@pytest.mark.parametrize("ordered,shuffled,expected", [(1.0, 0.0, 0.3), (0.5, 1.0, 0.0)])
def test_temporal_grpo_bonus_per_prompt_group(tiny_setup, tmp_path, monkeypatch, ordered, shuffled, expected):
    import video_ktr.training.grpo as trainer_module
    import video_ktr.training.grpo_stages as stages

    real = trainer_module.load_reward_function

    def fake_accuracy(completions, solutions, problem_types, **kw):
        # the ordered-frame rewards are computed with the samples; the shuffled ones without
        return [ordered if "samples" in kw else shuffled for _ in completions]

    fake = lambda spec, *fmt: fake_accuracy if spec == "accuracy" else real(spec, *fmt)  # noqa: E731
    monkeypatch.setattr(trainer_module, "load_reward_function", fake)
    monkeypatch.setattr(stages, "load_reward_function", fake)
    trainer = make_trainer(tiny_setup, tmp_path, "--max_steps", "1", "--token_selection", "none", "--temporal_grpo", "true",
                           "--reward_funcs", "accuracy", "--beta", "0")
    trainer.state.micro_step = 1  # an image prompt and a video prompt
    ro = record_step(trainer).rollout
    G = trainer.cfg.num_generations
    bonus = ro.components["temporal_bonus"].tolist()
    want = [expected if s.data_type == "video" else 0.0 for s in ro.samples for _ in range(G)]
    assert bonus == pytest.approx(want)
    assert ro.rewards.tolist() == pytest.approx([ordered + b for b in want])


# ---------------------------------------------------------------- probes skipped on groups with advantage 0
SKIP_REWARD = ["--reward_funcs", "tests.reward_fixtures:count_e_on_videos", "--beta", "0", "--max_grad_norm", "0"]


def _step_keeping_rollout(trainer):
    """(trainer, the step's record, the step's metrics) after one optimiser step."""
    step = record_step(trainer)
    return trainer, step, step.metrics


def _trainer_at_mixed_batch(tiny_setup, out, *extra):
    from video_ktr.training.grpo import KTRTrainer

    cfg = parse_args(TrainConfig, tiny_setup.train_args(out, *SKIP_REWARD, "--token_selection", "all", *extra))
    trainer = KTRTrainer(cfg)
    trainer.state.micro_step = 1  # the micro-batch with an image prompt (advantage 0 here) and a video prompt
    return trainer


def test_probes_skip_zero_advantage_groups_and_the_step_is_unchanged(tiny_setup, tmp_path):
    """A group whose rewards are all equal gets no probe pass; the loss, the gradient step and the masks of
    the other groups equal those of a run that probes every group (--probe_all_groups)."""
    runs = {name: _step_keeping_rollout(_trainer_at_mixed_batch(tiny_setup, tmp_path / name, *extra))
            for name, extra in (("skip", []), ("all", ["--probe_all_groups", "true"]))}
    (t_skip, step_skip, m_skip), (t_all, step_all, m_all) = runs["skip"], runs["all"]
    ro_skip, ro_all = step_skip.rollout, step_all.rollout
    G = t_skip.cfg.num_generations
    image = torch.tensor([s.data_type == "image" for s in ro_skip.samples]).repeat_interleave(G)
    assert image.any() and (~image).any()
    assert torch.equal(ro_skip.completions.ids, ro_all.completions.ids)
    assert (ro_skip.advantages[image] == 0).all() and (ro_skip.advantages[~image] != 0).any()
    # the image group was not probed: no scores, no visual picks; the video group's probes are the same numbers
    skip, every = ro_skip.probes, ro_all.probes
    assert skip.probed_rows.tolist() == (~image).tolist() and every.probed_rows.all()
    assert (skip.visual[image] == 0).all() and (every.visual[image] != 0).any()
    valid = ro_skip.completions.valid
    video = valid & ~image[:, None]
    assert torch.allclose(skip.visual[video], every.visual[video], atol=1e-5)
    assert torch.allclose(skip.temporal[video], every.temporal[video], atol=1e-5)
    assert torch.equal(step_skip.key[~image], step_all.key[~image])
    # the same loss and the same parameters after the step
    assert m_skip["loss"] == pytest.approx(m_all["loss"], abs=1e-6)
    for (n, a), (_, b) in zip(t_skip.model.named_parameters(), t_all.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    assert m_skip["probed_groups"] == 0.5 and m_all["probed_groups"] == 1.0


@pytest.mark.parametrize("extra", [["--beta", "0.04", "--kl_on", "mask"], ["--loss_type", "dapo"], ["--loss_type", "bnpo"],
                                   ["--selection_scope", "batch"], ["--diagnostics_steps", "1"],
                                   ["--log_tokens_every", "1"]])
def test_every_group_is_probed_where_its_mask_can_matter(tiny_setup, tmp_path, extra):
    """KL on key tokens, a batch token mean over key tokens, a threshold pooled over groups, or a step that
    records diagnostics: the advantage-0 group's key tokens count, so it is probed."""
    trainer = _trainer_at_mixed_batch(tiny_setup, tmp_path, *extra)
    ro = record_step(trainer).rollout
    G = trainer.cfg.num_generations
    image = torch.tensor([s.data_type == "image" for s in ro.samples]).repeat_interleave(G)
    assert (ro.advantages[image] == 0).all()
    assert ro.probes.probed_rows.all() and (ro.probes.visual[image] != 0).any()


@pytest.mark.parametrize("extra", [["--beta", "0.04", "--kl_on", "valid"], ["--loss_type", "dr_grpo"],
                                   ["--loss_type", "dapo", "--normalize_by", "valid"]])
def test_zero_advantage_groups_are_skipped_where_exact(tiny_setup, tmp_path, extra):
    trainer = _trainer_at_mixed_batch(tiny_setup, tmp_path, *extra)
    ro = record_step(trainer).rollout
    G = trainer.cfg.num_generations
    image = torch.tensor([s.data_type == "image" for s in ro.samples]).repeat_interleave(G)
    assert ro.probes.probed_rows.tolist() == (~image).tolist()


def test_policy_pass_with_shared_prompts_takes_the_same_step(tiny_setup, tmp_path):
    """The policy pass with shared prompts (ForwardPlan.policy_shared_prefix, the default) and the full-sequence
    policy pass: the same loss, masks and weights."""
    out = {}
    for flag in ("true", "false"):
        trainer = make_trainer(tiny_setup, tmp_path / flag, "--max_steps", "1", "--token_selection", "all", "--beta",
                               "0.04", "--max_grad_norm", "0")
        assert trainer.plan.policy_shared_prefix
        trainer.plan = dataclasses.replace(trainer.plan, policy_shared_prefix=flag == "true")
        out[flag] = _step_keeping_rollout(trainer)
    (a, step_a, m_a), (b, step_b, m_b) = out["true"], out["false"]
    assert torch.equal(step_a.rollout.completions.ids, step_b.rollout.completions.ids)
    assert torch.equal(step_a.key, step_b.key)
    assert m_a["loss"] == pytest.approx(m_b["loss"], abs=1e-6) and m_a["grad_norm"] == pytest.approx(m_b["grad_norm"], rel=1e-4)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_prefetched_batches_are_the_inline_ones_and_the_thread_stops(tiny_setup, tmp_path):
    """--dataloader_prefetch prepares micro-step k+1's data while step k computes: the same batches, the same
    steps; the thread prepares nothing past the run's last micro-step and is gone after train()."""
    runs = {}
    for prefetch in ("true", "false"):
        trainer = make_trainer(tiny_setup, tmp_path / prefetch, *BASE, "--max_steps", "3", "--token_selection", "all",
                               "--dataloader_prefetch", prefetch)
        steps, pending = [], []
        for _ in range(3):
            steps.append(trainer.train_step())
            pending.append(trainer.data.prefetcher.pending_key)
        runs[prefetch] = (steps, pending, trainer)
    (on, on_pending, a), (off, off_pending, b) = runs["true"], runs["false"]
    assert on_pending == [1, 2, None] and off_pending == [None, None, None]
    for x, y in zip(on, off):
        for key in ("loss", "reward", "completion_length", "key_token_fraction", "visual_fraction", "temporal_fraction",
                    "grad_norm"):
            assert x[key] == y[key], (key, x[key], y[key])
    # the batch made in the background equals the one made in the step, tensor for tensor
    a.data.prefetch(1)
    background, inline = a.data.batch_for(1), b.data.prepare(1, b.processor)
    assert [i for i, _ in background.picked] == [i for i, _ in inline.picked]
    assert background.prompt_inputs.keys() == inline.prompt_inputs.keys()
    for key, value in background.prompt_inputs.items():
        assert torch.equal(value, inline.prompt_inputs[key]), key
    a.state.step = 2
    a.data.prefetch(3 - 1)
    threads = a.data.prefetcher.threads
    assert threads and all(t.name.startswith("video-ktr-data") for t in threads)
    a.train()  # the last step, then close()
    assert a.data.prefetcher.pending_key is None and not a.data.prefetcher.threads and not any(t.is_alive() for t in threads)


def test_shared_rollout_prefill_takes_the_same_steps(tiny_setup, tmp_path):
    """The rollout's shared prefill (ForwardPlan.rollout_shared_prefill, the default) vs G prefilled copies: the
    same completions, rewards and loss, with T-GRPO's shuffled-frame rollouts (G/2 rows per prompt) included."""
    runs = {}
    for flag in ("true", "false"):
        trainer = make_trainer(tiny_setup, tmp_path / flag, *BASE, "--token_selection", "all", "--temporal_grpo", "true")
        trainer.plan = dataclasses.replace(trainer.plan, rollout_shared_prefill=flag == "true")
        runs[flag] = [trainer.train_step() for _ in range(2)]
        trainer.close()
    for x, y in zip(runs["true"], runs["false"]):
        for key in ("loss", "reward", "completion_length", "key_token_fraction", "temporal_bonus", "grad_norm"):
            assert x[key] == y[key], (key, x[key], y[key])


def test_the_forward_plan_is_decided_at_set_up(tiny_setup, tmp_path):
    """Every fast path (gradient checkpointing included); every path plain with --plain_forwards (the run the
    equality tests compare against); the chunk sizes and the probes' precision as asked."""
    from video_ktr.training.grpo_stages import ForwardPlan

    def plan(*extra):
        return ForwardPlan.for_run(parse_args(TrainConfig, tiny_setup.train_args(tmp_path, *extra)))

    fast = plan("--forward_batch_size", "3")
    assert fast == ForwardPlan(chunk_rows=3) and fast.shared_prefix and fast.length_buckets and fast.rollout_shared_prefill
    assert fast.policy_shared_prefix and fast.encode_visual_once
    assert plan("--gradient_checkpointing", "true") == ForwardPlan()
    plain = plan("--plain_forwards", "true", "--policy_chunk_rows", "2", "--probe_dtype", "bfloat16")
    assert plain == ForwardPlan.plain(policy_chunk_rows=2, probe_dtype="bfloat16")
    assert not (plain.shared_prefix or plain.policy_shared_prefix or plain.length_buckets or plain.encode_visual_once
                or plain.rollout_shared_prefill)
    assert plain.bucket_overhead is None and plain.prefix_group(4) is None


def test_plain_forwards_take_the_same_step(tiny_setup, tmp_path):
    """--plain_forwards (every pass the plain way) and the fast paths: the same completions, key tokens, loss and
    update, with the probes and the reference pass in play."""
    out = {}
    for flag in ("false", "true"):
        trainer = make_trainer(tiny_setup, tmp_path / flag, "--max_steps", "1", "--token_selection", "entropy,visual,temporal",
                               "--beta", "0.04", "--max_grad_norm", "0", "--plain_forwards", flag)
        out[flag] = _step_keeping_rollout(trainer)
    (a, step_a, m_a), (b, step_b, m_b) = out["false"], out["true"]
    assert not b.plan.shared_prefix and a.plan.shared_prefix
    assert torch.equal(step_a.rollout.completions.ids, step_b.rollout.completions.ids)
    assert torch.equal(step_a.key, step_b.key)
    assert m_a["loss"] == pytest.approx(m_b["loss"], abs=1e-6) and m_a["grad_norm"] == pytest.approx(m_b["grad_norm"], rel=1e-4)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_prefetcher_gives_the_prefetched_result_or_makes_it_now():
    from video_ktr.utils.prefetch import Prefetcher

    calls = []

    def make(key):
        calls.append(key)
        if key == "bad":
            raise ValueError("bad item")
        return key * 2

    pre = Prefetcher("test-prefetch")
    assert pre.take(1, make, 1) == 2 and calls == [1]  # nothing prefetched: made now
    pre.start(2, make, 2)
    assert pre.pending_key == 2 and pre.take(2, make, 2) == 4 and calls == [1, 2]  # made once, in the background
    pre.start(3, make, 3)
    assert pre.take(4, make, 4) == 8 and calls == [1, 2, 3, 4]  # another key: awaited, dropped, made now
    pre.start("bad", make, "bad")
    with pytest.raises(ValueError, match="bad item"):  # raised by the take that needs it
        pre.take("bad", make, "bad")
    threads = pre.threads
    pre.close()
    assert pre.pending_key is None and not pre.threads and threads and not any(t.is_alive() for t in threads)
