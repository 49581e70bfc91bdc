"""Command-line flags with HfArgumentParser's conventions (utils/config.py)."""

from __future__ import annotations

import dataclasses

import pytest

from video_ktr.training.grpo_config import TrainConfig
from video_ktr.training.sft_config import SFTConfig
from video_ktr.utils.config import build_parser, parse_args

REQ = ["--model_name_or_path", "m", "--dataset", "d.json", "--output_dir", "o"]


def test_lists_space_separated_comma_separated_and_mixed():
    for flags in (["--reward_funcs", "accuracy", "format"], ["--reward_funcs", "accuracy,format"],
                  ["--reward_funcs=accuracy,format"]):
        assert parse_args(TrainConfig, [*REQ, *flags]).reward_funcs == ["accuracy", "format"]
    cfg = parse_args(TrainConfig, [*REQ, "--reward_funcs", "accuracy", "format,tests.reward_fixtures:count_e",
                                   "--reward_weights", "1", "0.5", "2"])
    assert cfg.reward_funcs == ["accuracy", "format", "tests.reward_fixtures:count_e"]
    assert cfg.reward_weights == [1.0, 0.5, 2.0]
    assert parse_args(TrainConfig, [*REQ, "--token_selection", "entropy", "visual"]).token_selection == ["entropy", "visual"]


@pytest.mark.parametrize("flags, want", [
    ([], False), (["--gradient_checkpointing"], True), (["--gradient_checkpointing", "true"], True),
    (["--gradient_checkpointing=false"], False), (["--gradient_checkpointing", "False"], False),
    (["--gradient_checkpointing", "--no_gradient_checkpointing"], False),
])
def test_booleans(flags, want):
    assert parse_args(TrainConfig, [*REQ, *flags]).gradient_checkpointing is want


def test_trl_names_map_onto_ours():
    assert parse_args(TrainConfig, [*REQ, "--bf16", "true"]).dtype == "bfloat16"
    assert parse_args(TrainConfig, [*REQ, "--bf16"]).dtype == "bfloat16"
    assert parse_args(TrainConfig, [*REQ, "--fp16"]).dtype == "float16"
    assert parse_args(TrainConfig, [*REQ, "--bf16", "false"]).dtype == "float32"  # the default stays
    assert parse_args(TrainConfig, [*REQ, "--bf16", "--dtype", "bfloat16"]).dtype == "bfloat16"
    args = ["--model_name_or_path", "m", "--dataset_name", "owner/data", "--output_dir", "o", "--report_to", "none"]
    cfg = parse_args(TrainConfig, args)
    assert cfg.dataset == "owner/data" and cfg.report_to == ["none"]
    cfg = parse_args(SFTConfig, [*REQ, "--num_train_epochs", "2", "--max_steps", "-1"])
    assert (cfg.num_train_epochs, cfg.max_steps) == (2.0, -1)


def test_conflicting_aliases_and_unknown_flags_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(TrainConfig, [*REQ, "--bf16", "--dtype", "float16"], prog="video-ktr train")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--bf16 sets --dtype bfloat16, but --dtype float16 is also given" in err
    with pytest.raises(SystemExit):
        parse_args(TrainConfig, [*REQ, "--learnin_rate", "1e-5"], prog="video-ktr train")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["video-ktr train: error: unrecognized argument --learnin_rate; did you mean --learning_rate?",
                   "(see video-ktr train --help)"]
    with pytest.raises(SystemExit):
        parse_args(TrainConfig, [*REQ, "--max_step=3"], prog="video-ktr train")
    assert "did you mean --max_steps?" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no abbreviations: a prefix is not silently another option
        parse_args(TrainConfig, ["--model", "m", "--dataset", "d", "--output_dir", "o"], prog="video-ktr train")
    assert "unrecognized argument --model" in capsys.readouterr().err


def test_yaml_then_flags_and_old_comma_lists(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model_name_or_path: m\ndataset: d.json\noutput_dir: o\nreward_funcs: accuracy,format\n"
                        "token_selection: [entropy, visual]\ngradient_checkpointing: true\n")
    cfg = parse_args(TrainConfig, ["--config", str(cfg_file)])
    assert cfg.reward_funcs == ["accuracy", "format"] and cfg.token_selection == ["entropy", "visual"]
    assert cfg.gradient_checkpointing is True
    cfg = parse_args(TrainConfig, ["--config", str(cfg_file), "--no_gradient_checkpointing", "--reward_funcs", "format"])
    assert cfg.gradient_checkpointing is False and cfg.reward_funcs == ["format"]


def test_help_lists_required_flags_first_in_groups():
    text = build_parser(TrainConfig, prog="video-ktr train").format_help()
    assert text.splitlines()[0].startswith("usage: video-ktr train --model_name_or_path MODEL_NAME_OR_PATH --dataset DATASET "
                                           "--output_dir OUTPUT_DIR")
    required = text.index("\nrequired:")
    assert required < text.index("--video_fps") and required < text.index("--learning_rate")
    assert text.index("--output_dir") < text.index("--video_fps")
    assert "(RunOptions)" in text and "--bf16" in text
    assert "--no_gradient_checkpointing" not in text  # accepted, but not listed twice


@pytest.mark.parametrize("name", sorted(TrainConfig.REMOVED_OPTIONS))
def test_removed_speed_switches_say_what_to_do_instead(tmp_path, capsys, name):
    """The five speed-only switches are decided at set-up now: a flag is refused with the reason; an old YAML runs, warned."""
    with pytest.raises(SystemExit):
        parse_args(TrainConfig, [f"--{name}", "true"])
    err = capsys.readouterr().err
    assert f"--{name}" in err and "--plain_forwards" in err and "did you mean" not in err
    old = tmp_path / "old.yaml"
    old.write_text(f"{name}: true\n")
    req = ["--model_name_or_path", "m", "--dataset", "d.json", "--output_dir", "o"]
    with pytest.warns(FutureWarning, match=f"option {name} was removed and is ignored: .*--plain_forwards"):
        cfg = parse_args(TrainConfig, ["--config", str(old), *req])
    assert cfg == parse_args(TrainConfig, req)  # an old YAML still runs, unchanged
    assert not any(f.name == name for f in dataclasses.fields(TrainConfig))
