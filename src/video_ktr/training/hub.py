"""What a finished run leaves for others: a merged LoRA model, a model card, an upload to the hub.

After the final model is saved (``TrainingRun.train`` calls :func:`finish_output` on every process;
the main one works):

1. ``--merge_adapters`` (with ``--use_peft``): the LoRA adapter just saved is moved to ``OUT/adapter/``,
   the base model (``--model_name_or_path``, ``--dtype``) is loaded on the CPU, the adapter applied and
   merged into its weights (peft's ``merge_and_unload``), and the merged model written to ``OUT`` in
   safetensors: ``from_pretrained(OUT)`` (transformers, vLLM) loads it without peft.
2. ``OUT/README.md``: a model card (hub front matter through ``huggingface_hub.ModelCardData``; the
   base model, the data, the method and its settings, the last training metrics, and the table of any
   evaluation output in ``OUT`` or a folder directly under it).
3. ``--push_to_hub``: ``huggingface_hub.create_repo(--hub_model_id, private=--hub_private_repo,
   exist_ok=True)`` and ``upload_folder`` of the final model's files only (:func:`files_to_push`):
   never checkpoints, logs, run records or sub-folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from video_ktr import __version__
from video_ktr.evaluation.results_table import BENCHMARKS, collect, render
from video_ktr.utils.logs import get_logger
from video_ktr.utils.run_dir import LOCK_NAME, RUN_FILES

logger = get_logger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
RUN_RECORDS = (*RUN_FILES, "run_info.json", LOCK_NAME)  # what a run writes about itself (never uploaded)
_TRUE = {"1", "true", "yes", "on"}

# the settings a model card lists, in this order, where the run's options have them
CARD_SETTINGS = (
    "token_selection", "entropy_ratio", "visual_ratio", "temporal_ratio", "selection_scope", "token_weighting",
    "kl_on", "normalize_by", "num_generations", "beta", "loss_type", "epsilon", "num_iterations", "reward_funcs",
    "reward_weights", "length_bonus", "temporal_grpo", "temperature", "top_p", "max_completion_length",
    "learning_rate", "lr_scheduler_type", "warmup_ratio", "weight_decay", "max_grad_norm", "max_steps",
    "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "dtype",
    "freeze_vision_tower", "use_peft", "lora_r", "lora_alpha", "lora_dropout", "merge_adapters", "max_frames",
    "video_fps", "min_pixels", "max_pixels", "seed",
)


class HubError(RuntimeError):
    """Merging or uploading the final model failed (the model itself is saved in the output folder)."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def check_push_settings(cfg: Any) -> None:
    """Refuse, before anything loads, a push that cannot happen (called by the options' validate())."""
    if not getattr(cfg, "push_to_hub", False):
        for name in ("hub_model_id", "hub_private_repo", "hub_token"):
            if getattr(cfg, name, None) is not None:
                raise ValueError(f"--{name} has no effect without --push_to_hub true")
        return
    if hub_offline():
        raise ValueError("--push_to_hub with HF_HUB_OFFLINE=1: the upload needs the network; unset HF_HUB_OFFLINE "
                         "or drop --push_to_hub (then upload OUTPUT_DIR yourself: huggingface-cli upload)")
    repo = cfg.hub_model_id
    if repo is not None and (not repo.strip() or repo.count("/") > 1 or repo.startswith("/") or repo.endswith("/")):
        raise ValueError(f"--hub_model_id must be 'name' or 'owner/name', got {repo!r}")


def repo_name(cfg: Any) -> str:
    """--hub_model_id, or the --output_dir folder's name (transformers' default; the hub adds your namespace)."""
    return cfg.hub_model_id or Path(cfg.output_dir).resolve().name


