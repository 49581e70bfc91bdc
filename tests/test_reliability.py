"""Reliability and security: real processes killed and resumed, numerical faults, hostile input.

docs/reliability.md lists every failure kind with the behaviour a user gets and the test behind it.

Kill tests start `python -m video_ktr train|sft|eval` as subprocesses (one torch thread each), SIGKILL
them at a chosen point (polling the output folder), resume with the same command and compare with an
uninterrupted run made in this process on the session's tiny model and data (tests/conftest.py):
final weights bit-for-bit (torch.equal), every metric but wall-clock times exactly equal, every step
logged exactly once. A kill in the middle of a checkpoint save uses the test-only hook
VIDEO_KTR_TEST_SAVE_DELAY of video_ktr.training.checkpoint (sleep after the checkpoint's files are written,
before the rename).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.family import SMALL_MEDIA  # the family's frame factor under VK_TEST_ARCH
from tests.procs import run_and_kill
from video_ktr.data.media import FrameSettings, MediaError, load_image
from video_ktr.data.video import load_video, write_video
from video_ktr.training import checkpoint as ckpt
from video_ktr.utils.config import parse_args

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "video_ktr"
# wall-clock and memory metrics: the only ones allowed to differ between two runs
TIMING = re.compile(r"seconds|^time_|memory|^mem_|per_second|throughput")

# GRPO-KTR: every signal, the reference model (beta 0.04), a cosine schedule over 5 steps (so the
# scheduler state matters), a user reward so that the loss is not zero, a checkpoint at every step
TRAIN_STEPS = 5
TRAIN = ["--max_steps", str(TRAIN_STEPS), "--save_steps", "1", "--learning_rate", "1e-3", "--token_selection", "all",
         "--reward_funcs", "accuracy,format,tests.reward_fixtures:count_e"]
# SFT: 2 rows x 2 accumulated micro-steps per step, cosine over 8 steps
SFT_STEPS = 8
SFT = ["--max_steps", str(SFT_STEPS), "--save_steps", "1", "--learning_rate", "1e-3", "--per_device_train_batch_size", "2",
       "--gradient_accumulation_steps", "2", "--logging_steps", "0", *SMALL_MEDIA]
# eval: one row per batch (a flush after every row); 256 new tokens make a row take ~0.3 s
EVAL = ["--benchmark", "video_r1", "--max_new_tokens", "256", "--batch_size", "1", "--progress", "false", *SMALL_MEDIA]


# ---------------------------------------------------------------------------------------------- helpers


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ckpt.TEST_SAVE_DELAY}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "video_ktr", *args]


def _run(args: list[str], log: Path, **env: str) -> str:
    """Run a command to completion; returns its output (stdout and stderr)."""
    with log.open("w") as fh:
        proc = subprocess.run(_command(*args), env=_env(**env), cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def _run_and_kill(args: list[str], log: Path, kill_when, *, grace: float = 0.0, timeout: float = 300, **env: str) -> None:
    """Start ``video-ktr ARGS``, SIGKILL it as soon as ``kill_when()`` holds (then ``grace`` s), wait for it."""
    run_and_kill(_command(*args), log, kill_when, env=_env(**env), cwd=ROOT, grace=grace, timeout=timeout)
    out = Path(args[args.index("--output_dir") + 1])
    print(f"[killed] video-ktr {args[0]}: checkpoints {[p.name for p in ckpt.complete_checkpoints(out)]}, "
          f"partial {[p.name for p in _partial_folders(out)]}")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_run(reference: Path, resumed: Path, steps: int) -> None:
    """Bit-for-bit equal final weights; each step logged once with exactly the reference's metrics."""
    a, b = _weights(reference), _weights(resumed)
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, differing[:5]
    ma, mb = _metrics(reference), _metrics(resumed)
    assert [m["step"] for m in mb] == list(range(1, steps + 1)), [m["step"] for m in mb]
    for x, y in zip(ma, mb, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if not TIMING.search(key):
                same = x[key] == y[key] or (isinstance(x[key], float) and math.isnan(x[key]) and math.isnan(y[key]))
                assert same, (x["step"], key, x[key], y[key])


def _partial_folders(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------- reference runs


@pytest.fixture(scope="module")
def train_reference(tiny_setup, tmp_path_factory) -> Path:
    """The uninterrupted GRPO-KTR run of TRAIN_STEPS steps (in this process)."""
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig

    out = tmp_path_factory.mktemp("reliability-train") / "reference"
    KTRTrainer(parse_args(TrainConfig, tiny_setup.train_args(out, *TRAIN))).train()
    return out


def _sft_args(tiny_setup, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(tiny_setup.model_dir), "--dataset", str(tiny_setup.train_json),
            "--output_dir", str(out), *SFT, *extra]


@pytest.fixture(scope="module")
def sft_reference(tiny_setup, tmp_path_factory) -> Path:
    from video_ktr.training.sft import SFTConfig, SFTTrainer

    out = tmp_path_factory.mktemp("reliability-sft") / "reference"
    SFTTrainer(parse_args(SFTConfig, _sft_args(tiny_setup, out))).train()
    return out


# ---------------------------------------------------------------------------------------------- 1. kills


@pytest.mark.slow
def test_train_killed_mid_run_resumes_bit_for_bit(tiny_setup, train_reference, tmp_path):
    """SIGKILL `video-ktr train` once checkpoint-2 exists, resume with 'latest': same weights, same log."""
    out = tmp_path / "run"
    args = ["train", *tiny_setup.train_args(out, *TRAIN)]
    _run_and_kill(args, tmp_path / "killed.log", lambda: (out / "checkpoint-2" / ckpt.STATE_FILE).is_file())
    done = ckpt.complete_checkpoints(out)
    assert done and 2 <= int(done[-1].name.split("-")[1]) < TRAIN_STEPS, done
    assert not (out / "model.safetensors").exists()  # killed before the end
    logged = [m["step"] for m in _metrics(out)]
    assert logged == list(range(1, len(logged) + 1))  # possibly one step past the newest checkpoint

    text = _run(args + ["--resume_from_checkpoint", "latest"], tmp_path / "resumed.log")
    assert f"resumed from {done[-1]} at step {done[-1].name.split('-')[1]}" in text
    _assert_same_run(train_reference, out, TRAIN_STEPS)
    assert not _partial_folders(out)


@pytest.mark.slow
def test_train_killed_mid_checkpoint_save_keeps_the_previous_one(tiny_setup, train_reference, tmp_path):
    """SIGKILL while checkpoint-3 sits complete in its temporary folder, before the rename."""
    out = tmp_path / "run"
    args = ["train", *tiny_setup.train_args(out, *TRAIN)]

    def saving_3() -> bool:
        return any(out.glob(f".checkpoint-3.*/{ckpt.STATE_FILE}"))

    _run_and_kill(args, tmp_path / "killed.log", saving_3, grace=0.2, **{ckpt.TEST_SAVE_DELAY: "120@3"})
    partial = [p for p in _partial_folders(out) if p.name.startswith(".checkpoint-3.")]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()  # the interrupted save
    assert not (out / "checkpoint-3").exists()
    # the previous checkpoint is complete and identical to the uninterrupted run's
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt"):
        assert (out / "checkpoint-2" / name).read_bytes() == (train_reference / "checkpoint-2" / name).read_bytes(), name
    assert json.loads((out / "checkpoint-2" / ckpt.STATE_FILE).read_text())["step"] == 2

    text = _run(args + ["--resume_from_checkpoint", "latest"], tmp_path / "resumed.log")
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in text  # not from the partial save
    assert not _partial_folders(out)  # the leftover temporary folder was removed
    _assert_same_run(train_reference, out, TRAIN_STEPS)


@pytest.mark.slow
def test_sft_killed_mid_run_and_mid_save_resumes_bit_for_bit(tiny_setup, sft_reference, tmp_path):
    """`video-ktr sft` killed twice (during step 3 or 4, then while saving checkpoint-5), resumed twice."""
    out = tmp_path / "run"
    args = ["sft", *_sft_args(tiny_setup, out)]
    _run_and_kill(args, tmp_path / "killed1.log", lambda: (out / "checkpoint-2" / ckpt.STATE_FILE).is_file())
    first = ckpt.complete_checkpoints(out)[-1]
    assert 2 <= int(first.name.split("-")[1]) < 5 and not (out / "model.safetensors").exists()

    resume = args + ["--resume_from_checkpoint", "latest"]
    _run_and_kill(resume, tmp_path / "killed2.log", lambda: any(out.glob(f".checkpoint-5.*/{ckpt.STATE_FILE}")),
                  grace=0.2, **{ckpt.TEST_SAVE_DELAY: "120@5"})
    assert f"resumed from {first}" in (tmp_path / "killed2.log").read_text()
    assert ckpt.complete_checkpoints(out)[-1].name == "checkpoint-4" and not (out / "checkpoint-5").exists()
    assert any(p.name.startswith(".checkpoint-5.") for p in _partial_folders(out))

    text = _run(resume, tmp_path / "resumed.log")
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in text
    assert not _partial_folders(out)
    _assert_same_run(sft_reference, out, SFT_STEPS)


def _eval_reference(tiny_setup, out: Path) -> dict:
    from video_ktr.evaluation.eval_config import EvalConfig
    from video_ktr.evaluation.evaluate import evaluate

    cfg = parse_args(EvalConfig, ["--model_name_or_path", str(tiny_setup.model_dir), "--data_file", str(tiny_setup.test_json),
                                  "--output_dir", str(out), *EVAL])
    evaluate(cfg)
    return json.loads((out / "video_r1.json").read_text())


@pytest.mark.slow
def test_eval_killed_mid_run_resumes_without_losing_or_repeating_a_row(tiny_setup, tmp_path):
    out = tmp_path / "run"
    args = ["eval", "--model_name_or_path", str(tiny_setup.model_dir), "--data_file", str(tiny_setup.test_json),
            "--output_dir", str(out), *EVAL]
    results = out / "video_r1.json"

    def two_rows_flushed() -> bool:
        try:
            return len(json.loads(results.read_text())["results"]) >= 2
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return False

    _run_and_kill(args, tmp_path / "killed.log", two_rows_flushed)
    flushed = json.loads(results.read_text())  # the file on disk is always whole JSON
    n_done = len(flushed["results"])
    assert 2 <= n_done < 8, n_done
    print(f"[killed] video-ktr eval after {n_done} of 8 rows")
    # a kill during a flush leaves write_json_atomic's temporary file: plant one, as such a kill would
    (out / ".video_r1.json.killed.tmp").write_text('{"results": [')

    text = _run(args, tmp_path / "resumed.log")
    assert f"resuming {results}: {n_done} of 8 rows already done" in text
    assert not list(out.glob(".video_r1.json.*"))
    resumed = json.loads(results.read_text())
    uids = [r["uid"] for r in resumed["results"]]
    assert len(uids) == len(set(uids)) == 8
    assert resumed["results"][:n_done] == flushed["results"]  # rows done before the kill were kept, not redone
    reference = _eval_reference(tiny_setup, tmp_path / "reference")
    assert resumed["results"] == reference["results"]  # and the rest is what one uninterrupted run gives
    assert resumed["metrics"] == reference["metrics"]


# ---------------------------------------------------------------------------------------------- 2. numerics


def _trainer(tiny_setup, out: Path, *extra: str):
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig

    args = ["--max_steps", "3", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
            "--reward_funcs", "accuracy,format,tests.reward_fixtures:count_e", *extra]
    return KTRTrainer(parse_args(TrainConfig, tiny_setup.train_args(out, *args)))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    return all(torch.equal(before[n], p) for n, p in model.named_parameters())


def _adam(optimizer) -> list[tuple[float, float, float]]:
    """Per parameter: Adam's step count and the sums of its two moments."""
    return [(float(v["step"]), float(v["exp_avg"].sum()), float(v["exp_avg_sq"].sum())) for v in optimizer.state.values()]


def _nan_loss_at(monkeypatch, trainer, steps: set[int] | None) -> None:
    """grpo_loss returns NaN while the trainer is at one of ``steps`` (None: always)."""
    import video_ktr.training.grpo_stages as trainer_module

    real = trainer_module.grpo_loss

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        if steps is None or trainer.state.step in steps:
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(trainer_module, "grpo_loss", poisoned)


def test_nonfinite_loss_skips_the_update_and_is_counted(tiny_setup, tmp_path, monkeypatch):
    trainer = _trainer(tiny_setup, tmp_path, "--token_selection", "none")
    _nan_loss_at(monkeypatch, trainer, {1})  # the second step
    first = trainer.train_step()
    assert first["bad_step"] == 0 and first["bad_steps_total"] == 0
    before, adam_before = _snapshot(trainer.model), _adam(trainer.optimizer)
    bad = trainer.train_step()
    assert bad["bad_step"] == 1 and bad["bad_steps_total"] == 1 and math.isnan(bad["loss"])
    assert _unchanged(before, trainer.model)  # no update ...
    assert _adam(trainer.optimizer) == adam_before  # ... not even of Adam's moments
    assert all(p.grad is None for p in trainer.model.parameters())  # and no gradient carried over
    after = trainer.train_step()
    assert after["bad_step"] == 0 and after["bad_steps_total"] == 1 and math.isfinite(after["loss"])
    assert not _unchanged(before, trainer.model)  # training goes on


def test_nonfinite_gradient_with_finite_loss_skips_the_update(tiny_setup, tmp_path):
    trainer = _trainer(tiny_setup, tmp_path, "--token_selection", "none")
    trainer.train_step()
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if "embed_tokens" in n)
    handle = param.register_hook(lambda grad: grad * float("inf"))
    before = _snapshot(trainer.model)
    m = trainer.train_step()
    handle.remove()
    assert math.isfinite(m["loss"]) and not math.isfinite(m["grad_norm"]), m
    assert m["bad_step"] == 1 and m["bad_steps_total"] == 1
    assert _unchanged(before, trainer.model), name


def test_max_bad_steps_stops_the_run_with_a_clear_message(tiny_setup, tmp_path, monkeypatch):
    from video_ktr.training.run import BadStep

    trainer = _trainer(tiny_setup, tmp_path, "--token_selection", "none", "--max_bad_steps", "2")
    _nan_loss_at(monkeypatch, trainer, None)
    before = _snapshot(trainer.model)
    with pytest.raises(BadStep, match=r"2 steps had a non-finite loss or gradient \(--max_bad_steps 2\); lower the "
                                      r"learning rate or check the data"):
        trainer.train()
    assert [(m["step"], m["bad_step"], m["bad_steps_total"]) for m in _metrics(tmp_path)] == [(1, 1, 1)]
    assert _unchanged(before, trainer.model)


def test_a_user_reward_that_returns_nan_stops_the_step(tiny_setup, tmp_path):
    """A reward is data the loss trusts: a non-finite one is refused (named), never turned into an update."""
    trainer = _trainer(tiny_setup, tmp_path, "--token_selection", "none", "--beta", "0", "--max_completion_length", "4")
    spec, _, weight = trainer.reward_fns[2]
    trainer.reward_fns[2] = (spec, lambda completions, *a, **kw: [float("nan")] * len(completions), weight)
    before = _snapshot(trainer.model)
    with pytest.raises(ValueError, match=r"reward function 'tests.reward_fixtures:count_e' must return one finite float"):
        trainer.train_step()
    assert _unchanged(before, trainer.model)


def test_sft_nonfinite_loss_is_skipped_counted_and_bounded(tiny_setup, tmp_path, monkeypatch):
    import video_ktr.training.sft as sft_module
    from video_ktr.training.sft import SFTConfig, SFTTrainer

    trainer = SFTTrainer(parse_args(SFTConfig, _sft_args(tiny_setup, tmp_path, "--max_bad_steps", "2")))
    real = sft_module.token_ce_sum
    poison = {"on": False}

    def token_ce_sum(*args, **kwargs):
        ce, n = real(*args, **kwargs)
        return (ce * float("nan"), n) if poison["on"] else (ce, n)

    monkeypatch.setattr(sft_module, "token_ce_sum", token_ce_sum)
    assert trainer.train_step()["bad_step"] == 0
    before = _snapshot(trainer.model)
    poison["on"] = True
    m = trainer.train_step()
    assert (m["bad_step"], m["bad_steps_total"]) == (1, 1) and _unchanged(before, trainer.model)
    with pytest.raises(RuntimeError, match=r"2 steps had a non-finite loss or gradient \(--max_bad_steps 2\)"):
        trainer.train_step()
    assert _unchanged(before, trainer.model)


class _EndFirst:
    """Wraps rollout.GumbelSampler: rows in ``rows`` emit the end-of-turn token first (a logits bias)."""

    def __init__(self, rows: set[int], eos: int):
        from video_ktr.model.sampling import GumbelSampler

        rows_, eos_ = rows, eos

        class Sampler(GumbelSampler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.calls = 0

            def __call__(self, input_ids, scores):
                scores = super().__call__(input_ids, scores)
                if self.calls == 0:
                    for r in rows_:
                        scores[r] = float("-inf")
                        scores[r, eos_] = 0.0
                self.calls += 1
                return scores

        self.cls = Sampler


def test_empty_completions_identical_rewards_and_rows_without_key_tokens(tiny_setup, tmp_path, monkeypatch):
    """One GRPO-KTR step where prompt 0's G=4 completions are all empty (<|im_end|> first: identical
    rewards, advantage 0), prompt 1's first completion is empty and its second keeps no key token."""
    import video_ktr.model.rollout as rollout_module
    from tests.grpo_steps import record_step

    trainer = _trainer(tiny_setup, tmp_path, "--token_selection", "all", "--beta", "0", "--max_grad_norm", "0")
    eos = trainer.special.eos_ids[0]
    assert trainer.tokenizer.convert_ids_to_tokens(eos) == "<|im_end|>"
    monkeypatch.setattr(rollout_module, "GumbelSampler", _EndFirst({0, 1, 2, 3, 4}, eos).cls)

    def no_key_in_row_5(masks):
        masks["key"] = masks["key"].clone()
        masks["key"][5] = False  # a row whose signals keep no token
        return masks

    step = record_step(trainer, edit_masks=no_key_in_row_5)
    m, ro, (logp,), key = step.metrics, step.rollout, step.logp, step.key
    comps = ro.completions
    assert comps.texts[:5] == [""] * 5 and all(comps.texts[5:])  # empty completions decode to ""
    assert comps.lengths[:5].tolist() == [1] * 5  # the end-of-turn token alone is the completion
    assert (ro.rewards[:4] == ro.rewards[0]).all() and (ro.advantages[:4] == 0).all()  # identical rewards
    assert ro.advantages[4:].abs().sum() > 0
    assert not key[5].any()
    # the step is a normal one: finite, not skipped, the policy moved
    assert m["bad_step"] == 0 and math.isfinite(m["loss"]) and m["grad_norm"] > 0
    # no policy gradient from a zero-advantage group nor from a row without key tokens (beta 0)
    assert torch.all(logp.grad[:4] == 0) and torch.all(logp.grad[5] == 0)
    # what the step's metrics show of these rows
    assert m["completion_length"] == pytest.approx(float(comps.lengths.float().mean()))
    # the zero-advantage group was not probed (beta 0, per-sequence loss, group scope): the key-token metrics
    # count the probed group's rows
    assert ro.probes.probed_rows.tolist() == [False] * 4 + [True] * 4
    probed = comps.valid & ro.probes.probed_rows[:, None]
    assert m["key_token_fraction"] == pytest.approx(float((key & probed).sum() / probed.sum()))
    assert m["num_completions"] == 8
    # counted in the metrics, as fractions: empty completions, zero-advantage groups, probed groups, rows
    # without key tokens (of the probed rows)
    # rows without key tokens: row 5 (forced), and row 4 (only its end token) if the signals did not keep that
    # token (Qwen2.5-VL's tiny model keeps it: 1/4; it depends on the random model's scores)
    no_key = [r for r in range(4, 8) if not key[r].any()]
    assert 5 in no_key and set(no_key) <= {4, 5}
    for name, expected in (("empty_completions", 5 / 8), ("zero_advantage_groups", 1 / 2), ("probed_groups", 1 / 2),
                           ("no_key_token_rows", len(no_key) / 4)):
        assert m[name] == pytest.approx(expected), name


# ---------------------------------------------------------------------------------------------- 3. hostile input


def _source_trees() -> list[tuple[Path, ast.AST]]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    return [(f, ast.parse(f.read_text(), filename=str(f))) for f in files]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def test_no_code_execution_on_data_or_model_output_in_the_source():
    """No eval/exec/compile, no pickle loading, no shell: parsed from every module of src/video_ktr."""
    forbidden_names = {"eval", "exec", "compile", "__import__", "execfile"}
    forbidden_calls = {"pickle.load", "pickle.loads", "marshal.load", "marshal.loads", "dill.load", "dill.loads",
                       "joblib.load", "cloudpickle.load", "cloudpickle.loads", "shelve.open", "yaml.load",
                       "yaml.unsafe_load", "yaml.full_load", "os.system", "os.popen", "jsonpickle.decode",
                       "numpy.load", "np.load", "pd.read_pickle", "pandas.read_pickle", "torch.jit.load"}
    found = []
    for path, tree in _source_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                if (isinstance(node.func, ast.Name) and name in forbidden_names) or name in forbidden_calls:
                    found.append(f"{path.name}:{node.lineno} {name}(")
                if name.startswith("subprocess.") and _kw(node, "shell") not in (None, False):
                    found.append(f"{path.name}:{node.lineno} {name}(shell=...)")
            if isinstance(node, ast.Attribute) and _dotted(node) in {"pickle.Unpickler", "pickle.load", "pickle.loads"}:
                found.append(f"{path.name}:{node.lineno} {_dotted(node)}")
            if isinstance(node, ast.Import):  # pickle itself is allowed for its exception class only
                found += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names
                          if a.name.split(".")[0] in {"dill", "marshal", "shelve", "cloudpickle", "joblib", "jsonpickle"}]
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in {"pickle", "dill", "marshal", "shelve",
                                                                                           "cloudpickle", "joblib"}:
                found += [f"{path.name}:{node.lineno} from {node.module} import {a.name}" for a in node.names
                          if a.name not in {"UnpicklingError", "PicklingError"}]
    assert not found, found
    # and the plain-text view of the same: no eval( / exec( outside method calls like model.eval()
    pattern = re.compile(r"(?<![\w.])(eval|exec)\s*\(")
    hits = [f"{p.name}:{i}" for p in sorted(SRC.rglob("*.py")) for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line.split("#")[0]) and not line.strip().startswith(('"', "'"))]
    assert not hits, hits


