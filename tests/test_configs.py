"""The shipped configs load: training YAMLs into TrainConfig, accelerate YAMLs into accelerate's own config class."""

from __future__ import annotations

from pathlib import Path

import pytest

from video_ktr.training.grpo_config import TrainConfig
from video_ktr.utils.config import from_dict, load_yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "qwen2_5_vl_7b_ktr.yaml"])
def test_training_configs_parse_into_train_config(name):
    cfg = from_dict(TrainConfig, load_yaml(ROOT / "configs" / name), source=name)
    assert cfg.token_selection == ["all"] and cfg.signals == ("entropy", "visual", "temporal")
    assert cfg.entropy_ratio == cfg.visual_ratio == cfg.temporal_ratio == 0.2


def test_paper_recipe_values():
    cfg = from_dict(TrainConfig, load_yaml(ROOT / "configs" / "qwen2_5_vl_7b_ktr.yaml"))
    assert (cfg.learning_rate, cfg.lr_scheduler_type, cfg.beta, cfg.num_generations) == (2e-6, "cosine", 0.04, 8)
    assert (cfg.max_completion_length, cfg.max_frames, cfg.max_pixels) == (768, 16, 128 * 28 * 28)


@pytest.mark.parametrize("name,kind", [("zero2.yaml", "DEEPSPEED"), ("zero3.yaml", "DEEPSPEED"), ("fsdp.yaml", "FSDP"),
                                       ("cpu-2proc.yaml", "MULTI_GPU")])
def test_accelerate_configs_load_with_accelerate(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(ROOT / "configs" / "accelerate" / name))
    assert str(cfg.distributed_type).endswith(kind)
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == int(name[4])
    if kind == "FSDP":
        # no class names: accelerate wraps the model's _no_split_modules, whatever the family (test_adapters)
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert "fsdp_transformer_layer_cls_to_wrap" not in cfg.fsdp_config


def test_demo_rl_yaml_is_the_demo_rl_stage():
    """configs/demo-rl.yaml (used by `video-ktr ablate`) trains exactly what `make demo`'s RL stage trains."""
    import dataclasses

    from video_ktr.analysis.demo import DemoConfig, rl_config

    yaml_cfg = from_dict(TrainConfig, load_yaml(ROOT / "configs" / "demo-rl.yaml"))
    demo_cfg = rl_config(DemoConfig(), Path("runs/demo/sft"), Path("runs/demo/data/train.json"), Path("runs/demo-rl"))
    ignore = {"save_steps", "logging_steps"}
    a, b = dataclasses.asdict(yaml_cfg), dataclasses.asdict(demo_cfg)
    assert {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}
