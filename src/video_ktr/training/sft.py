"""`video-ktr sft`: supervised fine-tuning (the cold start) on chain-of-thought rows.

Each row of a Video-R1-COT-schema file holds the reasoning in ``process`` (``<think>...</think>``) and
the answer in ``solution`` (``<answer>X</answer>``). The model learns to write

    target = process + target_separator + solution, followed by the end-of-turn token (<|im_end|>)

after the same prompt that ``train`` and ``eval`` use (chat template with the generation prompt).

How a batch is built (:func:`build_sft_batch`): the prompts go through the processor with their
decoded frames (left padding, exactly as for a GRPO rollout), the target of each row is tokenized on
its own, the end-of-turn id (read from the tokenizer) is appended, and the targets are appended as
right-padded columns. So the prompt/target boundary is exact by construction (no search for
``<|im_start|>assistant``, no re-tokenisation of a joined string that could merge tokens across the
boundary) and the model is trained on the very token layout it sees when it generates. Labels are
-100 on every prompt column (system, user text, vision markers, visual placeholders) and on padding.

Loss: the mean token cross-entropy over all label tokens of an optimiser step, i.e. summed over the
rows of every micro-batch of every process and divided by the number of label tokens of the whole
step (gradient accumulation and the number of processes do not change what is averaged). Only the
logits of the target columns are formed (``logits_to_keep``).

Evaluation: ``--eval_dataset`` rows give ``eval_loss`` (teacher-forced, no generation); with
``--eval_generate`` the model also answers them greedily (:func:`video_ktr.evaluation.evaluate.evaluate_rows`, the
training prompt and frames) and ``eval_accuracy`` / ``eval_accuracy/<group>`` are logged (groups:
:attr:`video_ktr.data.rows.Sample.kind`). Both run every ``--eval_steps`` and after the last step.

Data order: a seeded permutation per epoch; the position (micro-batches consumed) is the only state a
resumed run needs, so ``N`` steps equal ``k`` steps plus ``N - k`` resumed steps.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from video_ktr.data.media import MediaError, load_image
from video_ktr.data.options import DataArgs
from video_ktr.data.rows import DataError, Sample, SkipReport, load_dataset
from video_ktr.data.video import FrameCache
from video_ktr.model.inputs import Media, processor_call, sequence_inputs, to_device
from video_ktr.model.sampling import row_seed
from video_ktr.training import checkpoint as ckpt
from video_ktr.training.distributed import accelerator_device_kwargs, check_process_count
from video_ktr.training.schedule import build_scheduler
from video_ktr.utils.config import field, parse_args
from video_ktr.utils.jsonl import finite_or_null
from video_ktr.utils.prefetch import Prefetcher

IGNORE_INDEX = -100


@dataclass
class SFTConfig(DataArgs):
    """Supervised fine-tuning on chain-of-thought rows (Video-R1-COT schema: 'process' + 'solution')."""

    model_name_or_path: str = field("", help="Model to fine-tune: a local directory or a hub id (e.g. Qwen/Qwen2.5-VL-7B-Instruct). [required]")
    dataset: str = field("", help="Training data: a Video-R1-COT-schema JSON or JSONL file; every row needs 'process' (<think>...</think>). [required]")
    output_dir: str = field("", help="Where metrics.jsonl, checkpoints and the final model go. [required]")
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
    learning_rate: float = field(1e-6, help="Peak learning rate of AdamW (Video-R1's SFT of 7B models: 1e-6).")
    vision_learning_rate: float | None = field(None, help="Peak learning rate of the vision tower (default: --learning_rate).")
    lr_scheduler_type: str = field("cosine", choices=["cosine", "constant", "linear"], help="Learning-rate schedule after warm-up.")
    warmup_ratio: float = field(0.0, help="Fraction of the steps spent warming the learning rate up linearly.")
    weight_decay: float = field(0.0, help="AdamW weight decay.")
    adam_beta1: float = field(0.9, help="AdamW beta1.")
    adam_beta2: float = field(0.999, help="AdamW beta2.")
    adam_epsilon: float = field(1e-8, help="AdamW epsilon.")
    max_grad_norm: float = field(1.0, help="Clip the gradient norm to this (0 disables clipping).")
    per_device_train_batch_size: int = field(1, help="ROWS per device per micro-step.")
    gradient_accumulation_steps: int = field(1, help="Micro-steps whose gradients are summed before each optimiser step.")
    seed: int = field(42, help="Seed of the data order (a fresh permutation per epoch).")
    frame_cache_size: int | None = field(
        None, help="Decoded videos kept in memory (least recently used dropped); default 4 x the batch. Set it to the "
        "number of training videos to decode each one once for all epochs (small data sets).")

    # model
    dtype: str = field("float32", choices=["float32", "bfloat16", "float16", "auto"], help="Weights dtype (bfloat16 on GPUs that support it).")
    bf16: bool = field(False, help="bf16 mixed precision through accelerate (autocast; weights and optimiser stay in --dtype).")
    attn_implementation: str | None = field("sdpa", help="Attention kernel: sdpa, eager or flash_attention_2.")
    gradient_checkpointing: bool = field(False, help="Recompute activations in the backward pass to save memory.")
    freeze_vision_tower: bool = field(False, help="Do not train the vision encoder.")
    trust_remote_code: bool = field(False, help="Allow model code from the checkpoint (off unless you trust it).")

    # bookkeeping
    logging_steps: int = field(10, help="Print a progress line every this many steps (metrics.jsonl gets every step).")
    save_steps: int = field(0, help="Write checkpoint-N every this many steps (0: only the final model).")
    save_total_limit: int | None = field(None, help="Keep at most this many checkpoints (oldest removed).")
    resume_from_checkpoint: str | None = field(None, help="A checkpoint-N directory to continue from, or 'latest' for the newest complete one in --output_dir.")
    report_to: list[str] = field(["none"], help="Extra trackers through accelerate: tensorboard, wandb (when installed), or none.")
    max_bad_steps: int = field(10, help="Stop when this many steps had a non-finite loss or gradient (each is skipped and counted).")

    def validate(self) -> None:
        for name in ("model_name_or_path", "dataset", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1 or self.per_device_eval_batch_size < 1:
            raise ValueError("--per_device_train_batch_size, --per_device_eval_batch_size and --gradient_accumulation_steps must be >= 1")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError("set --max_steps > 0 or --num_train_epochs > 0")
        if self.frame_cache_size is not None and self.frame_cache_size < 1:
            raise ValueError("--frame_cache_size must be >= 1")
        if self.eval_steps < 0 or self.save_steps < 0:
            raise ValueError("--eval_steps and --save_steps must be >= 0")
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
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError("--warmup_ratio must be in [0, 1]")
        self.frame_settings()


# ---------------------------------------------------------------------------------------------- batches
def sft_target(sample: Sample, separator: str = "") -> str:
    """The assistant text the model learns: ``process + separator + solution`` (end token added separately)."""
    if not (sample.process or "").strip():
        raise ValueError(f"{sample.source}: SFT rows need 'process' (<think>...</think>)")
    return sample.process + separator + sample.solution


def end_of_turn_id(tokenizer: Any) -> int:
    """The id of the end-of-turn token (<|im_end|> for Qwen chat models), read from the tokenizer."""
    ids = tokenizer.convert_tokens_to_ids("<|im_end|>")
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(ids, int) and ids >= 0 and ids != unk:
        return ids
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither <|im_end|> nor an eos token: cannot end the SFT targets")
    return int(tokenizer.eos_token_id)


def build_sft_batch(
    processor: Any, samples: list[Sample], media: list[Media], *, layout: str = "train",
    system_prompt: str | None = None, separator: str = "", end_id: int | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Forward inputs and labels for SFT rows (see the module docstring).

    Returns ``(inputs, labels)``: ``inputs`` holds every processor output (input_ids, attention_mask,
    mm_token_type_ids, pixel tensors, grids, second_per_grid_ts) for prompt + target; ``labels`` has
    the shape of ``input_ids``, equal to it on the target tokens (end-of-turn included) and -100 on
    prompt, visual and padding positions. The targets occupy the last ``Lt`` columns.
    """
    tok = processor.tokenizer
    end_id = end_of_turn_id(tok) if end_id is None else end_id
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else end_id
    texts = [processor.apply_chat_template(s.messages(layout, system_prompt), add_generation_prompt=True, tokenize=False)
             for s in samples]
    prompt = processor_call(processor, texts, media, padding_side="left")
    targets = [tok(sft_target(s, separator), add_special_tokens=False)["input_ids"] + [end_id] for s in samples]
    Lt = max(len(t) for t in targets)
    ids = torch.full((len(samples), Lt), pad_id, dtype=prompt["input_ids"].dtype)
    valid = torch.zeros((len(samples), Lt), dtype=torch.bool)
    for i, t in enumerate(targets):
        ids[i, : len(t)] = torch.tensor(t, dtype=ids.dtype)
        valid[i, : len(t)] = True
    inputs = sequence_inputs(prompt, ids, valid)
    labels = torch.full_like(inputs["input_ids"], IGNORE_INDEX)
    labels[:, -Lt:] = ids.masked_fill(~valid, IGNORE_INDEX)
    return inputs, labels