def test_every_torch_load_is_weights_only_and_models_load_from_safetensors():
    loads, model_loads = [], []
    for path, tree in _source_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name == "torch.load" or name.endswith(".load") and name.split(".")[0] == "torch":
                    loads.append((f"{path.name}:{node.lineno}", _kw(node, "weights_only")))
                if name.endswith(".from_pretrained") and "Model" in name.split(".")[-2]:
                    model_loads.append(f"{path.name}:{node.lineno} {name}")
    assert loads and all(v is True for _, v in loads), loads  # checkpoint.py's optimizer/scheduler states
    # transformers models are loaded in exactly one place, model/loading.load_model (use_safetensors=True)
    assert model_loads == [m for m in model_loads if m.startswith("loading.py:")] and len(model_loads) == 1, model_loads


class _Trap:
    """Pickles to a call of os.mkdir(marker): unpickling it without weights_only would run it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_checkpoint_with_a_pickled_object_is_refused(tiny_setup, train_reference, tmp_path):
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig

    out = tmp_path / "run"
    shutil.copytree(train_reference / "checkpoint-2", out / "checkpoint-2")
    marker = tmp_path / "code-ran"
    state = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    state["param_groups"][0]["note"] = _Trap(marker)
    torch.save(state, out / "checkpoint-2" / "optimizer.pt")
    cfg = parse_args(TrainConfig, tiny_setup.train_args(out, *TRAIN, "--resume_from_checkpoint", "latest"))
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer\.pt was refused.*could run arbitrary code"):
        KTRTrainer(cfg)
    assert not marker.exists()
    # the same file with plain values only is accepted (the refusal is about the object, not the file)
    state["param_groups"][0]["note"] = "plain"
    torch.save(state, out / "checkpoint-2" / "optimizer.pt")
    assert KTRTrainer(cfg).state.step == 2


def test_a_model_stored_as_a_pickle_is_not_loaded(tiny_setup, tmp_path):
    from video_ktr.model.loading import load_model

    model_dir = tmp_path / "pickled-model"
    shutil.copytree(tiny_setup.model_dir, model_dir)
    weights = _weights(model_dir)
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({**weights, "trap": _Trap(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_model(str(model_dir))
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_the_user_sets_it(monkeypatch):
    import inspect

    import transformers

    from video_ktr.evaluation.eval_config import EvalConfig
    from video_ktr.evaluation.inference import InferConfig
    from video_ktr.model import loading as modeling
    from video_ktr.model.vllm_engine import VLLMEngine
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.training.sft import SFTConfig

    for cls in (TrainConfig, SFTConfig, EvalConfig, InferConfig):
        assert cls.__dataclass_fields__["trust_remote_code"].default is False, cls
    for fn in (modeling.load_model, modeling.load_processor, VLLMEngine.from_pretrained):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn

    seen = []
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained",
                        lambda *a, **kw: seen.append(("model", kw)) or torch.nn.Linear(1, 1))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        lambda *a, **kw: seen.append(("processor", kw)) or type("P", (), {"tokenizer": type("T", (), {})()})())
    for flag in (False, True):
        modeling.load_model("some/model", trust_remote_code=flag)
        modeling.load_processor("some/model", trust_remote_code=flag)
    modeling.load_model("some/model")
    assert [(k, kw["trust_remote_code"]) for k, kw in seen] == [
        ("model", False), ("processor", False), ("model", True), ("processor", True), ("model", False)]
    assert all(kw["use_safetensors"] is True for k, kw in seen if k == "model")


def _png_header_only(width: int, height: int) -> bytes:
    """A 100-byte PNG that declares width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_image_is_a_media_error(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20000, 20000))  # 400 Mpixels, 1.2 GB decoded
    with pytest.raises(MediaError, match="too large to decode safely"):
        load_image(bomb, FrameSettings())


