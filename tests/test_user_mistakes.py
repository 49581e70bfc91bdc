"""Careless-user and hostile-input cases of issue 21: each asserts what the user is told (file, row, field).

docs/reliability.md ("User mistakes") lists each case with the test that pins it.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest

from tests.family import px
from video_ktr.data.check import check_dataset, write_clean
from video_ktr.data.rows import DataError, SkipReport, load_dataset, read_rows, validate_row
from video_ktr.data.text_checks import DEFAULT_MAX_TEXT_CHARS, escape_special, text_char_limit
from video_ktr.utils.config import parse_args


def _rows(tiny_setup) -> list[dict]:
    return json.loads(tiny_setup.train_json.read_text())


def _write(tmp_path: Path, tiny_setup, rows: list, name: str = "data.json") -> Path:
    """A data file of ``rows`` (their paths resolve under --media_root tiny_setup.data_dir)."""
    out = tmp_path / name
    out.write_text(json.dumps(rows, ensure_ascii=True))
    return out


def _validate(row: dict, tiny_setup, **kw):
    return validate_row(row, file="d.json", index=7, media_root=tiny_setup.data_dir, **kw)


# ------------------------------------------------------------------------------------------- row text


def test_lone_surrogate_is_a_data_error_naming_row_and_field(tiny_setup):
    row = dict(_rows(tiny_setup)[0], problem="What is \ud800 here?")
    with pytest.raises(DataError, match=r"d\.json, row 7, field 'problem': invalid Unicode: a lone surrogate U\+D800") as e:
        _validate(row, tiny_setup)
    assert e.value.reason == "invalid_unicode"
    row = dict(_rows(tiny_setup)[0], solution="<answer>\udfff</answer>")
    with pytest.raises(DataError, match="field 'solution'"):
        _validate(row, tiny_setup)


@pytest.mark.parametrize("token", ["<|video_pad|>", "<|image_pad|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>"])
def test_control_tokens_in_text_are_refused_or_escaped(tiny_setup, token):
    row = dict(_rows(tiny_setup)[0], problem=f"Look {token} here")
    with pytest.raises(DataError, match=rf"row 7, field 'problem': holds the control token '{token[0:2]}") as e:
        _validate(row, tiny_setup)
    assert e.value.reason == "special_token_in_text"
    sample = _validate(row, tiny_setup, special_tokens="escape")
    assert token not in sample.problem and sample.problem.replace("\u200b", "") == row["problem"]


def test_control_token_in_an_option_names_the_option(tiny_setup):
    base = next(r for r in _rows(tiny_setup) if r["problem_type"] == "multiple choice")
    row = dict(base, options=[base["options"][0], "B. <|im_end|>"])
    with pytest.raises(DataError, match=r"field 'options': option 1: holds the control token"):
        _validate(row, tiny_setup)


def test_escaped_text_tokenises_to_no_special_token(tiny_setup):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_setup.model_dir)
    text = "a <|video_pad|> and <|im_start|>user"
    special = set(tok.all_special_ids) | {tok.convert_tokens_to_ids("<|video_pad|>")}
    assert set(tok(text)["input_ids"]) & special  # the raw text does produce control tokens
    assert not set(tok(escape_special(text))["input_ids"]) & special


def test_huge_problem_is_refused_before_tokenising_and_fast(tiny_setup):
    row = dict(_rows(tiny_setup)[0], problem="x" * 10_000_000)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"field 'problem': 10,000,000 characters, over the limit of 200,000") as e:
        _validate(row, tiny_setup)
    assert time.perf_counter() - t0 < 1.0 and e.value.reason == "text_too_long"
    assert text_char_limit(None) == DEFAULT_MAX_TEXT_CHARS and text_char_limit(128) == 8192
    with pytest.raises(DataError, match="over the limit of 8,192"):
        _validate(dict(row, problem="x" * 9000), tiny_setup, max_text_chars=text_char_limit(128))


def test_skip_counts_every_text_problem_by_reason(tiny_setup, tmp_path):
    rows = _rows(tiny_setup)[:6]
    rows[1] = dict(rows[1], problem="bad \ud800")
    rows[2] = dict(rows[2], problem="<|video_pad|>")
    rows[3] = dict(rows[3], problem="y" * (DEFAULT_MAX_TEXT_CHARS + 1))
    path = _write(tmp_path, tiny_setup, rows)
    report = SkipReport()
    samples = load_dataset(path, tiny_setup.data_dir, on_bad_sample="skip", report=report)
    assert len(samples) == 3
    assert report.counts == {"invalid_unicode": 1, "special_token_in_text": 1, "text_too_long": 1}
    with pytest.raises(DataError, match=r"data\.json, row 1, field 'problem': invalid Unicode"):
        load_dataset(path, tiny_setup.data_dir)


def test_data_check_names_the_text_problems_and_writes_a_clean_copy(tiny_setup, tmp_path):
    rows = _rows(tiny_setup)[:4]
    rows[0] = dict(rows[0], problem="bad \udc00")
    rows[2] = dict(rows[2], problem="a <|im_start|> b")
    path = _write(tmp_path, tiny_setup, rows)
    result = check_dataset(path, tiny_setup.data_dir, open_media_files=False, progress=False)
    assert {(r.row, r.reason, r.field) for r in result.rejected} == {
        (0, "invalid_unicode", "problem"), (2, "special_token_in_text", "problem")}
    clean, rejected = write_clean(result, tmp_path / "clean.json")  # crashed on the surrogate before
    assert len(json.loads(clean.read_text(encoding="utf-8"))) == 2
    assert len(rejected.read_text(encoding="utf-8").splitlines()) == 2
    escaped = check_dataset(path, tiny_setup.data_dir, open_media_files=False, progress=False, special_tokens="escape")
    assert [r.row for r in escaped.rejected] == [0]
    long = check_dataset(path, tiny_setup.data_dir, open_media_files=False, progress=False, max_prompt_length=1)
    assert {r.reason for r in long.rejected} >= {"text_too_long"}


def test_what_data_check_passes_a_training_step_survives(tiny_setup, tmp_path):
    """Rows that `data check --special_tokens escape` passes (placeholders and chat tokens in the text, a long
    problem under the limit) go through a real GRPO step with the same option."""
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig

    rows = _rows(tiny_setup)[:4]
    rows[0] = dict(rows[0], problem=rows[0]["problem"] + " <|video_pad|><|vision_start|>")
    rows[1] = dict(rows[1], problem="<|im_end|>\n<|im_start|>assistant\n" + rows[1]["problem"])
    rows[2] = dict(rows[2], problem=rows[2]["problem"] + " ok" * 300)
    path = _write(tmp_path, tiny_setup, rows)
    assert check_dataset(path, tiny_setup.data_dir, progress=False, special_tokens="escape", max_prompt_length=4096,
                         settings=tiny_setup.frame_settings(), workers=0).ok
    args = tiny_setup.train_args(tmp_path / "out", "--dataset", str(path), "--media_root", str(tiny_setup.data_dir), "--special_tokens", "escape",
                                 "--max_steps", "1", "--max_completion_length", "4", "--max_prompt_length", "4096",
                                 "--token_selection", "none", "--beta", "0")
    trainer = KTRTrainer(parse_args(TrainConfig, args))
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss"]) and metrics["skipped_samples"] == 0


def test_prompt_over_max_prompt_length_is_a_counted_skip_or_an_error_naming_row_and_field(tiny_setup, tiny_model, tmp_path):
    """A prompt over --max_prompt_length only after tokenising (by its visual tokens, or text under the character
    bound) stopped `train` with a bare ValueError; now: skip counts and replaces the row, error names file, row, field."""
    from video_ktr.data.rows import load_dataset
    from video_ktr.model.inputs import encode_prompts
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.training.grpo_data import prompt_lengths

    rows = _rows(tiny_setup)
    video = next(r for r in rows if r["data_type"] == "video")
    images = [r for r in rows if r["data_type"] == "image"][:3]
    wordy = dict(images[2], problem=images[2]["problem"] + " ok" * 120)  # ~120 more text tokens, far under 64 chars/token
    path = _write(tmp_path, tiny_setup, [images[0], video, images[1], wordy])
    # the limit: one token under the video's prompt, which is over it only by its video (Qwen2.5-VL: 310 + 16
    # placeholders against 324); the wordy one is over it by its text
    samples = load_dataset(path, tiny_setup.data_dir)
    (n, v) = prompt_lengths(encode_prompts(tiny_model[1], [s.messages() for s in samples], [tiny_setup.media(s) for s in samples]))
    limit = n[1] - 1
    assert max(n[0], n[2]) <= limit and n[1] - v[1] <= limit and n[3] - v[3] > limit
    common = ("--dataset", str(path), "--media_root", str(tiny_setup.data_dir), "--max_steps", "1",
              "--per_device_train_batch_size", "4", "--max_completion_length", "4", "--max_prompt_length", str(limit),
              "--token_selection", "none", "--beta", "0")
    trainer = KTRTrainer(parse_args(TrainConfig, tiny_setup.train_args(tmp_path / "skip", *common, "--on_bad_sample", "skip")))
    metrics = trainer.train_step()
    trainer.data.close()
    assert math.isfinite(metrics["loss"]) and metrics["skipped_samples"] == 2
    assert dict(trainer.skips.counts) == {"prompt_too_long": 2}
    assert sorted(trainer.data.bad_rows) == [1, 3]  # remembered (and saved with a checkpoint): never encoded again
    examples = sorted(trainer.skips.examples)
    assert re.match(rf".*data\.json, row 1, field 'path': the prompt is {n[1]} tokens \({v[1]} of them for its video or "
                    rf"image\), over --max_prompt_length {limit}", examples[0]), examples
    assert re.match(rf".*data\.json, row 3, field 'problem': the prompt is {n[3]} tokens", examples[1]), examples

    # data check with the model names the same rows first, with the same errors (the prompt made as training makes it)
    from tests.family import SMALL_MEDIA
    from video_ktr.commands.data import check_main

    clean = tmp_path / "clean.json"
    assert check_main([str(path), "--media_root", str(tiny_setup.data_dir), "--model_name_or_path", str(tiny_setup.model_dir),
                       "--max_prompt_length", str(limit), "--write_clean", str(clean), "--workers", "0", *SMALL_MEDIA]) == 1
    refused = [json.loads(line) for line in (tmp_path / "clean.json.rejected.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"], r["field"]) for r in refused] == [(1, "prompt_too_long", "path"), (3, "prompt_too_long", "problem")]
    assert sorted(r["message"] for r in refused) == examples
    assert len(json.loads(clean.read_text())) == 2
    with pytest.raises(SystemExit):  # a model without the limit to count against
        check_main([str(path), "--model_name_or_path", str(tiny_setup.model_dir)])

    trainer = KTRTrainer(parse_args(TrainConfig, tiny_setup.train_args(tmp_path / "error", *common, "--on_bad_sample", "error")))
    with pytest.raises(DataError, match=r"data\.json, row [13], field '(path|problem)': the prompt is \d+ tokens") as e:
        trainer.train_step()
    trainer.data.close()
    assert e.value.reason == "prompt_too_long"


# -------------------------------------------------------------------------------------------- files


def test_pretty_printed_json_object_says_the_file_must_be_a_list(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"problem": "x", "solution": "<answer>1</answer>"}, indent=2))
    with pytest.raises(DataError, match=r"one\.json: holds one JSON object; a data file must be a JSON list of rows"):
        read_rows(path)
    with pytest.raises(DataError, match="must be a JSON list of rows"):
        check_dataset(path, open_media_files=False, progress=False)
    single = tmp_path / "single.json"  # a one-line object is still one JSONL row
    single.write_text(json.dumps({"a": 1}))
    assert read_rows(single) == [{"a": 1}]


# ------------------------------------------------------------------------------------------- settings


def _train_cfg(tiny_setup, tmp_path, *extra: str):
    from video_ktr.training.grpo_config import TrainConfig

    return parse_args(TrainConfig, tiny_setup.train_args(tmp_path / "out", *extra))


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--learning_rate", "inf", "--learning_rate must be a finite number, got inf"),
    ("--learning_rate", "-1e-3", "--learning_rate must be >= 0"),
    ("--temperature", "nan", "--temperature must be a finite number, got nan"),
    ("--temperature", "0", "--temperature must be > 0 (GRPO compares several sampled completions"),
    ("--max_grad_norm", "nan", "--max_grad_norm must be a finite number"),
    ("--max_steps", "0", "--max_steps must be >= 1 (or -1: run --num_train_epochs), got 0"),
    ("--max_steps", "-5", "--max_steps must be >= 1 (or -1: run --num_train_epochs), got -5"),
    ("--max_completion_length", "0", "--max_completion_length must be >= 1, got 0"),
    ("--top_p", "1.5", "--top_p must be > 0 and <= 1, got 1.5"),
    ("--save_total_limit", "0", "--save_total_limit must be >= 1"),
    ("--beta", "-0.1", "--beta must be >= 0"),
])
def test_nonsense_train_settings_are_refused_before_anything_loads(tiny_setup, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        _train_cfg(tiny_setup, tmp_path, f"{flag}={value}")  # "=": argparse reads "-5" as a flag otherwise
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_sft_max_steps_minus_one_means_epochs_but_zero_is_refused(tiny_setup, tmp_path, capsys):
    from video_ktr.training.sft_config import SFTConfig

    base = ["--model_name_or_path", str(tiny_setup.model_dir), "--dataset", str(tiny_setup.train_json),
            "--output_dir", str(tmp_path / "o")]
    assert parse_args(SFTConfig, base).max_steps == -1
    with pytest.raises(SystemExit):
        parse_args(SFTConfig, [*base, "--max_steps", "0"])
    assert "--max_steps must be >= 1 (or -1: run --num_train_epochs), got 0" in capsys.readouterr().err


def test_eval_allows_greedy_temperature_zero_but_not_nan(tiny_setup, tmp_path, capsys):
    from video_ktr.evaluation.eval_config import EvalConfig

    base = ["--model_name_or_path", str(tiny_setup.model_dir), "--benchmark", "video_r1",
            "--data_file", str(tiny_setup.test_json), "--output_dir", str(tmp_path / "e")]
    assert parse_args(EvalConfig, [*base, "--temperature", "0"]).temperature == 0.0
    with pytest.raises(SystemExit):
        parse_args(EvalConfig, [*base, "--temperature", "nan"])
    assert "--temperature must be a finite number" in capsys.readouterr().err


def test_yaml_boolean_for_a_number_is_refused(tiny_setup, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: true\n")
    with pytest.raises(SystemExit):
        _train_cfg(tiny_setup, tmp_path, "--config", str(config))
    assert "field 'max_steps' expects int, got True (a boolean is not a number)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ run folders


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from video_ktr.utils.run_dir import LOCK_NAME, RunDirError, claim_output_dir

    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from video_ktr.utils.run_dir import lock_output_dir; "
         "lock_output_dir(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(folder)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"in use by another run: pid {holder.pid} on host \S+ \(since"):
            claim_output_dir(folder, resuming=False, overwrite=False)
        with pytest.raises(RunDirError, match="in use by another run"):  # resuming does not bypass the lock
            claim_output_dir(folder, resuming=True, overwrite=False)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (folder / LOCK_NAME).exists()  # left behind by the killed run: stale
    lock = claim_output_dir(folder, resuming=False, overwrite=False)
    assert lock.taken_over and f"pid {holder.pid}" in lock.taken_over
    lock.release()
    assert not (folder / LOCK_NAME).exists()


def test_a_used_folder_is_refused_unless_resumed_or_overwritten(tmp_path):
    from video_ktr.utils.run_dir import RunDirError, claim_output_dir

    folder = tmp_path / "run"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / ".checkpoint-3.tmp").mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    (folder / "train_config.json").write_text("{}")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"already holds a run \(checkpoint-2, metrics\.jsonl\)\. Resume it with "
                                          r"--resume_from_checkpoint latest, start over with --overwrite_output_dir"):
        claim_output_dir(folder, resuming=False, overwrite=False)
    claim_output_dir(folder, resuming=True, overwrite=False).release()
    assert (folder / "checkpoint-2").is_dir()
    claim_output_dir(folder, resuming=False, overwrite=True).release()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    claim_output_dir(tmp_path / "new", resuming=False, overwrite=False).release()  # new and empty folders are fine


def test_training_again_into_a_used_folder_needs_resume_or_overwrite(tiny_setup, tmp_path):
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.run_dir import RunDirError

    out = tmp_path / "out"
    args = tiny_setup.train_args(out, "--max_steps", "1", "--max_completion_length", "4", "--token_selection", "none",
                                 "--beta", "0", "--save_steps", "1")
    KTRTrainer(parse_args(TrainConfig, args)).train()
    assert (out / "checkpoint-1").is_dir()
    with pytest.raises(RunDirError, match="already holds a run"):
        KTRTrainer(parse_args(TrainConfig, args))
    fresh = KTRTrainer(parse_args(TrainConfig, [*args, "--overwrite_output_dir", "true"]))
    assert not (out / "checkpoint-1").exists() and not (out / "metrics.jsonl").exists()
    fresh.run_lock.release()


# ------------------------------------------------------------------------------------------------- cli


def test_cli_prints_one_line_for_a_user_mistake_and_the_traceback_with_debug(tiny_setup, tmp_path, capsys):
    from video_ktr import cli

    rows = _rows(tiny_setup)[:2]
    rows[1] = dict(rows[1], problem="bad \ud800")
    path = _write(tmp_path, tiny_setup, rows)
    args = ["train", *tiny_setup.train_args(tmp_path / "out", "--dataset", str(path), "--media_root", str(tiny_setup.data_dir))]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"video-ktr train: error: {path}, row 1, field 'problem': invalid Unicode")
    assert len(err) == 2 and "--debug" in err[1] and "Traceback" not in "\n".join(err)
    with pytest.raises(DataError, match="row 1, field 'problem'"):
        cli.main([*args[:1], "--debug", *args[1:]])
    args[args.index("--output_dir") + 1] = str(tmp_path / "out2")
    with pytest.raises(SystemExit) as e:  # settings: argparse's usage and one error line, exit 2
        cli.main([*args, "--learning_rate", "nan"])
    assert e.value.code == 2
    assert "--learning_rate must be a finite number, got nan" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture
def two_checkpoints(tiny_setup, tmp_path):
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig

    out = tmp_path / "out"
    args = tiny_setup.train_args(out, "--max_steps", "2", "--max_completion_length", "4", "--token_selection", "none",
                                 "--beta", "0", "--save_steps", "1", "--learning_rate", "1e-3")
    KTRTrainer(parse_args(TrainConfig, args)).train()
    return out, args


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damaged", ["trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt"])
def test_a_damaged_checkpoint_is_named_and_latest_falls_back(two_checkpoints, damaged):
    from video_ktr.training.checkpoint import CheckpointError
    from video_ktr.training.checkpoint_verify import find_resumable, verify

    out, _ = two_checkpoints
    verify(out / "checkpoint-1")
    verify(out / "checkpoint-2")
    _truncate(out / "checkpoint-2" / damaged)
    with pytest.raises(CheckpointError, match=rf"checkpoint-2/{damaged} is damaged"):
        verify(out / "checkpoint-2")
    path, skipped = find_resumable(out, "latest")
    assert path.name == "checkpoint-1" and len(skipped) == 1 and skipped[0].startswith("skipped checkpoint-2: ")
    with pytest.raises(CheckpointError, match=damaged):  # named explicitly: refused, no fallback
        find_resumable(out, str(out / "checkpoint-2"))
    _truncate(out / "checkpoint-1" / damaged)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .* to resume from"):
        find_resumable(out, "latest")


def test_resume_latest_skips_a_truncated_checkpoint_and_says_so(two_checkpoints, capsys):
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig

    out, args = two_checkpoints
    _truncate(out / "checkpoint-2" / "model.safetensors")
    trainer = KTRTrainer(parse_args(TrainConfig, [*args, "--resume_from_checkpoint", "latest"]))
    assert trainer.state.step == 1
    printed = capsys.readouterr().err  # a logged warning (utils/logs.py), on stderr
    assert "skipped checkpoint-2:" in printed and "model.safetensors is damaged" in printed
    trainer.run_lock.release()


def test_a_nonfinite_model_is_never_saved_as_final(tiny_setup, tmp_path):
    import torch

    from video_ktr.training.checkpoint_verify import NonFiniteModelError
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig

    out = tmp_path / "out"
    trainer = KTRTrainer(parse_args(TrainConfig, tiny_setup.train_args(out, "--max_steps", "1")))
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteModelError, match=r"1 parameter tensor\(s\) hold NaN or inf"):
        trainer.save_final()
    assert not (out / "config.json").exists() and not list(out.glob("*.safetensors"))
    trainer.run_lock.release()


# ------------------------------------------------------------------------------------------- data unpack


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_unpack_never_overwrites_without_overwrite_names_collisions_and_goes_on(tmp_path):
    from video_ktr.data.unpack import unpack

    root = tmp_path / "dl"
    _zip(root / "A" / "A.zip", {"v/1.mp4": b"new one", "v/2.mp4": b"two"})
    _zip(root / "B" / "B.zip", {"clip": b"x", "clip/inner.mp4": b"y"})  # a file and a folder of one name
    _zip(root / "C" / "C.zip", {"c.mp4": b"c"})
    (root / "A" / "v").mkdir()
    (root / "A" / "v" / "1.mp4").write_bytes(b"the user's own file")
    (root / "A" / "v" / "2.mp4").write_bytes(b"two")  # identical: not a collision
    _tar(root / "D" / "media.tar.gz", {"d.mp4": b"d"})
    lines: list[str] = []
    result = unpack(root, progress=False, log=lines.append)
    text = "\n".join(lines)
    assert [a.name for a in result.extracted] == ["C.zip", "media.tar.gz"] and (root / "C" / "c.mp4").read_bytes() == b"c"
    assert {e.archive.rsplit("/", 1)[1] for e in result.errors} == {"A.zip", "B.zip"} and not result.ok
    assert "'v/1.mp4':" in text and "exists and differs (--overwrite replaces it)" in text and "'v/2.mp4'" not in text
    assert "'clip/inner.mp4': the archive also holds a file 'clip'" in text
    assert (root / "A" / "v" / "1.mp4").read_bytes() == b"the user's own file"
    assert (root / "D" / "d.mp4").read_bytes() == b"d" and "[4/4] D/media.tar.gz: extracting 1 member(s)" in text

    again = unpack(root, progress=False, log=lambda _: None, overwrite=True)
    assert (root / "A" / "v" / "1.mp4").read_bytes() == b"new one" and [a.name for a in again.extracted] == ["A.zip"]


def test_unpack_folder_in_the_way_is_a_collision_not_a_traceback(tmp_path):
    from video_ktr.data.unpack import unpack

    root = tmp_path / "dl"
    _zip(root / "A.zip", {"x.mp4": b"1"})
    (root / "x.mp4").mkdir()
    lines: list[str] = []
    result = unpack(root, progress=False, log=lines.append, overwrite=True)
    assert not result.ok and "'x.mp4': " in "\n".join(lines) and "is a folder" in "\n".join(lines)


def _tar(path: Path, members: dict, mode: str = "w:gz") -> Path:
    """A tar at ``path``: name -> bytes (a file), None (a folder) or a tarfile.TarInfo (written as it is)."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:
        for name, content in members.items():
            if isinstance(content, tarfile.TarInfo):
                tf.addfile(content)
                continue
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
    return path


