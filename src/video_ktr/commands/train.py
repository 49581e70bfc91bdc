"""`video-ktr train`: GRPO with key-token reinforcement (the step: video_ktr.training.grpo.KTRTrainer.train_step)."""

from __future__ import annotations

import sys

from video_ktr.training.grpo import KTRTrainer
from video_ktr.training.grpo_config import TrainConfig
from video_ktr.training.run import BadStep
from video_ktr.utils.config import parse_args


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(TrainConfig, argv, prog="video-ktr train")
    trainer = KTRTrainer(cfg)
    try:
        last = trainer.train()
    except BadStep as exc:
        print(f"video-ktr train: error: {exc}", file=sys.stderr)
        return 1
    if trainer.acc.is_main_process:
        print(f"done: {trainer.state.step} steps, final model in {cfg.output_dir}; last reward {last.get('reward', float('nan')):.4f}")
    return 0
