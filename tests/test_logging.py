"""Diagnostics through Python logging with transformers' --log_level semantics (utils/logs.py)."""

from __future__ import annotations

import logging

import pytest

from video_ktr.training.grpo_config import TrainConfig
from video_ktr.utils import logs
from video_ktr.utils.config import parse_args

REQ = ["--model_name_or_path", "m", "--dataset", "d.json", "--output_dir", "o"]


@pytest.fixture(autouse=True)
def _restore_levels():
    from transformers.utils import logging as hf_logging

    ours, theirs = logs.package_logger().level, hf_logging.get_verbosity()
    yield
    logs.package_logger().setLevel(ours)
    hf_logging.set_verbosity(theirs)


def test_flags_parse_with_transformers_choices(capsys):
    cfg = parse_args(TrainConfig, [*REQ, "--log_level", "debug", "--log_level_replica", "error", "--disable_tqdm"])
    assert (cfg.log_level, cfg.log_level_replica, cfg.disable_tqdm) == ("debug", "error", True)
    cfg = parse_args(TrainConfig, REQ)
    assert (cfg.log_level, cfg.log_level_replica, cfg.disable_tqdm) == ("passive", "warning", None)
    with pytest.raises(SystemExit):
        parse_args(TrainConfig, [*REQ, "--log_level", "verbose"], prog="video-ktr train")
    assert "field 'log_level' must be one of" in capsys.readouterr().err


def test_messages_keep_their_text_on_stderr_and_levels_filter_them(capsys):
    from transformers.utils import logging as hf_logging

    log = logs.get_logger("video_ktr.training.run")
    log.info("resumed from x at step 3")
    assert capsys.readouterr().err == "resumed from x at step 3\n"  # what print wrote, on stderr
    cfg = parse_args(TrainConfig, [*REQ, "--log_level", "warning"])
    assert logs.setup_logging(cfg, main=True) == logging.WARNING
    assert hf_logging.get_verbosity() == logging.WARNING
    log.info("hidden")
    log.warning("shown")
    assert capsys.readouterr().err == "shown\n"
    cfg = parse_args(TrainConfig, [*REQ, "--log_level", "debug"])
    logs.setup_logging(cfg, main=True)
    assert hf_logging.get_verbosity() == logging.DEBUG
    log.debug("details")
    assert capsys.readouterr().err == "details\n"


def test_passive_changes_nothing_and_replicas_take_their_own_level():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(logging.ERROR)
    cfg = parse_args(TrainConfig, REQ)
    assert logs.setup_logging(cfg, main=True) == logs.DEFAULT_LEVEL  # info here, as before the option existed
    assert hf_logging.get_verbosity() == logging.ERROR  # transformers' level untouched
    assert logs.setup_logging(cfg, main=False) == logging.WARNING  # --log_level_replica's default
    cfg = parse_args(TrainConfig, [*REQ, "--log_level", "info", "--log_level_replica", "error"])
    assert logs.setup_logging(cfg, main=False) == logging.ERROR
    assert logs.setup_logging(cfg, main=True) == logging.INFO


def test_main_process_only_as_accelerate_and_rank_before_accelerate_starts(monkeypatch, capsys):
    from accelerate.state import PartialState

    log = logs.get_logger("video_ktr.x")
    monkeypatch.setattr(PartialState, "_shared_state", {})  # no Accelerator made yet: RANK decides
    monkeypatch.setenv("RANK", "1")
    assert not logs.is_main_process()
    log.warning("every process would say this")
    log.warning("rank 1 says this", main_process_only=False)
    assert capsys.readouterr().err == "rank 1 says this\n"
    monkeypatch.setenv("RANK", "0")
    log.warning("main says this")
    assert capsys.readouterr().err == "main says this\n"
    monkeypatch.delenv("RANK")
    assert logs.is_main_process()


def test_progress_bars_main_process_only_and_off_above_warning():
    cfg = parse_args(TrainConfig, REQ)
    logs.setup_logging(cfg, main=True)
    assert not logs.bars_disabled(cfg, main=True)
    assert logs.bars_disabled(cfg, main=False)
    assert logs.bars_disabled(parse_args(TrainConfig, [*REQ, "--disable_tqdm", "true"]), main=True)
    quiet = parse_args(TrainConfig, [*REQ, "--log_level", "error"])
    logs.setup_logging(quiet, main=True)
    assert logs.bars_disabled(quiet, main=True)  # transformers: disable_tqdm defaults to True above warning
    assert not logs.bars_disabled(parse_args(TrainConfig, [*REQ, "--log_level", "error", "--disable_tqdm", "false"]), main=True)
    with logs.progress(range(3), options=cfg, main=False) as bar:
        assert bar.disable


def test_a_library_message_goes_through_the_logger(tmp_path, capsys):
    """claim_output_dir's note (was a print on stdout) is an info record: shown by default, hidden at warning."""
    from video_ktr.utils.run_dir import claim_output_dir

    (tmp_path / "metrics.jsonl").write_text("{}\n")
    claim_output_dir(tmp_path, resuming=False, overwrite=True).release()
    assert "--overwrite_output_dir removed the previous run's metrics.jsonl" in capsys.readouterr().err
    logs.setup_logging(parse_args(TrainConfig, [*REQ, "--log_level", "warning"]), main=True)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    claim_output_dir(tmp_path, resuming=False, overwrite=True).release()
    assert capsys.readouterr().err == ""


class _Answers:
    """A stand-in engine: every row answered 'A'."""

    def generate(self, messages, media, seeds, **kwargs):
        return ["<think>x</think><answer>A</answer>"] * len(messages)


def test_evaluation_passes_show_a_named_bar_on_the_main_process_only(tiny_setup, monkeypatch, capsys):
    import json

    from video_ktr.evaluation.evaluate import evaluate_rows

    rows = json.loads(tiny_setup.test_json.read_text())[:3]
    run = dict(engine=_Answers(), batch_size=2, progress=True, progress_desc="eval sft greedy", prefetch=False)
    evaluate_rows(None, None, rows, tiny_setup.data_dir, tiny_setup.frame_settings(), **run)
    err = capsys.readouterr().err
    assert "eval sft greedy" in err and "3/3" in err
    monkeypatch.setattr(logs, "is_main_process", lambda: False)
    evaluate_rows(None, None, rows, tiny_setup.data_dir, tiny_setup.frame_settings(), **run)
    assert "eval sft greedy" not in capsys.readouterr().err


def test_demo_and_ablate_pass_the_options_on():
    from pathlib import Path

    from video_ktr.analysis.demo import DemoConfig, _log_args, rl_config

    cfg = parse_args(DemoConfig, ["--quick", "--disable_tqdm", "--log_level", "warning"])
    assert logs.bars_disabled(cfg, main=True)
    rl = rl_config(cfg, Path("m"), Path("d.json"), Path("o"))
    assert (rl.disable_tqdm, rl.log_level) == (True, "warning") and _log_args(cfg)["disable_tqdm"] is True
    assert not logs.bars_disabled(parse_args(DemoConfig, ["--quick"]), main=True)