def _special(name: str, kind: str, target: str = "", mode: int = 0o644):
    import tarfile

    info = tarfile.TarInfo(name)
    info.type = {"sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
                 "fifo": tarfile.FIFOTYPE}[kind]
    info.linkname, info.mode, info.devmajor, info.devminor = target, mode, 1, 3
    return info


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_unpack_extracts_tar_archives_with_the_zip_rules(tmp_path, mode):
    from video_ktr.data.unpack import marker_path, unpack

    suffix = {"w": ".tar", "w:gz": ".tar.gz", "w:bz2": ".tar.bz2", "w:xz": ".tar.xz"}[mode]
    root = tmp_path / "dl"
    inner = _tar(tmp_path / "inner.tar", {"deep.mp4": b"deep"}, "w").read_bytes()
    archive = _tar(root / "S" / f"media{suffix}", {"./v": None, "./v/1.mp4": b"one", "v/2.mp4": b"two",
                                                   "inner.tar": inner}, mode)
    result = unpack(root, progress=False, log=lambda _: None)
    assert result.ok and [a.name for a in result.extracted] == [archive.name]
    assert (root / "S" / "v" / "1.mp4").read_bytes() == b"one" and (root / "S" / "v" / "2.mp4").read_bytes() == b"two"
    assert json.loads(marker_path(archive).read_text())["nested_archives"] == ["inner.tar"]
    assert not (root / "S" / "deep.mp4").exists()  # an archive inside an archive is content, not a download
    lines: list[str] = []
    again = unpack(root, progress=False, log=lines.append)
    assert again.ok and not again.extracted and "skip S/inner.tar: it was extracted from S/media" in "\n".join(lines)

    # the zip rules for what is on disk: a differing file is never replaced without --overwrite
    marker_path(archive).unlink()
    (root / "S" / "v" / "1.mp4").write_bytes(b"the user's own")
    lines = []
    refused = unpack(root, progress=False, log=lines.append)
    assert not refused.ok and "'v/1.mp4': " in "\n".join(lines) and "exists and differs (--overwrite replaces it)" in "\n".join(lines)
    assert "'v/2.mp4'" not in "\n".join(lines)  # identical: not a collision
    assert (root / "S" / "v" / "1.mp4").read_bytes() == b"the user's own"
    assert unpack(root, progress=False, log=lambda _: None, overwrite=True).ok
    assert (root / "S" / "v" / "1.mp4").read_bytes() == b"one"


