"""`video-ktr sft` options: one dataclass, used for the command line, YAML configs and the docs."""

from __future__ import annotations

from dataclasses import dataclass

from video_ktr.training.options import RunOptions
from video_ktr.utils.config import field


@dataclass
class SFTConfig(RunOptions):
    """Supervised fine-tuning on chain-of-thought rows (Video-R1-COT schema: 'process' + 'solution')."""

    dataset: str = field("", help="Training data in the Video-R1-COT schema (a JSON, JSONL or parquet file, a save_to_disk folder or a hub id); every row needs 'process' (<think>...</think>). [required]")
    eval_dataset: str | None = field(None, help="Optional held-out rows (same schema): their mean token loss is logged as eval_loss (no generation; see --eval_generate for accuracy).")
    eval_steps: int = field(0, help="Compute eval_loss (and eval_accuracy with --eval_generate) every this many steps (0: only after the last step); needs --eval_dataset.")
    per_device_eval_batch_size: int = field(8, help="Rows per device per forward pass when computing eval_loss (and per generate call with --eval_generate).")
    eval_generate: bool = field(
        False, help="At every eval point also answer the --eval_dataset rows greedily (same prompt and frame settings as "
        "training; scored as `video-ktr eval` scores them) and log eval_accuracy (mean score of the non-regression "
        "rows, as eval's 'overall') and eval_accuracy/<group> (mean score of the group's rows, the MRA for "
        "regression rows), where a row's group is its 'kind' field if it has one, else its 'data_source', else "
        "its 'problem_type'. Rows are split across processes; costs one generation pass per eval point.")
    eval_max_new_tokens: int = field(1024, help="Most tokens generated per answer with --eval_generate.")
    eval_generate_rows: int | None = field(None, help="Answer only the first N rows of --eval_dataset with --eval_generate (default: all; eval_loss still uses all).")
    target_separator: str = field(
        "", help="Text between 'process' and 'solution' in the target. '' gives <think>...</think><answer>X</answer>; "
        "Video-R1's released SFT script joins them with a newline.")

    # schedule
    num_train_epochs: float = field(1.0, help="Passes over the training rows (may be fractional); ignored when --max_steps > 0.")
    max_steps: int = field(-1, help="Optimiser steps to run; overrides --num_train_epochs when > 0.")
    vision_learning_rate: float | None = field(None, help="Peak learning rate of the vision tower (default: --learning_rate).")
    adam_epsilon: float = field(1e-8, help="AdamW epsilon.")
    frame_cache_size: int | None = field(
        None, help="Decoded videos kept in memory (least recently used dropped); default 4 x the batch. Set it to the "
        "number of training videos to decode each one once for all epochs (small data sets).")

    # model
    bf16: bool = field(False, help="bf16 mixed precision through accelerate (autocast; weights and optimiser stay in --dtype).")

    # bookkeeping
    logging_steps: int = field(10, help="Print a progress line every this many steps (metrics.jsonl gets every step).")

    def validate(self) -> None:
        super().validate()
        if self.per_device_eval_batch_size < 1:
            raise ValueError("--per_device_eval_batch_size must be >= 1")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError("set --max_steps > 0 or --num_train_epochs > 0")
        if self.frame_cache_size is not None and self.frame_cache_size < 1:
            raise ValueError("--frame_cache_size must be >= 1")
        if self.eval_steps < 0:
            raise ValueError("--eval_steps must be >= 0")
        if self.eval_steps and not self.eval_dataset:
            raise ValueError("--eval_steps needs --eval_dataset")
        if self.eval_generate and not self.eval_dataset:
            raise ValueError("--eval_generate needs --eval_dataset")
        if self.eval_max_new_tokens < 1:
            raise ValueError("--eval_max_new_tokens must be >= 1")
        if self.eval_generate_rows is not None:
            if self.eval_generate_rows < 1:
                raise ValueError("--eval_generate_rows must be >= 1 (leave it unset to answer every row)")
            if not self.eval_generate:
                raise ValueError("--eval_generate_rows has no effect without --eval_generate true")
        if self.vision_learning_rate is not None and self.freeze_vision_tower:
            raise ValueError("--vision_learning_rate has no effect with --freeze_vision_tower; drop one of them")
