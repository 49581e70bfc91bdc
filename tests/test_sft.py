"""Tests of `video-ktr sft` (video_ktr.training.sft): labels, learning, saving, resuming, bad rows."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.family import ADAPTER, SIDE, TEST_ARCH, F, px
from video_ktr.data.rows import DataError, load_dataset
from video_ktr.data.video import FrameCache
from video_ktr.model.inputs import Media, processor_call
from video_ktr.training.sft import (
    IGNORE_INDEX,
    SFTConfig,
    SFTTrainer,
    answer_token_mask,
    build_sft_batch,
    end_of_turn_id,
    run_sft,
)
from video_ktr.utils.config import parse_args

FRAMES = dict(nframes=8, max_frames=8, min_pixels=px(1), max_pixels=px(4))  # the family's cells: tests/family.py


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning threads per process slow these tests ~5x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from video_ktr.data.synth import generate
    from video_ktr.model.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("sft")
    model = build_tiny_model(root / "model", seed=0, arch=TEST_ARCH)
    generate(root / "data", num_train=32, num_test=8, seed=0, frames=8, size=SIDE, cell=F)
    return {"root": root, "model": str(model), "train": str(root / "data" / "train.json"),
            "test": str(root / "data" / "test.json"), "data": root / "data"}


def _cfg(env, out, **kw) -> SFTConfig:
    base = dict(model_name_or_path=env["model"], dataset=env["train"], output_dir=str(out), learning_rate=1e-3,
                per_device_train_batch_size=8, logging_steps=0, seed=0, **FRAMES)
    base.update(kw)
    return SFTConfig(**base)


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(env):
    """One 30-step run (batch 8, lr 1e-3) with eval every 10 steps; shared by the learning and reload tests."""
    out = env["root"] / "run30"
    trainer = SFTTrainer(_cfg(env, out, max_steps=30, eval_dataset=env["test"], eval_steps=10))
    result = trainer.train()
    return trainer, result, out


def _first_rows(env, n=3):
    from video_ktr.model.loading import load_processor

    processor = load_processor(env["model"])
    samples = load_dataset(env["train"], require_process=True)[:n]
    cfg = _cfg(env, env["root"] / "unused")
    cache = FrameCache(8)
    media = [Media(video=cache.get_or_load(s.media_path, cfg.frame_settings())) for s in samples]
    return processor, samples, media


def test_labels_supervise_exactly_the_target_and_end_token(env):
    from transformers import AutoConfig

    processor, samples, media = _first_rows(env)
    tok = processor.tokenizer
    video_id = AutoConfig.from_pretrained(env["model"]).video_token_id
    end_id = end_of_turn_id(tok)
    assert tok.convert_ids_to_tokens(end_id) == "<|im_end|>"
    inputs, labels = build_sft_batch(processor, samples, media)
    ids, attn, mm = inputs["input_ids"], inputs["attention_mask"].bool(), inputs["mm_token_type_ids"]
    assert labels.shape == ids.shape
    # the family's per-video times travel too (Qwen2.5-VL's second_per_grid_ts; Qwen2-VL and Qwen3-VL have none)
    times = (ADAPTER.per_item_times,) if ADAPTER.per_item_times else ()
    for key in ("pixel_values_videos", "video_grid_thw", "mm_token_type_ids", *times):
        assert key in inputs
    prompts = [processor.apply_chat_template(s.messages(), add_generation_prompt=True, tokenize=False) for s in samples]
    full_texts = [p + s.process + s.solution + "<|im_end|>" for p, s in zip(prompts, samples)]
    full = processor_call(processor, full_texts, media, padding_side="right")
    for i, s in enumerate(samples):
        sup = labels[i] != IGNORE_INDEX
        # the supervised tokens are exactly the target and the end-of-turn token, decoded verbatim
        assert tok.decode(ids[i][sup]) == s.process + s.solution + "<|im_end|>"
        assert torch.equal(labels[i][sup], ids[i][sup])
        assert int(ids[i][sup][-1]) == end_id
        assert int(sup.sum()) == len(tok(s.process + s.solution, add_special_tokens=False)["input_ids"]) + 1
        # prompt, visual and padding positions are not supervised
        assert not sup[ids[i] == video_id].any() and (ids[i] == video_id).sum() > 0
        assert not sup[mm[i] != 0].any()
        assert not sup[~attn[i]].any()
        # the supervised span follows the prompt directly and nothing real follows it
        where = sup.nonzero().flatten()
        assert torch.equal(where, torch.arange(int(where[0]), int(where[-1]) + 1))
        prompt_cols = attn[i] & ~sup
        assert int(prompt_cols.nonzero().max()) == int(where[0]) - 1
        assert not attn[i][int(where[-1]) + 1:].any()
        # the prompt part is the processor's prompt (visual placeholders expanded) ...
        alone = processor_call(processor, [prompts[i]], [media[i]])["input_ids"][0]
        assert torch.equal(ids[i][prompt_cols], alone)
        # ... and prompt + target is what the processor makes of the joined text
        assert torch.equal(ids[i][attn[i]], full["input_ids"][i][full["attention_mask"][i].bool()])
    # padding exists in this batch (rows of different lengths) and is masked
    assert (~attn).any()
    # the answer tokens (for eval_answer_loss) are the ones inside <answer>...</answer>
    width = int((labels != IGNORE_INDEX).sum(1).max())
    answer = answer_token_mask(tok, samples, "", width)
    for i, s in enumerate(samples):
        target_ids = labels[i][labels[i] != IGNORE_INDEX]
        assert tok.decode(target_ids[answer[i][: len(target_ids)]]).strip() == s.solution[8:-9].strip()


def test_sft_loss_falls_and_metrics_are_logged(trained):
    _, result, out = trained
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("loss", "learning_rate", "grad_norm", "tokens", "step_seconds", "epoch"):
        assert all(key in r for r in rows), key
    losses = [r["loss"] for r in rows]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert rows[0]["epoch"] == pytest.approx(8 / 32) and rows[-1]["epoch"] == pytest.approx(30 * 8 / 32)
    assert rows[0]["learning_rate"] == pytest.approx(1e-3)  # cosine, no warm-up: the first step uses the peak
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert all(r["eval_answer_loss"] > 0 and r["eval_tokens"] > 0 for r in evals)
    assert result["steps"] == 30 and "eval_loss" in result and result["skipped_samples"] == 0


def test_saved_model_reloads_with_identical_logits(env, trained):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    trainer, _, out = trained
    processor, samples, media = _first_rows(env, 2)
    inputs, _ = build_sft_batch(processor, samples, media)
    live = trainer.acc.unwrap_model(trainer.model).eval()
    loaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    AutoProcessor.from_pretrained(out)  # the processor is saved beside the model
    with torch.no_grad():
        a = live(**inputs).logits
        b = loaded(**inputs).logits
    assert torch.equal(a, b)
    base = AutoModelForImageTextToText.from_pretrained(env["model"]).eval()
    with torch.no_grad():
        assert not torch.allclose(base(**inputs).logits, a)  # it did train


def test_resume_equals_uninterrupted_run(env):
    kw = dict(max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2, warmup_ratio=0.34,
              save_steps=3)
    out_a, out_b = env["root"] / "resume_a", env["root"] / "resume_b"
    a = SFTTrainer(_cfg(env, out_a, **kw))
    a.train()
    assert (out_a / "checkpoint-3" / "trainer_state.json").is_file()
    assert not (out_a / "checkpoint-6").exists()  # the last step writes the final model, not a checkpoint
    # an interrupted run: only its checkpoint-3 and the metrics of steps 1-4 survive
    out_b.mkdir()
    shutil.copytree(out_a / "checkpoint-3", out_b / "checkpoint-3")
    lines = (out_a / "metrics.jsonl").read_text().splitlines()
    (out_b / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")
    b = SFTTrainer(_cfg(env, out_b, **{**kw, "resume_from_checkpoint": "latest"}))
    assert b.state.step == 3 and b.state.micro_step == 6
    b.train()
    pa = dict(a.acc.unwrap_model(a.model).named_parameters())
    for name, p in b.acc.unwrap_model(b.model).named_parameters():
        torch.testing.assert_close(p, pa[name], rtol=1e-5, atol=1e-6, msg=name)
    ra, rb = _metrics(out_a), _metrics(out_b)
    assert [r["step"] for r in rb] == [1, 2, 3, 4, 5, 6]  # the stale line of step 4 was dropped
    for x, y in zip(ra[3:], rb[3:]):
        assert x["tokens"] == y["tokens"] and x["epoch"] == y["epoch"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["learning_rate"] == pytest.approx(y["learning_rate"])


def test_accumulation_gives_the_token_mean_of_the_whole_step(env):
    """Batch 8 in one micro-step and batch 4 x 2 accumulated steps train identically (token mean of the step).

    Compared where the claim lives: the gradient the optimiser receives at step 1 (same weights, only the
    accumulation differs) to 1e-4 of each tensor's scale, then the weights after step 2 by how far they moved.
    Not element by element after Adam: an element whose gradient is near Adam's epsilon (1e-8) turns float
    noise of 1e-9 into a visible update (seen on Qwen2-VL's tiny model: 2.6e-5 on one v_proj weight).
    """
    kw = dict(max_steps=2, lr_scheduler_type="linear", warmup_ratio=0.5)
    one = SFTTrainer(_cfg(env, env["root"] / "ga1", per_device_train_batch_size=8, **kw))
    two = SFTTrainer(_cfg(env, env["root"] / "ga2", per_device_train_batch_size=4, gradient_accumulation_steps=2, **kw))
    start = {n: p.detach().clone() for n, p in one.acc.unwrap_model(one.model).named_parameters()}
    grads: dict[int, list[dict[str, torch.Tensor]]] = {1: [], 2: []}
    for key, trainer in ((1, one), (2, two)):
        def recording_update(bad, _update=trainer.update, _trainer=trainer, _key=key):
            grads[_key].append({n: p.grad.detach().clone() for n, p in _trainer.model.named_parameters()
                                if p.grad is not None})
            return _update(bad)
        trainer.update = recording_update
    r1, r2 = one.train(), two.train()
    assert r1["tokens"] == r2["tokens"] and r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
    g1, g2 = grads[1][0], grads[2][0]
    assert len(grads[1]) == len(grads[2]) == 2 and g1.keys() == g2.keys() and g1
    for name, g in g1.items():
        torch.testing.assert_close(g2[name], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()) + 1e-12, msg=name)
    p1 = dict(one.acc.unwrap_model(one.model).named_parameters())
    moved = apart = 0.0
    for name, p in two.acc.unwrap_model(two.model).named_parameters():
        moved += float((p1[name].detach() - start[name]).pow(2).sum())
        apart += float((p.detach() - p1[name].detach()).pow(2).sum())
    assert moved > 0 and apart ** 0.5 < 1e-3 * moved ** 0.5, (apart ** 0.5, moved ** 0.5)


def test_bad_rows_are_counted_when_skipping(env, tmp_path):
    rows = json.loads((env["data"] / "train.json").read_text())[:6]
    no_process = dict(rows[0], problem_id="np")
    del no_process["process"]
    corrupt = dict(rows[1], problem_id="corrupt", path="./broken/corrupt.mp4")
    (env["data"] / "broken").mkdir(exist_ok=True)
    (env["data"] / "broken" / "corrupt.mp4").write_bytes(b"\x00not a video" * 50)
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps(rows + [no_process, corrupt]))
    common = dict(dataset=str(bad_file), media_root=str(env["data"]), per_device_train_batch_size=4)

    with pytest.raises(DataError, match="process"):
        SFTTrainer(_cfg(env, tmp_path / "err", max_steps=2, **common))

    result = run_sft(_cfg(env, tmp_path / "skip", max_steps=2, on_bad_sample="skip", **common))
    assert result["skipped/missing_process"] == 1
    assert result["skipped/media_unreadable"] == 1  # replaced by the next row and counted once
    assert result["skipped_samples"] == 2
    assert result["tokens"] > 0

    only_corrupt = tmp_path / "corrupt.json"
    only_corrupt.write_text(json.dumps(rows + [corrupt]))
    trainer = SFTTrainer(_cfg(env, tmp_path / "err2", max_steps=2, **{**common, "dataset": str(only_corrupt)},
                              vision_learning_rate=1e-4))
    assert sorted(g["lr"] for g in trainer.optimizer.param_groups) == [1e-4, 1e-3]
    with pytest.raises(DataError, match="media could not be read"):
        trainer.train()


def test_command_line_and_yaml(tmp_path):
    yaml_file = tmp_path / "sft.yaml"
    yaml_file.write_text("model_name_or_path: m\ndataset: d.json\noutput_dir: o\nlearning_rate: 2.0e-5\nnum_train_epochs: 2\n")
    cfg = parse_args(SFTConfig, ["--config", str(yaml_file), "--max_steps", "5", "--freeze_vision_tower", "true",
                                 "--lr_scheduler_type", "linear", "--target_separator", "\n"])
    assert (cfg.learning_rate, cfg.num_train_epochs, cfg.max_steps) == (2e-5, 2.0, 5)
    assert cfg.freeze_vision_tower and cfg.lr_scheduler_type == "linear" and cfg.target_separator == "\n"
    with pytest.raises(ValueError, match="vision_learning_rate"):
        SFTConfig(model_name_or_path="m", dataset="d", output_dir="o", freeze_vision_tower=True,
                  vision_learning_rate=1e-5).validate()


# ---------------------------------------------------------------------------------------------- --eval_generate
def test_eval_generate_logs_accuracy_equal_to_evaluate_rows_on_the_final_model(env):
    """Accuracy at every eval point, per kind; the final one is what evaluate_rows gives for the saved model."""
    from video_ktr.evaluation.evaluate import evaluate_rows
    from video_ktr.model.loading import load_model, load_processor

    out = env["root"] / "generate"
    cfg = _cfg(env, out, max_steps=3, eval_dataset=env["test"], eval_steps=2, eval_generate=True,
               eval_max_new_tokens=24, eval_generate_rows=6, per_device_eval_batch_size=4)
    trainer = SFTTrainer(cfg)
    result = trainer.train()
    assert trainer.model.training  # eval put the model back in train mode
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 3]  # every --eval_steps and after the last step
    raw = json.loads((env["data"] / "test.json").read_text())[:6]
    kinds = sorted({r["kind"] for r in raw})
    for r in evals:
        assert "eval_loss" in r and r["eval_scored_rows"] == 6 and "eval_generate_failed" not in r
        assert sorted(k.split("/", 1)[1] for k in r if k.startswith("eval_accuracy/")) == kinds
        assert all(0.0 <= r[k] <= 1.0 for k in r if k.startswith("eval_accuracy"))
    assert result["eval_accuracy"] == evals[-1]["eval_accuracy"]

    model = load_model(str(out), dtype="float32").eval()
    _, metrics = evaluate_rows(model, load_processor(str(out)), raw, env["data"], cfg.frame_settings(), greedy=True,
                               max_new_tokens=24, batch_size=4, prompt_layout=cfg.prompt_layout)
    assert evals[-1]["eval_accuracy"] == metrics["overall"]
    assert {k: v["accuracy"] for k, v in metrics["by_kind"].items()} == {
        k.split("/", 1)[1]: v for k, v in evals[-1].items() if k.startswith("eval_accuracy/")}


def test_eval_generate_scores_like_evaluate_rows_with_a_scripted_engine(env, monkeypatch):
    """Non-trivial accuracies: answers scripted by question text, scored and grouped as evaluate_rows does."""
    import video_ktr.evaluation.evaluate as ev

    raw = json.loads((env["data"] / "test.json").read_text())

    def scripted(self, messages, media, seeds, *, max_new_tokens, temperature, top_p):
        texts = [m[-1]["content"][-1]["text"] for m in messages]
        firsts = [next(i for i, r in enumerate(raw) if r["problem"] in t) for t in texts]
        return [raw[i]["solution"] if i % 3 != 1 else "<think>no</think><answer>zzz</answer>" for i in firsts]

    class Scripted:
        generate = scripted

    monkeypatch.setattr(ev.HFEngine, "generate", scripted)  # the engine the trainer builds on its model
    out = env["root"] / "generate_scripted"
    result = run_sft(_cfg(env, out, max_steps=1, eval_dataset=env["test"], eval_generate=True, per_device_eval_batch_size=3))
    _, metrics = ev.evaluate_rows(None, None, raw, env["data"], _cfg(env, out).frame_settings(), greedy=True,
                                  engine=Scripted(), prompt_layout="train")
    assert 0.0 < metrics["overall"] < 1.0
    assert result["eval_accuracy"] == metrics["overall"]
    got = {k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("eval_accuracy/")}
    assert got == {k: v["accuracy"] for k, v in metrics["by_kind"].items()}
    assert len(set(got.values())) > 1 and _metrics(out)[-1]["eval_accuracy"] == metrics["overall"]


def test_accuracy_sums_reduce_over_shards_to_the_evaluate_metrics():
    """Sums over any split of the rows add up to evaluate's overall (non-regression) and by_kind (all types)."""
    from video_ktr.evaluation.grading import eval_metrics
    from video_ktr.training.sft import accuracies, accuracy_sums

    scores = [1.0, 0.0, 0.35, None, 1.0, 0.8, 0.0, None, 1.0, 0.55]
    types = ["multiple choice", "numerical", "regression", "multiple choice", "free-form",
             "regression", "multiple choice", "numerical", "OCR", "multiple choice"]
    kinds = ["a", "b", "a", "c", "b", "c", "a", "b", "c", "a"]
    results = [{"uid": str(i), "problem_type": t, "score": s, "failed": None if s is not None else "unreadable",
                "meta": {"kind": k}} for i, (s, t, k) in enumerate(zip(scores, types, kinds))]
    metrics = eval_metrics("video_r1", results)
    groups = sorted(set(kinds))
    whole = accuracies(accuracy_sums(results, groups), groups)
    assert whole["eval_accuracy"] == metrics["overall"]
    assert {g: whole[f"eval_accuracy/{g}"] for g in groups} == {g: e["accuracy"] for g, e in metrics["by_kind"].items()}
    assert whole["eval_scored_rows"] == 8 and whole["eval_generate_failed"] == 2
    shards = [accuracy_sums(results[p::3], groups) for p in range(3)]  # what 3 processes reduce
    split = accuracies([sum(col) for col in zip(*shards)], groups)
    assert split.keys() == whole.keys()
    for key, value in whole.items():
        assert split[key] == pytest.approx(value, rel=1e-12), key
    only_failed = accuracies(accuracy_sums(results[3:4], groups), groups)  # no scored row: no mean is made up
    assert only_failed == {"eval_scored_rows": 0, "eval_generate_failed": 1}


def test_eval_generate_options_and_their_validation():
    cfg = parse_args(SFTConfig, ["--model_name_or_path", "m", "--dataset", "d.json", "--output_dir", "o",
                                 "--eval_dataset", "e.json", "--eval_generate", "true", "--eval_max_new_tokens", "64",
                                 "--eval_generate_rows", "10"])
    assert (cfg.eval_generate, cfg.eval_max_new_tokens, cfg.eval_generate_rows) == (True, 64, 10)
    defaults = SFTConfig()
    assert (defaults.eval_generate, defaults.eval_max_new_tokens, defaults.eval_generate_rows) == (False, 1024, None)
    base = dict(model_name_or_path="m", dataset="d", output_dir="o")
    for kw, message in [
        (dict(eval_generate=True), "--eval_generate needs --eval_dataset"),
        (dict(eval_dataset="e", eval_generate=True, eval_max_new_tokens=0), "--eval_max_new_tokens"),
        (dict(eval_dataset="e", eval_generate=True, eval_generate_rows=0), "--eval_generate_rows must be >= 1"),
        (dict(eval_dataset="e", eval_generate_rows=5), "no effect without --eval_generate"),
    ]:
        with pytest.raises(ValueError, match=message):
            SFTConfig(**base, **kw).validate()
    SFTConfig(**base, eval_dataset="e", eval_generate=True, eval_generate_rows=5).validate()


def test_prefetched_rows_train_like_inline_ones_and_errors_wait_for_their_step(env, tmp_path):
    """--dataloader_prefetch decodes the next micro-step's media in the background: the same rows and steps; a file
    that cannot be read stops the step whose rows hold it (not an earlier one), and the thread stops after train()."""
    kw = dict(max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2, lr_scheduler_type="constant")
    runs = {}
    for prefetch in (True, False):
        trainer = SFTTrainer(_cfg(env, tmp_path / str(prefetch), dataloader_prefetch=prefetch, **kw))
        runs[prefetch] = (trainer.train(), trainer)
    (on, a), (off, _) = runs[True], runs[False]
    assert on["loss"] == off["loss"] and on["tokens"] == off["tokens"]
    assert a._prefetcher.pending_key is None and not a._prefetcher.threads
    assert [m["loss"] for m in _metrics(tmp_path / "True")] == [m["loss"] for m in _metrics(tmp_path / "False")]

    rows = json.loads((env["data"] / "train.json").read_text())[:8]
    corrupt = dict(rows[1], problem_id="corrupt", path="./broken/corrupt2.mp4")
    (env["data"] / "broken").mkdir(exist_ok=True)
    (env["data"] / "broken" / "corrupt2.mp4").write_bytes(b"\x00not a video" * 50)
    data = tmp_path / "late_bad.json"
    data.write_text(json.dumps(rows + [corrupt]))
    trainer = SFTTrainer(_cfg(env, tmp_path / "late", dataset=str(data), media_root=str(env["data"]), max_steps=9,
                              per_device_train_batch_size=1))
    bad_at = [i for i in range(9) if str(trainer.samples[int(trainer._perm(0)[i])].media_path).endswith("corrupt2.mp4")]
    assert bad_at and bad_at[0] >= 1
    for _ in range(bad_at[0]):
        trainer.train_step()  # the prefetch of the failing micro-step runs in the background during the last of these
    assert trainer._prefetcher.pending_key == bad_at[0]
    with pytest.raises(DataError, match="media could not be read"):
        trainer.train_step()
    trainer.close()