@pytest.mark.parametrize(("member", "why"), [
    ({"../evil.mp4": b"x"}, "'..' component"),
    ({"sub/../../evil.mp4": b"x"}, "'..' component"),
    ({"/tmp/relmod-evil-abs.mp4": b"x"}, "absolute name"),
    ({"escape": _special("escape", "sym", "/etc")}, "symbolic link entry to '/etc'"),
    ({"up": _special("up", "sym", "../../outside")}, "symbolic link entry"),
    ({"passwd": _special("passwd", "hard", "/etc/passwd")}, "hard link entry to '/etc/passwd'"),
    ({"inside": _special("inside", "hard", "good.mp4")}, "hard link entry"),
    ({"null": _special("null", "chr")}, "a device file"),
    ({"disk": _special("disk", "blk")}, "a device file"),
    ({"pipe": _special("pipe", "fifo")}, "a FIFO"),
])
def test_unpack_refuses_malicious_tar_members_and_writes_nothing_of_that_archive(tmp_path, member, why):
    from video_ktr.data.unpack import marker_path, unpack

    root = tmp_path / "dl"
    bad = _tar(root / "Bad" / "bad.tar.gz", {"good.mp4": b"ok", **member})
    _tar(root / "Good" / "good.tgz", {"fine.mp4": b"fine"})
    lines: list[str] = []
    result = unpack(root, progress=False, log=lines.append)
    text = "\n".join(lines)
    (name,) = member
    assert [e.member for e in result.errors] == [name] and f"archive {bad}, member {name!r}" in text and why in text
    assert "REFUSED" in text and not result.ok
    assert sorted(p.name for p in (root / "Bad").iterdir()) == ["bad.tar.gz"] and not marker_path(bad).exists()
    assert not (root / "evil.mp4").exists() and not (tmp_path / "evil.mp4").exists()
    assert not Path("/tmp/relmod-evil-abs.mp4").exists()
    assert (root / "Good" / "fine.mp4").read_bytes() == b"fine"  # the other archives are still extracted


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_unpack_archive_holding_a_file_and_a_folder_of_one_name_is_refused_before_writing(tmp_path, fmt):
    from video_ktr.data.unpack import unpack

    root = tmp_path / "dl"
    if fmt == "zip":
        import zipfile

        (root / "A").mkdir(parents=True)
        with zipfile.ZipFile(root / "A" / "a.zip", "w") as zf:
            zf.writestr("first.mp4", b"1")
            zf.writestr("clip/", b"")
            zf.writestr("clip", b"x")
    else:
        _tar(root / "A" / "a.tar", {"first.mp4": b"1", "clip": None, "./clip": b"x"}, "w")
    lines: list[str] = []
    result = unpack(root, progress=False, log=lines.append)
    assert not result.ok and "'clip': the archive also holds a folder of that name" in "\n".join(lines)
    assert not (root / "A" / "first.mp4").exists()  # refused before anything was written (it was an OSError midway)


