"""The `video-ktr` command: a thin dispatcher to one module per sub-command (imported lazily).

A user mistake (a bad row, a nonsense setting, a used or locked output folder, unreadable media, a bad
checkpoint) ends with one line naming file, row, field or flag and exit status 1; ``--debug`` anywhere on
the command line (or ``VIDEO_KTR_DEBUG=1``) shows the full traceback instead. Other exceptions (bugs)
always show their traceback.
"""

from __future__ import annotations

import importlib
import os
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


# (module, class) of the errors that describe a user mistake; looked up only in modules already imported
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("video_ktr.data.rows", "DataError"),
    ("video_ktr.data.media", "MediaError"),
    ("video_ktr.utils.settings_check", "SettingsError"),
    ("video_ktr.utils.run_dir", "RunDirError"),
    ("video_ktr.training.checkpoint", "CheckpointError"),
    ("video_ktr.training.checkpoint_verify", "NonFiniteModelError"),
    ("video_ktr.evaluation.eval_config", "EvalError"),
    ("video_ktr.evaluation.tasks.base", "BenchmarkDataError"),
)


def is_user_error(exc: BaseException) -> bool:
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


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
    debug = "--debug" in argv or os.environ.get("VIDEO_KTR_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"video-ktr: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        result = module.main(rest)
    except Exception as exc:
        if debug or not is_user_error(exc):
            raise
        print(f"video-ktr {name}: error: {exc}\n(video-ktr {name} ... --debug shows the traceback)", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
