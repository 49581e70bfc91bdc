"""`video-ktr infer`: answer one question about a video or an image (video_ktr.evaluation.inference.run)."""

from __future__ import annotations

import sys

from video_ktr.evaluation.inference import PROG, InferError, parse_infer_args, run
from video_ktr.model.vllm_engine import VLLMUnavailableError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``video-ktr infer``: prints ``Reasoning:``, ``Answer: ...`` (and ``Raw output:`` with --raw)."""
    cfg = parse_infer_args(list(sys.argv[1:] if argv is None else argv))
    try:
        out = run(cfg)
    except (InferError, VLLMUnavailableError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print("Reasoning:")
    print(out["reasoning"] if out["reasoning"] else "(no <think> block in the output)")
    print()
    print(f"Answer: {out['answer']}")
    if cfg.raw:
        print()
        print("Raw output:")
        print(out["output"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