def test_huge_resolution_image_and_video_are_capped_by_the_pixel_settings(tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (6000, 4000), (200, 30, 30)).save(big, compress_level=1)  # 24 Mpixels
    img = load_image(big, FrameSettings(image_min_pixels=784, image_max_pixels=3136))
    assert img.width * img.height <= 3136 and img.width % 28 == 0 and img.height % 28 == 0 and img.width > img.height
    video = tmp_path / "big.mp4"
    write_video(video, np.full((2, 1080, 1920, 3), 90, np.uint8), fps=2.0)  # full HD
    v = load_video(video, FrameSettings(fps=2.0, max_frames=8, min_pixels=784, max_pixels=3136))
    t, _, h, w = v.frames.shape
    assert t == 2 and h * w <= 3136 and h % 28 == 0 and w % 28 == 0 and (v.source_width, v.source_height) == (1920, 1080)


def test_extreme_aspect_ratio_image_is_a_media_error(tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (3000, 10), (0, 0, 0)).save(strip)  # 300:1
    with pytest.raises(MediaError, match="aspect ratio"):
        load_image(strip, FrameSettings())


def test_video_with_a_stream_but_no_frames_is_a_media_error(tmp_path):
    import av

    empty = tmp_path / "no-frames.mp4"
    with av.open(str(empty), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 56, 56, "yuv420p"
        container.start_encoding()  # writes the header
        for packet in stream.encode(None):  # open the encoder, flush it: no frame was ever given
            container.mux(packet)
    assert empty.stat().st_size > 0  # a container with a header and no frame
    with pytest.raises(MediaError, match="no video stream|no decodable video frames"):
        load_video(empty, FrameSettings())


@pytest.fixture
def bad_media_dataset(tiny_setup, tmp_path) -> tuple[Path, dict[int, str]]:
    """4 good rows (copied with their media) and one row per kind of unusable media file."""
    rows = json.loads(tiny_setup.train_json.read_text())
    good = [next(r for r in rows if r["data_type"] == "video"), next(r for r in rows if r["data_type"] == "image")]
    good += [r for r in rows if r["data_type"] == "video" and r is not good[0]][:2]
    for r in good:
        (tmp_path / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_setup.data_dir / r["path"], tmp_path / r["path"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "empty.mp4").touch()
    (tmp_path / "bad" / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    (tmp_path / "bad" / "truncated.mp4").write_bytes((tiny_setup.data_dir / good[0]["path"]).read_bytes()[:300])
    shutil.copy(tiny_setup.data_dir / good[1]["path"], tmp_path / "bad" / "still.png")
    shutil.copy(tiny_setup.data_dir / good[0]["path"], tmp_path / "bad" / "clip.mp4")
    bad = [dict(good[0], path="./bad/empty.mp4"), dict(good[1], path="./bad/bomb.png"),
           dict(good[0], path="./bad/truncated.mp4"), dict(good[0], path="./bad/still.png"),  # image as a video
           dict(good[1], path="./bad/clip.mp4")]  # video as an image
    data = good + bad
    for i, r in enumerate(data):
        r["problem_id"] = i
    (tmp_path / "mixed.json").write_text(json.dumps(data))
    return tmp_path / "mixed.json", {len(good) + i: r["path"] for i, r in enumerate(bad)}


def test_trainer_counts_or_stops_on_every_kind_of_unusable_media(tiny_setup, tmp_path, bad_media_dataset):
    from video_ktr.data.rows import DataError

    data, bad = bad_media_dataset
    trainer = _trainer(tiny_setup, tmp_path / "out", "--dataset", str(data), "--on_bad_sample", "skip",
                       "--token_selection", "none", "--beta", "0", "--max_completion_length", "4")
    # every bad row is decoded exactly where the data order puts it, without starting a rollout
    for micro in range(0, 5):
        trainer.state.micro_step = micro
        batch = trainer.data.batch_for(micro)
        picked, media = batch.picked, batch.media
        assert len(picked) == len(media) == 2 and all(i not in bad for i, _ in picked)
    assert trainer.skips.counts["media_unreadable"] >= len(bad)
    reasons = " ".join(trainer.skips.examples)
    for what in ("empty (0 bytes)", "too large to decode safely", "still image", "is a video, not an image"):
        assert what in reasons, (what, reasons)
    trainer.state.micro_step = 0
    m = trainer.train_step()
    assert m["skipped_samples"] == trainer.skips.total and math.isfinite(m["loss"])

    strict = _trainer(tiny_setup, tmp_path / "strict", "--dataset", str(data), "--token_selection", "none", "--beta", "0")
    with pytest.raises(DataError, match=r"mixed\.json.*media could not be read"):
        for micro in range(0, 5):
            strict.state.micro_step = micro
            strict.data.batch_for(micro)


def test_a_prefetched_bad_file_stops_the_step_that_needs_it(tiny_setup, tmp_path, bad_media_dataset):
    """The next micro-step's media decode in the background (--dataloader_prefetch); a file that cannot be read
    there stops the step whose batch holds it, with the file named, and never an earlier step."""
    from video_ktr.data.rows import DataError

    data, bad = bad_media_dataset
    strict = _trainer(tiny_setup, tmp_path / "strict", "--dataset", str(data), "--token_selection", "none", "--beta", "0",
                      "--max_completion_length", "4", "--max_steps", "9")
    holds_bad = [any(i in bad for i, _ in strict.data.samples_at(m)) for m in range(9)]
    first = next(m for m in range(1, 9) if holds_bad[m] and not holds_bad[m - 1])
    strict.state.micro_step = strict.state.step = first - 1
    m = strict.train_step()  # its batch is good; the prefetch of the next one fails in the background
    assert math.isfinite(m["loss"]) and strict.data.prefetcher.pending_key == first
    with pytest.raises(DataError, match=r"mixed\.json.*media could not be read"):
        strict.train_step()
    strict.close()


def test_skips_found_while_prefetching_count_with_the_step_that_uses_them(tiny_setup, tmp_path, bad_media_dataset):
    data, bad = bad_media_dataset
    runs = {}
    for prefetch in ("true", "false"):
        trainer = _trainer(tiny_setup, tmp_path / prefetch, "--dataset", str(data), "--on_bad_sample", "skip",
                           "--token_selection", "none", "--beta", "0", "--max_completion_length", "4", "--max_steps", "4",
                           "--dataloader_prefetch", prefetch)
        runs[prefetch] = [(trainer.train_step()["skipped_samples"], trainer.skips.total) for _ in range(4)]
        trainer.close()
    assert runs["true"] == runs["false"], runs
    assert runs["true"][-1][0] > 0 and all(metric == total for metric, total in runs["true"])