def test_unpack_tar_never_writes_through_a_symlink_nor_applies_modes_and_checks_space(tmp_path, monkeypatch):
    import io
    import os
    import stat
    import tarfile

    from video_ktr.data import unpack as unpack_mod
    from video_ktr.data.unpack import ArchiveError, marker_path, unpack_archive

    root, outside = tmp_path / "dl", tmp_path / "outside"
    outside.mkdir()
    (root / "B").mkdir(parents=True)
    (root / "B" / "videos").symlink_to(outside, target_is_directory=True)
    through = _tar(root / "B" / "b.tar", {"videos/x.mp4": b"x"}, "w")
    with pytest.raises(ArchiveError, match=r"outside .* \(through an existing symlink\)") as e:
        unpack_archive(through, progress=False)
    assert e.value.member == "videos/x.mp4" and not (outside / "x.mp4").exists()

    setuid = tarfile.TarInfo("run.sh")
    setuid.size, setuid.mode, setuid.uid, setuid.gid = 2, 0o6777, 0, 0
    (root / "C").mkdir()
    with tarfile.open(root / "C" / "c.tar", "w") as tf:
        tf.addfile(setuid, io.BytesIO(b"#!"))
    unpack_archive(root / "C" / "c.tar", progress=False)
    mode = os.stat(root / "C" / "run.sh").st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IXOTH)  # only the bytes come from the archive

    big = _tar(root / "D" / "big.tar.xz", {"a.mp4": b"a" * 5000, "b.mp4": b"b" * 5000}, "w:xz")
    monkeypatch.setattr(unpack_mod.shutil, "disk_usage", lambda _: _disk_usage(free=4096))
    with pytest.raises(ArchiveError, match=r"needs 9\.8 KB of disk space in .*only 4\.0 KB free"):
        unpack_archive(big, progress=False)
    assert not (root / "D" / "a.mp4").exists() and not marker_path(big).exists()

    truncated = root / "E" / "cut.tar.gz"
    truncated.parent.mkdir()
    truncated.write_bytes(_tar(tmp_path / "whole.tar.gz", {"a.mp4": os.urandom(20000)}).read_bytes()[:3000])
    with pytest.raises(ArchiveError, match=r"cut\.tar\.gz.*(corrupt or truncated|not a readable tar archive)"):
        unpack_archive(truncated, progress=False)
    assert not marker_path(truncated).exists()


