"""`video-ktr estimate`: memory and token estimate of a training config (video_ktr.analysis.estimate.estimate)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from video_ktr.analysis.estimate import estimate, format_report, load_train_config
from video_ktr.analysis.estimate_launch import resolve_launch
from video_ktr.analysis.model_size import resolve_arch

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="video-ktr estimate",
        description="Dry-run memory and token estimate of a training config, per GPU. Any further --option VALUE "
        "pairs override the training config (e.g. --gradient_checkpointing true --max_frames 32).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--config", required=True, help="The training YAML (the one given to video-ktr train).")
    ap.add_argument("--gpu_memory_gb", type=float, default=80.0, help="Memory per GPU in GiB (an '80 GB' card has 80 GiB).")
    ap.add_argument("--accelerate_config", default=None, metavar="YAML",
                    help="The accelerate config the training is launched with (accelerate launch --config_file): the "
                    "sharding (DeepSpeed ZeRO stage, FSDP), CPU offload, mixed precision and process count come from it. "
                    "--num_gpus and --zero_stage given here win over the file, as accelerate launch's own flags do.")
    ap.add_argument("--num_gpus", type=int, default=None,
                    help="GPUs (processes) training together (default: the accelerate config's num_processes, else 8).")
    ap.add_argument("--zero_stage", type=int, default=None, choices=[0, 1, 2, 3],
                    help="DeepSpeed ZeRO stage: 0 = plain DDP; 1 shards optimizer states, 2 also gradients, 3 also weights "
                    "(default: the accelerate config's, else 0).")
    ap.add_argument("--model_config", default=None, help="A model directory or config.json to read the architecture from.")
    ap.add_argument("--video_seconds", type=float, default=60.0, help="Length of the videos (frames follow the fps settings).")
    ap.add_argument("--video_size", default=None, metavar="HxW",
                    help="Source frame size, resized like the trainer does; default: the worst case within max_pixels.")
    ap.add_argument("--prompt_text_tokens", type=int, default=200, help="Text tokens of a prompt (system turn, question, instructions).")
    ap.add_argument("--completion_tokens", type=int, default=None, help="Completion length to assume (default: max_completion_length).")
    ap.add_argument("--headroom", type=float, default=0.10, help="Fraction of GPU memory kept free for the CUDA context and fragmentation.")
    ap.add_argument("--mixed_precision", default="auto", choices=["auto", "yes", "no"],
                    help="fp32 master weights + fp32 AdamW states (auto: with ZeRO >= 1 and 16-bit weights, as DeepSpeed bf16 does).")
    ap.add_argument("--json", action="store_true", help="Print a machine-readable JSON dict instead of the table.")
    return ap


def _overrides(rest: list[str], ap: argparse.ArgumentParser) -> dict[str, Any]:
    out: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--"):
            ap.error(f"unexpected argument {tok!r}")
        key, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                ap.error(f"--{key} needs a value")
            value = rest[i + 1]
            i += 1
        out[key] = value
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args, rest = ap.parse_known_args(argv)
    try:
        cfg = load_train_config(args.config, _overrides(rest, ap))
        arch = resolve_arch(cfg.model_name_or_path, args.model_config)
        size = None
        if args.video_size:
            m = re.fullmatch(r"(\d+)[xX](\d+)", args.video_size)
            if not m:
                ap.error(f"--video_size must be HxW, got {args.video_size!r}")
            size = (int(m.group(1)), int(m.group(2)))
        launch, num_gpus = resolve_launch(args.accelerate_config, args.zero_stage, args.num_gpus)
        result = estimate(cfg, arch, gpu_memory_gb=args.gpu_memory_gb, num_gpus=num_gpus, launch=launch,
                          video_seconds=args.video_seconds, prompt_text_tokens=args.prompt_text_tokens,
                          headroom=args.headroom, mixed_precision=args.mixed_precision, video_size=size,
                          completion_tokens=args.completion_tokens)
    except (ValueError, FileNotFoundError) as exc:
        print(f"video-ktr estimate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_report(result, args.config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
