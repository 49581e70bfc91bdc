"""`video-ktr sft`: supervised fine-tuning cold start (the recipe: video_ktr.training.sft.SFTTrainer)."""

from __future__ import annotations

from video_ktr.training.sft import SFTTrainer
from video_ktr.training.sft_config import SFTConfig
from video_ktr.utils.config import parse_args


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(SFTConfig, argv, prog="video-ktr sft")
    trainer = SFTTrainer(cfg)
    last = trainer.train()
    if trainer.acc.is_main_process:
        extra = f", eval_loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""
        extra += f", eval_accuracy {last['eval_accuracy']:.4f}" if "eval_accuracy" in last else ""
        print(f"done: {trainer.state.step} steps, final model in {cfg.output_dir}; last loss {last.get('loss', float('nan')):.4f}{extra}")
    return 0
