"""The `video-ktr` command: a thin dispatcher to one module per sub-command (imported lazily)."""

from __future__ import annotations

import importlib
import sys

from video_ktr import __version__

# name -> (module, one-line description). Each module has `main(argv: list[str]) -> int | None`.
COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny-model": ("video_ktr.commands.make_tiny_model", "build a small random Qwen2.5-VL / Qwen2-VL checkpoint locally"),
    "synth": ("video_ktr.commands.synth", "generate the synthetic video-reasoning data set (Video-R1 schema)"),
    "train": ("video_ktr.commands.train", "GRPO training with key-token reinforcement"),
    "sft": ("video_ktr.commands.sft", "supervised fine-tuning cold start on chain-of-thought rows"),
    "eval": ("video_ktr.commands.eval", "evaluate a model on a video reasoning benchmark"),
    "score": ("video_ktr.commands.score", "recompute predictions and metrics of a saved evaluation file"),
    "infer": ("video_ktr.commands.infer", "answer one question about a video or an image"),
    "data": ("video_ktr.commands.data", "prepare data: unpack Video-R1-data archives, check every row and media file"),
    "demo": ("video_ktr.commands.demo", "the main job on the embedded default: synth, SFT, eval, KTR, eval"),
    "estimate": ("video_ktr.commands.estimate", "dry-run memory and token estimate of a training config, per GPU"),
    "ablate": ("video_ktr.commands.ablate", "run GRPO, T-GRPO, entropy/visual/temporal-only, random mask and KTR from one start over several seeds"),
    "report": ("video_ktr.commands.report", "HTML report of training runs: curves, gradient diagnostics, selected tokens"),
}


def _usage() -> str:
    lines = ["usage: video-ktr COMMAND [options]   (video-ktr COMMAND --help for a command's options)", "", "commands:"]
    width = max(len(n) for n in COMMANDS)
    for name, (_, desc) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {desc}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] == "--version":

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"video-ktr: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
