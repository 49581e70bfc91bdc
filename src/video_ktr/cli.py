"""The `video-ktr` command: a thin dispatcher to one module per sub-command (imported lazily)."""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line description). Each module has `main(argv: list[str]) -> int | None`.
COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny-model": ("video_ktr.tiny", "build a small random Qwen2.5-VL / Qwen2-VL checkpoint locally"),
    "synth": ("video_ktr.synth", "generate the synthetic video-reasoning data set (Video-R1 schema)"),
    "train": ("video_ktr.train", "GRPO training with key-token reinforcement"),
    "sft": ("video_ktr.sft", "supervised fine-tuning cold start on chain-of-thought rows"),
    "eval": ("video_ktr.evaluate", "evaluate a model on a video reasoning benchmark"),
    "score": ("video_ktr.evaluate", "recompute predictions and metrics of a saved evaluation file"),
    "infer": ("video_ktr.infer", "answer one question about a video or an image"),
    "data": ("video_ktr.data_tools", "prepare data: unpack Video-R1-data archives, check every row and media file"),
    "demo": ("video_ktr.demo", "the main job on the embedded default: synth, SFT, eval, KTR, eval"),
    "estimate": ("video_ktr.estimate", "dry-run memory and token estimate of a training config, per GPU"),
    "ablate": ("video_ktr.ablate", "run GRPO, T-GRPO, entropy/visual/temporal-only, random mask and KTR from one start over several seeds"),
    "report": ("video_ktr.report", "HTML report of training runs: curves, gradient diagnostics, selected tokens"),
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
        from video_ktr import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"video-ktr: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    entry = getattr(module, "score_main" if name == "score" else "main")
    result = entry(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