def _disk_usage(free: int):
    from collections import namedtuple

    return namedtuple("usage", "total used free")(free, 0, free)


# ------------------------------------------------------------------------------------------------- eval


class _PickyEngine:
    """Answers 'A'; raises for any batch holding the row whose seed is ``bad_seed`` (a row only it chokes on)."""

    name = "picky"

    def __init__(self, bad_seed: int | None):
        self.bad_seed, self.calls = bad_seed, []

    def generate(self, messages, media, seeds, *, max_new_tokens, temperature, top_p):
        self.calls.append(len(seeds))
        if self.bad_seed in seeds:
            raise ValueError("the processor refused this row")
        return ["<answer>A</answer>"] * len(seeds)


def test_eval_jails_media_records_bad_rows_as_failed_and_goes_on(tiny_setup, tmp_path, capsys):
    from video_ktr.evaluation.eval_config import EvalConfig, EvalError
    from video_ktr.evaluation.evaluate import evaluate
    from video_ktr.model.sampling import row_seed

    rows = json.loads(tiny_setup.test_json.read_text())[:6]
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"not yours")
    rows[0] = dict(rows[0], path="/etc/passwd")
    rows[1] = dict(rows[1], path="../" * 12 + str(outside).lstrip("/"))
    rows[2] = dict(rows[2], problem="bad \ud800 text")
    rows[3] = dict(rows[3], problem="what <|video_pad|> is")
    data = tiny_setup.data_dir / f"eval_mistakes_{tmp_path.name}.json"
    data.write_text(json.dumps(rows))
    bad_uid = f"video_r1:{rows[4]['problem_id']}"
    engine = _PickyEngine(row_seed(42, "eval", bad_uid))
    cfg = EvalConfig(model_name_or_path="fake-model", benchmark="video_r1", data_file=str(data),
                     output_dir=str(tmp_path / "out"), max_frames=4, max_pixels=px(4), batch_size=4, progress=False)
    try:
        metrics = evaluate(cfg, engine=engine)
        saved = json.loads((tmp_path / "out" / "video_r1.json").read_text(encoding="utf-8"))["results"]
        failed = {r["uid"]: r["failed"] for r in saved if r["failed"]}
        with pytest.raises(EvalError, match="leads outside --media_root"):
            evaluate(EvalConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "strict"), "on_bad_sample": "error"}),
                     engine=_PickyEngine(None))
    finally:
        data.unlink()
    capsys.readouterr()
    assert metrics["num_failed"] == 5, metrics
    reasons = " | ".join(str(f) for f in metrics["failures"]) if isinstance(metrics["failures"], list) else str(metrics["failures"])
    assert "leads outside --media_root" in reasons and "invalid Unicode" in reasons
    assert "control token '<|video_pad|>'" in reasons and "generation failed: ValueError" in reasons
    assert engine.calls == [2, 1, 1]  # rows 0-3 failed before generating; the failing batch retried row by row
    assert failed[bad_uid].startswith("generation failed") and len(failed) == 5
    assert "\\ud800" in next(r["problem"] for r in saved if "invalid Unicode" in str(r["failed"]))  # written, escaped


# ---------------------------------------------------------------------------------------------- rewards


def test_free_form_reward_is_bounded_in_time_and_unchanged_within_the_cap():
    from video_ktr.core import rewards

    solution = "<answer>" + " ".join(f"word{k % 300} reason" for k in range(1000)) + "</answer>"  # 2,000 words
    answer = "<answer>" + ("alpha beta gamma delta " * 6000)[:100_000] + "</answer>"
    t0 = time.perf_counter()
    score = rewards.accuracy_reward(answer, solution, "free-form")
    assert time.perf_counter() - t0 < 2.0 and 0.0 <= score <= 1.0
    short_pred, short_gt = "The ball rolls left, then stops.", "the ball rolls to the left and stops"
    full = rewards._rouge_scorer().score(short_gt, short_pred)
    expected = min(1.0, (full["rouge1"].fmeasure + full["rouge2"].fmeasure + full["rougeL"].fmeasure) / 3)
    assert rewards._free_form_score(short_pred, short_gt) == expected
    assert rewards._cap_rouge_tokens("x " * 5000).split() == ["x"] * rewards.FREE_FORM_MAX_TOKENS
