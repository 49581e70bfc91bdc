"""The options `train` (GRPO) and `sft` share: model, optimiser, schedule and bookkeeping.

Each command's dataclass (TrainConfig, SFTConfig) adds its own options and re-declares a shared one
only where its default or meaning differs (e.g. --max_steps, --logging_steps, the batch's unit).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from video_ktr.data.options import DataArgs
from video_ktr.training.hub import check_push_settings
from video_ktr.utils.config import field
from video_ktr.utils.logs import LogOptions


@dataclass
class RunOptions(DataArgs, LogOptions):
    """Options of every training run."""

    model_name_or_path: str = field("", help="Model to train: a local directory or a hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct). [required]")
    dataset: str = field("", help="Training data in the Video-R1 schema: a JSON, JSONL or parquet file, a save_to_disk folder, or a hub dataset id (see data/sources.py). [required]")
    dataset_config: str | None = field(None, help="The hub dataset's configuration (its 'name'), for a hub id in --dataset.")
    dataset_split: str | None = field(None, help="Split of a hub dataset or a DatasetDict folder (default: train).")
    output_dir: str = field("", help="Where metrics.jsonl, checkpoints and the final model go. [required]")

    # schedule and optimiser
    max_steps: int = field(100, help="Optimiser steps to run.")
    learning_rate: float = field(1e-6, help="Peak learning rate of AdamW.")
    lr_scheduler_type: str = field("cosine", choices=["cosine", "constant", "linear"], help="Learning-rate schedule after warm-up.")
    warmup_ratio: float = field(0.0, help="Fraction of the optimiser steps spent warming the learning rate up linearly.")
    weight_decay: float = field(0.0, help="AdamW weight decay.")
    adam_beta1: float = field(0.9, help="AdamW beta1.")
    adam_beta2: float = field(0.999, help="AdamW beta2.")
    max_grad_norm: float = field(1.0, help="Clip the gradient norm to this (0 disables clipping).")
    per_device_train_batch_size: int = field(1, help="Rows per device per micro-step.")
    gradient_accumulation_steps: int = field(1, help="Micro-steps whose gradients are summed before each optimiser step.")
    seed: int = field(42, help="Seed of the data order and every random stream of the run.")

    # model
    dtype: str = field("float32", choices=["float32", "bfloat16", "float16", "auto"], help="Weights dtype (bfloat16 on GPUs that support it).")
    attn_implementation: str | None = field("sdpa", help="Attention kernel: sdpa, eager or flash_attention_2.")
    gradient_checkpointing: bool = field(False, help="Recompute activations in the backward pass to save memory.")
    freeze_vision_tower: bool = field(False, help="Do not train the vision encoder.")
    trust_remote_code: bool = field(False, help="Allow model code from the checkpoint (off unless you trust it).")

    # bookkeeping
    logging_steps: int = field(1, help="Print a progress line every this many steps (metrics.jsonl gets every step).")
    save_steps: int = field(0, help="Write checkpoint-N every this many steps (0: only the final model).")
    save_total_limit: int | None = field(None, help="Keep at most this many checkpoints (oldest removed).")
    save_only_model: bool = field(False, help="Checkpoints hold the model only (weights, processor, trainer_state.json): no optimiser, scheduler or random states, so they cannot be resumed from (--resume_from_checkpoint latest skips them), but are smaller and quicker to write (transformers' save_only_model).")
    overwrite_output_dir: bool = field(False, help="Start over in an --output_dir that holds a previous run: its checkpoints and logs are removed first (without it such a folder is refused unless the run resumes).")
    resume_from_checkpoint: str | None = field(None, help="A checkpoint-N directory to continue from, or 'latest' for the newest complete one in --output_dir.")
    report_to: list[str] = field(["none"], help="Extra trackers through accelerate: tensorboard, wandb (when installed), or none.")
    run_name: str | None = field(None, help="A name for the run (TRL / transformers' --run_name): the wandb run's name, in every tracker's config and in run_info.json (default: the name of --output_dir).")
    push_to_hub: bool = field(False, help="After training, upload the final model, its processor and the model card (README.md) to the hub (huggingface_hub's create_repo + upload_folder); never the checkpoints, logs or run records. Needs the network and a token (--hub_token, HF_TOKEN or `hf auth login`).")
    hub_model_id: str | None = field(None, help="--push_to_hub: the repository, 'name' (in your namespace) or 'owner/name' (default: the --output_dir folder's name, as transformers).")
    hub_private_repo: bool | None = field(None, help="--push_to_hub: create the repository private (default: the hub's default for your account; an existing repository keeps its visibility).")
    hub_token: str | None = field(None, help="--push_to_hub: the token (default: HF_TOKEN or the saved login). Recorded as <HUB_TOKEN> in the run's config files, never in clear.")
    max_bad_steps: int = field(10, help="Stop when this many steps had a non-finite loss or gradient (each is skipped and counted).")

    def record(self) -> dict[str, Any]:
        """The options as the run's config file and trackers record them (a --hub_token masked, as transformers does)."""
        values = asdict(self)
        if values.get("hub_token"):
            values["hub_token"] = "<HUB_TOKEN>"
        return values

    @property
    def run_label(self) -> str:
        """--run_name, or the name of --output_dir when it is not given (transformers' default is the output folder)."""
        return self.run_name or Path(self.output_dir).name or str(self.output_dir)

    def tracker_init_kwargs(self) -> dict[str, dict[str, Any]]:
        """accelerate's ``init_trackers(init_kwargs=...)``: the run name where a tracker takes one (wandb's ``name``).

        TensorBoard has no run name in accelerate (its folder is the project's); it gets the name in the
        run's config (hyper-parameters) like every tracker.
        """
        return {"wandb": {"name": self.run_label}} if "wandb" in self.trackers else {}

    def steps_for_epochs(self, epochs: float, rows: int, rows_per_step: int) -> int:
        """Optimiser steps of ``epochs`` passes over ``rows`` rows at ``rows_per_step`` rows per step (at least 1)."""
        return max(1, math.ceil(epochs * rows / rows_per_step))

    @property
    def trackers(self) -> list[str]:
        """The --report_to trackers to start ('none' left out)."""
        return [r for r in self.report_to if r != "none"]

    def validate(self) -> None:
        for name in ("model_name_or_path", "dataset", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("--per_device_train_batch_size and --gradient_accumulation_steps must be >= 1")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError("--warmup_ratio must be in [0, 1]")
        if self.run_name is not None and not self.run_name.strip():
            raise ValueError("--run_name must not be empty (leave it out to name the run after --output_dir)")
        check_push_settings(self)
        if self.save_steps < 0:
            raise ValueError("--save_steps must be >= 0 (0: only the final model)")
        self.frame_settings()