# ---------------------------------------------------------------------------------------------- merge
def merge_adapters(out: Path, cfg: Any, processor: Any = None) -> Path:
    """Merge the LoRA adapter saved in ``out`` into the base model; the merged model goes to ``out``.

    Returns the adapter's new folder (``out/adapter``). The base is loaded again from
    ``--model_name_or_path`` on the CPU (one more copy of the weights in host memory), so this works the
    same whatever the training's distributed set-up was.
    """
    # imported here on purpose: training/options.py imports this module (check_push_settings), and model.loading
    # pulls in torch (4.3 s here against 0.85 s for the options), which parsing a command line never needs
    from video_ktr.model.loading import load_model

    try:
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ImportError("--merge_adapters needs the peft extra: pip install 'video-ktr[peft]'") from exc
    out = Path(out)
    if not (out / "adapter_config.json").is_file() or not (out / "adapter_model.safetensors").is_file():
        raise HubError(f"--merge_adapters: no adapter_config.json and adapter_model.safetensors in {out} (was the run "
                       "trained with --use_peft?)")
    adapter = out / "adapter"
    adapter.mkdir(exist_ok=True)
    for name in (*ADAPTER_FILES, "README.md"):
        if (out / name).is_file():
            os.replace(out / name, adapter / name)
    base = load_model(cfg.model_name_or_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                      trust_remote_code=cfg.trust_remote_code)
    # the adapter's weights from safetensors only (no pickle), applied to the base as peft saved them
    model = get_peft_model(base, PeftConfig.from_pretrained(str(adapter)))
    result = set_peft_model_state_dict(model, load_file(str(adapter / "adapter_model.safetensors")))
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if missing:
        raise HubError(f"--merge_adapters: {len(missing)} adapter tensors of {adapter} match no module of "
                       f"{cfg.model_name_or_path} (e.g. {missing[0]})")
    merged = model.merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(str(out))
    logger.info(f"merged the LoRA adapter into {cfg.model_name_or_path}: {out} (adapter kept in {adapter})")
    return adapter


# ---------------------------------------------------------------------------------------------- model card
def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/", "~"))


def _last_metrics(out: Path) -> dict[str, Any]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}


def eval_table(out: Path) -> str | None:
    """The Markdown table of the evaluation outputs in ``out`` or a folder directly under it (None: none)."""
    folders = [d for d in [out, *sorted(p for p in out.iterdir() if p.is_dir())]
               if not d.name.startswith(("checkpoint-", ".")) and any(f.stem in BENCHMARKS for f in d.glob("*.json"))]
    if not folders:
        return None
    try:
        return render(collect(folders))
    except Exception as exc:  # a damaged eval file must not stop the card
        logger.warning(f"model card: the evaluation table was left out ({exc})")
        return None


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def model_card(out: Path, cfg: Any, *, recipe: str, steps: int, merged: bool = False) -> str:
    """The README.md text of the final model in ``out``."""
    from huggingface_hub import ModelCardData

    adapter_only = getattr(cfg, "use_peft", False) and not merged
    base = cfg.model_name_or_path
    tags = ["video-ktr", recipe, "video-language-model"]
    if recipe == "grpo":
        tags += ["reinforcement-learning", "key-token-reinforcement"]
    if getattr(cfg, "use_peft", False):
        tags += ["lora"] + (["merged"] if merged else ["peft"])
    data = ModelCardData(
        base_model=base if _looks_like_hub_id(base) else None,
        datasets=[cfg.dataset] if _looks_like_hub_id(cfg.dataset) else None,
        library_name="peft" if adapter_only else "transformers",
        pipeline_tag="video-text-to-text", tags=tags)
    method = {
        "grpo": "GRPO with key-token reinforcement (Video-KTR): the policy gradient is applied on the completion "
                "tokens the selected signals mark as key (entropy, visual probe, temporal probe)",
        "sft": "supervised fine-tuning on chain-of-thought rows (the cold start before GRPO)",
    }.get(recipe, recipe)
    name = repo_name(cfg) if getattr(cfg, "push_to_hub", False) else Path(cfg.output_dir).resolve().name
    lines = [f"# {name}", "",
             f"Trained with video-ktr {__version__} (`video-ktr "
             f"{'train' if recipe == 'grpo' else recipe}`): {method}.", "",
             f"- base model: `{base}`", f"- training data: `{cfg.dataset}`"
             + (f" (config `{cfg.dataset_config}`)" if getattr(cfg, "dataset_config", None) else "")
             + (f", split `{cfg.dataset_split}`" if getattr(cfg, "dataset_split", None) else ""),
             f"- optimiser steps run: {steps}"]
    if getattr(cfg, "run_label", None):
        lines.append(f"- run name: `{cfg.run_label}`")
    if getattr(cfg, "use_peft", False):
        lines.append("- weights: the LoRA adapter merged into the base (loads without peft)" if merged
                     else "- weights: a LoRA adapter (load the base model, then `peft.PeftModel.from_pretrained`)")
    lines += ["", "## Settings", "", "| option | value |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(getattr(cfg, k))} |" for k in CARD_SETTINGS if hasattr(cfg, k)]
    last = {k: v for k, v in _last_metrics(Path(out)).items()
            if isinstance(v, (int, float)) and "seconds" not in k and not k.startswith("time_")}
    if last:
        lines += ["", "## Last training step", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in last.items()]
    table = eval_table(Path(out))
    lines += ["", "## Evaluation", ""]
    lines += ([table] if table else ["No evaluation output was in the output folder when the run finished (`video-ktr "
                                     "eval` results in OUTPUT_DIR or a folder directly in it are tabled here)."])
    load = ("from peft import PeftModel\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
            f"base = AutoModelForImageTextToText.from_pretrained(\"{base}\")\nmodel = PeftModel.from_pretrained(base, \"{name}\")"
            if adapter_only else
            "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
            f"model = AutoModelForImageTextToText.from_pretrained(\"{name}\")")
    lines += ["", "## Use", "", "```python", load, f"processor = AutoProcessor.from_pretrained(\"{name}\")", "```", "",
              "Or `video-ktr infer` / `video-ktr eval --model_name_or_path` on the folder or the hub id."]
    return "---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- push
