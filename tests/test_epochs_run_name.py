"""`train` takes TRL / transformers' --num_train_epochs (with --max_steps -1 or left out) and --run_name."""

from __future__ import annotations

import json

import pytest

from video_ktr.training.grpo_config import TrainConfig
from video_ktr.training.sft_config import SFTConfig
from video_ktr.utils.config import parse_args

REQ = ["--model_name_or_path", "m", "--dataset", "d.json", "--output_dir", "runs/exp1"]


@pytest.mark.parametrize("flags, steps, epochs", [
    ([], 100, None),  # neither given: this project's 100 steps, as before
    (["--num_train_epochs", "2"], -1, 2.0),  # max_steps left out: epochs decide (TRL's max_steps -1)
    (["--max_steps", "-1", "--num_train_epochs", "0.5"], -1, 0.5),
    (["--max_steps", "7", "--num_train_epochs", "2"], 7, 2.0),  # a positive max_steps overrides epochs
    (["--max_steps", "7"], 7, None),
])
def test_max_steps_and_epochs_resolve_as_in_transformers(flags, steps, epochs):
    cfg = parse_args(TrainConfig, [*REQ, *flags])
    assert (cfg.max_steps, cfg.num_train_epochs) == (steps, epochs)


def test_epochs_count_prompts_per_optimizer_step():
    cfg = parse_args(TrainConfig, [*REQ, "--num_train_epochs", "1.5", "--per_device_train_batch_size", "2",
                                   "--gradient_accumulation_steps", "2"])
    assert cfg.optimizer_steps(rows=10, prompts_per_step=2 * 1 * 2) == 4  # ceil(1.5 x 10 / 4)
    assert cfg.optimizer_steps(rows=1, prompts_per_step=4) == 1  # never 0 steps
    assert parse_args(TrainConfig, [*REQ, "--max_steps", "3", "--num_train_epochs", "9"]).optimizer_steps(10, 4) == 3


@pytest.mark.parametrize("flags, message", [
    (["--max_steps", "-1"], "--max_steps -1 runs --num_train_epochs passes"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs must be > 0 with --max_steps -1"),
    (["--max_steps", "0"], "--max_steps must be >= 1 (or -1: run --num_train_epochs), got 0"),
    (["--max_steps", "-2", "--num_train_epochs", "1"], "--max_steps must be >= 1 (or -1: run --num_train_epochs), got -2"),
    (["--run_name", " "], "--run_name must not be empty"),
])
def test_bad_step_settings_are_refused_by_name(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(TrainConfig, [*REQ, *flags], prog="video-ktr train")
    assert message in capsys.readouterr().err


def test_run_name_defaults_to_the_output_folder_and_reaches_wandb():
    cfg = parse_args(TrainConfig, REQ)
    assert cfg.run_name is None and cfg.run_label == "exp1" and cfg.tracker_init_kwargs() == {}
    cfg = parse_args(TrainConfig, [*REQ, "--run_name", "ktr-7b-a", "--report_to", "wandb", "tensorboard"])
    assert cfg.run_label == "ktr-7b-a"
    assert cfg.tracker_init_kwargs() == {"wandb": {"name": "ktr-7b-a"}}
    assert parse_args(SFTConfig, [*REQ, "--run_name", "cold-start"]).run_label == "cold-start"


def test_epochs_train_the_steps_they_count_and_run_name_is_recorded(tiny_setup, tmp_path):
    """24 prompts, 2 per step: 0.125 epochs = 2 steps, the same steps as --max_steps 2 (same order, same metrics)."""
    from video_ktr.training.grpo import KTRTrainer

    common = ["--token_selection", "none", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant"]
    by_epochs = KTRTrainer(parse_args(TrainConfig, tiny_setup.train_args(
        tmp_path / "epochs", *common, "--num_train_epochs", "0.125", "--run_name", "tiny-epochs")))
    assert by_epochs.total_steps == 2
    by_epochs.train()
    by_steps = KTRTrainer(parse_args(TrainConfig, tiny_setup.train_args(tmp_path / "steps", *common, "--max_steps", "2")))
    by_steps.train()

    def metrics(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if "seconds" not in k and not k.startswith("time")} for r in rows]

    assert metrics(tmp_path / "epochs") == metrics(tmp_path / "steps")
    assert json.loads((tmp_path / "epochs" / "run_info.json").read_text())["run_name"] == "tiny-epochs"
    assert json.loads((tmp_path / "steps" / "run_info.json").read_text())["run_name"] == "steps"
    saved = json.loads((tmp_path / "epochs" / "train_config.json").read_text())
    assert (saved["max_steps"], saved["num_train_epochs"], saved["run_name"]) == (-1, 0.125, "tiny-epochs")