def token_ce(model: torch.nn.Module, inputs: dict[str, Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token cross-entropy of the target columns: ``(ce, tail_labels)``, both (B, Lt); ce is 0 off the labels.

    The label tokens sit in the last columns (:func:`build_sft_batch`), so only the logits of those
    columns are formed: ``logits_to_keep`` = target width + 1, the last one dropped.
    """
    supervised = (labels != IGNORE_INDEX).any(0).nonzero()
    if supervised.numel() == 0:
        empty = labels[:, :0]
        return torch.zeros(empty.shape, device=labels.device), empty
    tail = labels[:, int(supervised.min()):]
    B, Lt = tail.shape
    logits = model(**inputs, logits_to_keep=Lt + 1, use_cache=False).logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(B * Lt, -1), tail.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return ce.view(B, Lt), tail


def token_ce_sum(model: torch.nn.Module, inputs: dict[str, Tensor], labels: Tensor) -> tuple[Tensor, int]:
    """Sum of the token cross-entropies over the label tokens, and their number."""
    ce, tail = token_ce(model, inputs, labels)
    return ce.sum(), int((tail != IGNORE_INDEX).sum())


def answer_token_mask(tokenizer: Any, samples: list[Sample], separator: str, width: int) -> Tensor:
    """(B, width) bool: the target tokens that overlap the text inside <answer>...</answer>.

    Tokenizes each target exactly as :func:`build_sft_batch` does, with character offsets.
    """
    mask = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, s in enumerate(samples):
        target = sft_target(s, separator)
        base = len(target) - len(s.solution)
        lo = s.solution.find("<answer>") + len("<answer>")
        hi = s.solution.find("</answer>", lo)
        start, end = base + lo, base + hi
        enc = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
        for t, (a, b) in enumerate(enc["offset_mapping"][:width]):
            if a < end and b > start:
                mask[i, t] = True
    return mask


def generation_rows(samples: list[Sample]) -> list[dict[str, Any]]:
    """Rows for :func:`video_ktr.evaluation.evaluate.evaluate_rows` from loaded samples.

    ``path`` is the resolved media file; ``meta["kind"]`` is :attr:`Sample.kind` (the row's kind, else
    its data source, else its problem type), so the ``by_kind`` breakdown groups by it; ``uid`` is the
    position in ``samples`` (unique even when problem ids repeat).
    """
    return [
        {"problem_id": s.problem_id, "problem": s.problem, "data_type": s.data_type, "problem_type": s.problem_type,
         "options": s.options, "solution": s.solution, "path": str(s.media_path), "data_source": s.data_source,
         "meta": {"kind": s.kind}, "uid": f"sft-eval:{i}"}
        for i, s in enumerate(samples)
    ]


def accuracy_sums(results: list[dict[str, Any]], groups: list[str]) -> list[float]:
    """Flat sums of scored results, to be added over processes and turned into accuracies by :func:`accuracies`.

    ``[sum, n]`` of the scored non-regression rows (``evaluate``'s ``overall``), the number of failed
    rows, then ``[sum, n]`` of the scored rows of each group (``meta["kind"]``, as ``by_kind``; every
    problem type, the MRA for regression rows). The scores are those :func:`evaluate_rows` gave.
    """
    overall: list[float] = []
    by_group: dict[str, list[float]] = {g: [] for g in groups}
    failed = 0
    for r in results:
        if r.get("score") is None:
            failed += 1
            continue
        score = float(r["score"])
        by_group[str(r["meta"]["kind"])].append(score)
        if r["problem_type"] != "regression":
            overall.append(score)
    sums = [sum(overall), float(len(overall)), float(failed)]
    for g in groups:
        sums += [sum(by_group[g]), float(len(by_group[g]))]
    return sums


def accuracies(sums: list[float], groups: list[str]) -> dict[str, float | int]:
    """``eval_accuracy`` and ``eval_accuracy/<group>`` from (reduced) :func:`accuracy_sums`.

    A mean with no scored row is left out. ``eval_scored_rows`` counts the scored rows; rows whose media
    could not be read (``--on_bad_sample skip``) are not scored and are counted in ``eval_generate_failed``.
    """
    out: dict[str, float | int] = {}
    if sums[1]:
        out["eval_accuracy"] = sums[0] / sums[1]
    for j, g in enumerate(groups):
        total, n = sums[3 + 2 * j], sums[4 + 2 * j]
        if n:
            out[f"eval_accuracy/{g}"] = total / n
    out["eval_scored_rows"] = int(sum(sums[4::2]))  # every scored row is in exactly one group
    if sums[2]:
        out["eval_generate_failed"] = int(sums[2])
    return out


# ---------------------------------------------------------------------------------------------- trainer
class SFTTrainer:
    """The SFT loop on accelerate; conventions (metrics.jsonl, checkpoints, resume) as the GRPO trainer."""

    def __init__(self, cfg: SFTConfig, accelerator: Any = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from video_ktr.model.loading import (
            freeze_vision,
            load_model,
            load_processor,
            use_sdpa_gqa_on_cpu,
            vision_tower,
        )

        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        log_with = [r for r in cfg.report_to if r != "none"] or None
        self.acc = accelerator or Accelerator(log_with=log_with, project_dir=str(self.out),
                                              mixed_precision="bf16" if cfg.bf16 else "no", **accelerator_device_kwargs())
        check_process_count(self.acc)
        use_sdpa_gqa_on_cpu(self.acc.device)
        if cfg.eval_generate:
            from video_ktr.training.distributed import sharded_parameters

            if sharded_parameters(self.acc):
                raise ValueError("--eval_generate needs whole parameters on each process (one process, DDP or ZeRO-2): "
                                 "under FSDP or DeepSpeed ZeRO-3 each process would generate a different number of "
                                 "tokens with sharded weights. Evaluate the saved model with `video-ktr eval` instead.")
        set_seed(cfg.seed)
        self.frames = cfg.frame_settings()
        self.cache = FrameCache(capacity=cfg.frame_cache_size or max(8, 4 * cfg.per_device_train_batch_size))
        self.skips = SkipReport()
        load_kw = dict(on_bad_sample=cfg.on_bad_sample, allow_outside_media_root=cfg.allow_outside_media_root, require_process=True)
        self.samples = load_dataset(cfg.dataset, cfg.media_root, report=self.skips, **load_kw)
        self.eval_skips = SkipReport()
        self.eval_samples = (load_dataset(cfg.eval_dataset, cfg.media_root, report=self.eval_skips, **load_kw)
                             if cfg.eval_dataset else None)
        self.bad_rows: dict[int, str] = {}  # training rows whose media could not be read (skip policy)
        self._prefetcher = Prefetcher("video-ktr-sft-data")  # the next micro-step's rows (--dataloader_prefetch)
        # --eval_generate: the rows answered at each eval point and their groups (the same on every process)
        self.generation_rows = (generation_rows(self.eval_samples[:cfg.eval_generate_rows])
                                if cfg.eval_generate and self.eval_samples else [])
        self.generation_groups = sorted({r["meta"]["kind"] for r in self.generation_rows})

        self.processor = load_processor(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        self.end_id = end_of_turn_id(self.processor.tokenizer)
        model = load_model(cfg.model_name_or_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                           trust_remote_code=cfg.trust_remote_code)
        if cfg.freeze_vision_tower:
            freeze_vision(model)
        if cfg.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)  # the name from transformers 5.x on
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        tower = vision_tower(model)
        vision_ids = {id(p) for p in tower.parameters()} if tower is not None else set()
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in vision_ids], "lr": cfg.learning_rate}]
        vision_params = [p for p in trainable if id(p) in vision_ids]
        if vision_params:
            groups.append({"params": vision_params, "lr": cfg.learning_rate if cfg.vision_learning_rate is None else cfg.vision_learning_rate})
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        self.total_steps = self._total_steps()
        # the scheduler is not passed to accelerate: its wrapper steps it once per PROCESS at every optimiser
        # step (it assumes a schedule counted in single-process batches); ours counts optimiser steps
        self.scheduler = self._scheduler(optimizer)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.state = ckpt.TrainState()
        self.bad_steps = 0
        self._perms: dict[int, Tensor] = {}
        if cfg.resume_from_checkpoint:
            self._resume(cfg.resume_from_checkpoint)

    # ------------------------------------------------------------------ set-up helpers
    @property
    def rows_per_micro_step(self) -> int:
        """Rows of one micro-step over all processes."""
        return self.cfg.per_device_train_batch_size * self.acc.num_processes

    def _total_steps(self) -> int:
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        rows_per_step = self.rows_per_micro_step * self.cfg.gradient_accumulation_steps
        return max(1, math.ceil(self.cfg.num_train_epochs * len(self.samples) / rows_per_step))

    def _scheduler(self, optimizer: torch.optim.Optimizer):
        return build_scheduler(optimizer, kind=self.cfg.lr_scheduler_type, total_steps=self.total_steps,
                               warmup_ratio=self.cfg.warmup_ratio)

    # ------------------------------------------------------------------ data
    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(row_seed(self.cfg.seed, "sft-order", epoch))
            self._perms = {epoch: torch.randperm(len(self.samples), generator=g)}  # keep one epoch's order
        return self._perms[epoch]

    def _load_media(self, sample: Sample) -> Media:
        if sample.data_type == "video":
            return Media(video=self.cache.get_or_load(sample.media_path, self.frames))
        return Media(image=load_image(sample.media_path, self.frames))

    def _media_error(self, sample: Sample, err: MediaError) -> DataError:
        file, _, row = sample.source.rpartition(":")
        return DataError(file, int(row) if row.isdigit() else None, "path", f"media could not be read: {err}", "media_unreadable")

    def _next_rows(self) -> tuple[list[Sample], list[Media]]:
        """This process's rows of the next micro-step, with decoded media (prefetched while the last step ran).

        A prefetch of another micro-step (the state was moved) is awaited and dropped; an error raised while
        prefetching is raised here, by the step that needs the rows.
        """
        micro = self.state.micro_step
        samples, media, unreadable = self._prefetcher.take(micro, self._rows_at, micro)
        for index, derr in unreadable.items():
            if index not in self.bad_rows:
                self.bad_rows[index] = str(derr)
                self.skips.add(derr)
        self.state.micro_step += 1
        if self.cfg.dataloader_prefetch and self.state.micro_step < self.total_steps * self.cfg.gradient_accumulation_steps:
            self._prefetcher.start(self.state.micro_step, self._rows_at, self.state.micro_step)
        return samples, media

    def _rows_at(self, micro_step: int) -> tuple[list[Sample], list[Media], dict[int, DataError]]:
        """The rows of micro-step ``micro_step`` with decoded media, and the rows found unreadable on the way.

        Global position k = micro_step x rows_per_micro_step + rank x batch + j; epoch and place in the
        epoch's permutation follow from k. A row whose media cannot be read stops the run ('error') or
        is replaced by the next row of the same epoch's order and counted once ('skip', by _next_rows: this
        runs in the prefetch thread and only reads the trainer's state).
        """
        P, n = self.cfg.per_device_train_batch_size, len(self.samples)
        start = micro_step * self.rows_per_micro_step + self.acc.process_index * P
        samples, media, unreadable = [], [], {}
        for k in range(start, start + P):
            epoch, pos = divmod(k, n)
            perm = self._perm(epoch)
            for offset in range(n):
                index = int(perm[(pos + offset) % n])
                if index in self.bad_rows or index in unreadable:
                    continue
                sample = self.samples[index]
                try:
                    media.append(self._load_media(sample))
                except MediaError as err:
                    derr = self._media_error(sample, err)
                    if self.cfg.on_bad_sample == "error":
                        raise derr from err
                    unreadable[index] = derr
                    continue
                samples.append(sample)
                break
            else:
                raise RuntimeError(f"no training row has readable media ({len(self.bad_rows) + len(unreadable)} unreadable "
                                   f"rows; {self.skips.summary()}); check --media_root")
        return samples, media, unreadable

    def close(self) -> None:
        """Stop the data prefetch thread (after the rows it is decoding). train() calls it at the end."""
        self._prefetcher.close()

    def _batch(self, samples: list[Sample], media: list[Media]) -> tuple[dict[str, Tensor], Tensor]:
        inputs, labels = build_sft_batch(self.processor, samples, media, layout=self.cfg.prompt_layout,
                                         system_prompt=self.cfg.system_prompt, separator=self.cfg.target_separator,
                                         end_id=self.end_id)
        dtype = next(self.acc.unwrap_model(self.model).parameters()).dtype
        return to_device(inputs, self.acc.device, dtype=dtype), labels.to(self.acc.device)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """One optimiser step over gradient_accumulation_steps micro-batches (token-mean loss of the step)."""
        cfg, acc = self.cfg, self.acc
        t0 = time.perf_counter()
        micro = [self._batch(*self._next_rows()) for _ in range(cfg.gradient_accumulation_steps)]
        local_tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in micro)
        total_tokens = int(acc.reduce(torch.tensor(local_tokens, device=acc.device), reduction="sum"))
        # DDP averages gradients over processes: multiply by their number so the result is sum / total
        scale = acc.num_processes / max(1, total_tokens)
        ce_local, bad = 0.0, False
        for j, (inputs, labels) in enumerate(micro):
            last = j == len(micro) - 1
            with (acc.no_sync(self.model) if not last else _nullcontext()):
                with acc.autocast():
                    ce, _ = token_ce_sum(self.model, inputs, labels)
                loss = ce * scale
                if not torch.isfinite(loss):
                    bad = True
                    loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
                acc.backward(loss)
            ce_local += float(ce.detach())
        bad = bool(acc.reduce(torch.tensor(float(bad), device=acc.device), reduction="sum") > 0)
        grad_norm = self._clip()
        if bad or not math.isfinite(grad_norm):
            bad = True
            self.bad_steps += 1
            if self.bad_steps >= cfg.max_bad_steps:
                raise RuntimeError(f"{self.bad_steps} steps had a non-finite loss or gradient (--max_bad_steps "
                                   f"{cfg.max_bad_steps}); lower the learning rate or check the data")
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        self.state.step += 1
        ce_total = float(acc.reduce(torch.tensor(ce_local, device=acc.device, dtype=torch.float64), reduction="sum"))
        return {
            "step": self.state.step,
            "loss": ce_total / max(1, total_tokens),
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "tokens": total_tokens,
            "step_seconds": time.perf_counter() - t0,
            "epoch": self.state.micro_step * self.rows_per_micro_step / len(self.samples),
            "bad_step": int(bad),
            "bad_steps_total": self.bad_steps,
            "skipped_samples": self.skips.total,
        }

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            return float(self.acc.clip_grad_norm_(params, self.cfg.max_grad_norm))
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean token loss over --eval_dataset (rows split across processes, sums reduced).

        ``eval_loss`` averages over every target token; ``eval_answer_loss`` over the tokens inside
        <answer>...</answer> only (the few tokens that need the video; chance for a one-token answer
        among k options is about ln k).
        """
        if not self.eval_samples:
            return {}
        acc, cfg = self.acc, self.cfg
        mine = self.eval_samples[acc.process_index::acc.num_processes]
        was_training = self.model.training
        self.model.eval()
        ce_sum, tokens, unreadable, ans_sum, ans_tokens = 0.0, 0, 0, 0.0, 0
        try:
            for start in range(0, len(mine), cfg.per_device_eval_batch_size):
                samples, media = [], []
                for s in mine[start:start + cfg.per_device_eval_batch_size]:
                    try:
                        media.append(self._load_media(s))
                        samples.append(s)
                    except MediaError as err:
                        if cfg.on_bad_sample == "error":
                            raise self._media_error(s, err) from err
                        unreadable += 1
                if not samples:
                    continue
                inputs, labels = self._batch(samples, media)
                with acc.autocast():
                    ce, tail = token_ce(self.model, inputs, labels)
                ce_sum += float(ce.sum())
                tokens += int((tail != IGNORE_INDEX).sum())
                answer = answer_token_mask(self.processor.tokenizer, samples, cfg.target_separator, tail.shape[1]).to(ce.device)
                ans_sum += float(ce[answer].sum())
                ans_tokens += int(answer.sum())
        finally:
            self.model.train(was_training)
        totals = acc.reduce(torch.tensor([ce_sum, float(tokens), float(unreadable), ans_sum, float(ans_tokens)],
                                         device=acc.device, dtype=torch.float64), reduction="sum").tolist()
        out = {"eval_loss": totals[0] / max(1.0, totals[1]), "eval_tokens": int(totals[1]),
               "eval_answer_loss": totals[3] / max(1.0, totals[4])}
        if totals[2]:
            out["eval_unreadable_media"] = int(totals[2])
        return out

    @torch.no_grad()
    def evaluate_accuracy(self) -> dict[str, float | int]:
        """Greedy answers to the --eval_dataset rows (``--eval_generate``): ``eval_accuracy`` and per group.

        The rows are split across processes as in :meth:`evaluate`; each process answers and scores its
        share with :func:`video_ktr.evaluation.evaluate.evaluate_rows` (the training prompt layout, system prompt and
        frame settings; greedy), and the score sums and counts are added over processes
        (:func:`accuracy_sums`, :func:`accuracies`), so every process returns the same numbers.
        """
        if not self.generation_rows:
            return {}
        from video_ktr.evaluation.evaluate import evaluate_rows

        acc, cfg = self.acc, self.cfg
        mine = self.generation_rows[acc.process_index::acc.num_processes]
        results: list[dict[str, Any]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            if mine:
                with acc.autocast():
                    results, _ = evaluate_rows(
                        acc.unwrap_model(self.model), self.processor, mine, cfg.media_root or Path(cfg.eval_dataset).parent,
                        self.frames, greedy=True, max_new_tokens=cfg.eval_max_new_tokens,
                        batch_size=cfg.per_device_eval_batch_size, seed=cfg.seed, prompt_layout=cfg.prompt_layout,
                        system_prompt=cfg.system_prompt, on_bad_sample=cfg.on_bad_sample)
        finally:
            self.model.train(was_training)
        local = torch.tensor(accuracy_sums(results, self.generation_groups), device=acc.device, dtype=torch.float64)
        return accuracies(acc.reduce(local, reduction="sum").tolist(), self.generation_groups)

    def _evaluate_all(self) -> dict[str, float | int]:
        """One eval point: :meth:`evaluate` (eval_loss) and, with --eval_generate, :meth:`evaluate_accuracy`."""
        out = self.evaluate()
        if self.cfg.eval_generate:
            out.update(self.evaluate_accuracy())
        return out

    # ------------------------------------------------------------------ loop, checkpoints
    def train(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        self.out.mkdir(parents=True, exist_ok=True)
        trackers = [r for r in cfg.report_to if r != "none"]
        if acc.is_main_process:
            (self.out / "sft_config.json").write_text(json.dumps(asdict(cfg), indent=2))
            if self.skips.total:
                print(f"training data: {self.skips.summary()}")
            if self.eval_skips.total:
                print(f"eval data: {self.eval_skips.summary()}")
        if trackers and not acc.trackers:
            acc.init_trackers("video-ktr-sft", config=asdict(cfg))
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not acc.is_main_process, desc="sft")
        last: dict[str, Any] = {"step": self.state.step}
        self.model.train()
        try:
            while self.state.step < self.total_steps:
                last = self.train_step()
                evaluated = cfg.eval_steps and self.state.step % cfg.eval_steps == 0 and self.state.step < self.total_steps
                if evaluated:
                    last.update(self._evaluate_all())
                self._log(last, bar)
                if evaluated and acc.is_main_process and "eval_scored_rows" in last:
                    bar.write(_accuracy_line(last))
                if cfg.save_steps and self.state.step % cfg.save_steps == 0 and self.state.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            self.close()
        if self.eval_samples:
            final_eval = self._evaluate_all()
            last.update(final_eval)
            if acc.is_main_process and last:
                self._rewrite_last(last)
                bar.write(f"eval_loss={final_eval['eval_loss']:.4f} ({final_eval['eval_tokens']} tokens)")
                if "eval_scored_rows" in final_eval:
                    bar.write(_accuracy_line(last))
            if trackers:
                acc.log(final_eval, step=self.state.step)
        bar.close()
        self.save_final()
        counts = self._skip_counts()
        if acc.is_main_process and (sum(counts.values()) or self.eval_skips.total):
            print("skipped rows: " + (", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none")
                  + (f"; eval data: {self.eval_skips.summary()}" if self.eval_skips.total else ""))
        acc.end_training()
        result = dict(last)
        result["skipped_samples"] = sum(counts.values())
        result.update({f"skipped/{k}": v for k, v in counts.items()})
        result["steps"] = self.state.step
        return result

    def _log(self, metrics: dict[str, Any], bar: Any) -> None:
        if self.acc.is_main_process:
            with (self.out / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(finite_or_null(metrics)) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}")
            if self.cfg.logging_steps and self.state.step % self.cfg.logging_steps == 0:
                bar.write(_progress_line(metrics))
        if [r for r in self.cfg.report_to if r != "none"]:
            self.acc.log(metrics, step=self.state.step)

    def _rewrite_last(self, metrics: dict[str, Any]) -> None:
        """Put the final eval_loss (and eval_accuracy) on the last step's line of metrics.jsonl."""
        path = self.out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        if lines and json.loads(lines[-1]).get("step") == metrics.get("step"):
            lines[-1] = json.dumps(finite_or_null(metrics))
        else:
            lines.append(json.dumps(finite_or_null(metrics)))
        path.write_text("\n".join(lines) + "\n")

    def _skip_counts(self) -> dict[str, int]:
        """Skipped training rows by reason, summed over processes."""
        local = dict(self.skips.counts)
        if self.acc.num_processes == 1:
            return local
        from accelerate.utils import gather_object

        merged: dict[str, int] = {}
        for part in gather_object([local]):
            for k, v in part.items():
                merged[k] = merged.get(k, 0) + v
        return merged

    def save_checkpoint(self) -> Path:
        path = ckpt.save(self.out, self.state.step, self.acc, self.model, self.processor, self.optimizer, self.scheduler,
                         self.state, extra={"bad_steps": self.bad_steps, "bad_rows": self.bad_rows,
                                            "total_steps": self.total_steps,
                                            "rows_per_micro_step": self.rows_per_micro_step})
        if self.cfg.save_total_limit and self.acc.is_main_process:
            ckpt.prune(self.out, self.cfg.save_total_limit)
        return path

    def save_final(self) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.model)
            if self.cfg.gradient_checkpointing:
                model.config.use_cache = True  # generation after SFT wants the cache back
            ckpt.save_model(self.out, self.acc, self.model, self.processor)

    def _resume(self, spec: str) -> None:
        path = ckpt.find(self.out, spec)
        extra = ckpt.load(path, self.acc, self.model, self.optimizer, self.scheduler, self.state)
        self.bad_steps = int(extra.get("bad_steps", 0))
        for index, message in extra.get("bad_rows", {}).items():
            self.bad_rows[int(index)] = message
            self.skips.counts["media_unreadable"] += 1
        if extra.get("rows_per_micro_step") not in (None, self.rows_per_micro_step):
            raise ValueError(
                f"{path} was written with {extra['rows_per_micro_step']} rows per micro-step (batch x processes); this "
                f"run has {self.rows_per_micro_step}: the data position would not carry over. Resume with the same "
                "--per_device_train_batch_size and number of processes.")
        if extra.get("total_steps") not in (None, self.total_steps) and self.acc.is_main_process:
            print(f"note: the checkpoint was written by a run of {extra['total_steps']} steps; this run has "
                  f"{self.total_steps}, so the learning-rate schedule differs from the original run")
        if self.acc.is_main_process:
            metrics = self.out / "metrics.jsonl"
            if metrics.is_file():  # drop lines of steps the interrupted run did after this checkpoint
                kept = [line for line in metrics.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= self.state.step]
                metrics.write_text("".join(line + "\n" for line in kept))
            print(f"resumed from {path} at step {self.state.step}")


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress_line(m: dict[str, Any]) -> str:
    keys = ("loss", "eval_loss", "eval_answer_loss", "eval_accuracy", "learning_rate", "grad_norm", "tokens", "epoch",
            "step_seconds")
    return f"step {int(m['step'])}: " + " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


def _accuracy_line(m: dict[str, Any]) -> str:
    """``step N: eval_accuracy=0.625 (kind_a=0.5 kind_b=0.75; 16 rows)`` for the console."""
    overall = f"{m['eval_accuracy']:.4f}" if "eval_accuracy" in m else "-"
    groups = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in m.items() if k.startswith("eval_accuracy/"))
    rows = f"{m['eval_scored_rows']} rows" + (f", {m['eval_generate_failed']} failed" if m.get("eval_generate_failed") else "")
    return f"step {int(m['step'])}: eval_accuracy={overall} ({groups + '; ' if groups else ''}{rows})"


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Run SFT with ``cfg``; returns the last step's metrics (with eval_loss, eval_accuracy and skip counts)."""
    return SFTTrainer(cfg).train()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(SFTConfig, argv, prog="video-ktr sft")
    trainer = SFTTrainer(cfg)
    last = trainer.train()
    if trainer.acc.is_main_process:
        extra = f", eval_loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""
        extra += f", eval_accuracy {last['eval_accuracy']:.4f}" if "eval_accuracy" in last else ""
        print(f"done: {trainer.state.step} steps, final model in {cfg.output_dir}; last loss {last.get('loss', float('nan')):.4f}{extra}")
    return 0