def files_to_push(out: Path) -> list[str]:
    """The final model's files in ``out``: top-level files that are not run records, logs or hidden."""
    keep = []
    for path in sorted(Path(out).iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or name in RUN_RECORDS or name.endswith((".jsonl", ".log")):
            continue
        keep.append(name)
    return keep


def push_to_hub(out: Path, cfg: Any, *, commit_message: str) -> str:
    """Create the repository (if needed) and upload the final model's files; returns the repository id."""
    import huggingface_hub

    out = Path(out)
    files = files_to_push(out)
    try:
        repo = huggingface_hub.create_repo(repo_name(cfg), token=cfg.hub_token, private=cfg.hub_private_repo,
                                           repo_type="model", exist_ok=True)
        repo_id = getattr(repo, "repo_id", None) or repo_name(cfg)
        huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(out), repo_type="model", token=cfg.hub_token,
                                      commit_message=commit_message, allow_patterns=files)
    except Exception as exc:
        raise HubError(f"--push_to_hub: the upload of {out} to {repo_name(cfg)!r} failed ({type(exc).__name__}: "
                       f"{exc}); the model is saved in {out}; retry with huggingface-cli upload") from exc
    logger.info(f"pushed {len(files)} files of {out} to https://huggingface.co/{repo_id}")
    return repo_id


# ---------------------------------------------------------------------------------------------- the step
def finish_output(run: Any, *, recipe: str) -> str | None:
    """Merge, write the model card, push (main process; every process may call). Returns the repository id."""
    if not run.acc.is_main_process:
        return None
    cfg, out = run.cfg, Path(run.out)
    merged = bool(getattr(cfg, "merge_adapters", False))
    if merged:
        merge_adapters(out, cfg, run.processor)
    (out / "README.md").write_text(model_card(out, cfg, recipe=recipe, steps=run.state.step, merged=merged))
    if not getattr(cfg, "push_to_hub", False):
        return None
    return push_to_hub(out, cfg, commit_message=f"video-ktr {recipe}: {run.state.step} steps from {cfg.model_name_or_path}")
