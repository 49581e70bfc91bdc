"""What an evaluation file records about how it was made (the protocol: model, data digest, frames,
prompt, decoding, versions), comparing two protocols, and writing a file atomically.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers

import video_ktr
from video_ktr.data.prompts import template_hash
from video_ktr.evaluation.eval_config import PROTOCOL_IGNORED, SCORING, EvalConfig
from video_ktr.evaluation.tasks.registry import get_benchmark

__all__ = ["build_protocol", "write_json_atomic"]


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON to a temporary file next to ``path``, fsync it, and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=1, ensure_ascii=False, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _data_digest(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".json", ".jsonl", ".parquet"))
    else:
        files = [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _versions(engine: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {
        "video_ktr": video_ktr.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
    }
    if engine == "vllm":
        try:  # vllm is optional (the vllm extra): imported only for a vLLM run
            import vllm

            out["vllm"] = getattr(vllm, "__version__", "unknown")
        except ImportError:
            out["vllm"] = None
    return out


def _model_id(name: str) -> str:
    p = Path(name)
    return str(p.resolve()) if p.exists() else name


def build_protocol(cfg: EvalConfig, *, num_rows: int, notes: list[str] | None = None,
                   command: str | None = None) -> dict[str, Any]:
    """Everything that determines the results of an evaluation (and, under ``runtime``, what does not)."""
    s = cfg.frame_settings()
    data = Path(cfg.data_file)
    return {
        "model": _model_id(cfg.model_name_or_path),
        "benchmark": get_benchmark(cfg.benchmark).name,
        "data_file": str(data.resolve()),
        "data_sha256": _data_digest(data),
        "media_root": str(Path(cfg.media_root or (data if data.is_dir() else data.parent)).resolve()),
        "num_rows": num_rows,
        "frames": {
            "fps": s.fps, "nframes": s.nframes, "min_frames": s.min_frames, "max_frames": s.max_frames,
            "min_pixels": s.min_pixels, "max_pixels": s.max_pixels, "total_pixels": s.total_pixels,
            "image_min_pixels": s.image_min_pixels, "image_max_pixels": s.image_max_pixels,
            "frame_rule": s.frame_rule,
        },
        "prompt": {"layout": cfg.prompt_layout, "template_hash": template_hash(cfg.prompt_layout),
                   "system_prompt": cfg.system_prompt},
        "decoding": cfg.decoding,
        "scoring": SCORING,
        "engine": cfg.engine,
        "dtype": cfg.dtype,
        "versions": _versions(cfg.engine),
        "notes": list(notes or []),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join(sys.argv),
        "runtime": {"batch_size": cfg.batch_size, "limit": cfg.limit, "device": cfg.device,
                    "on_bad_sample": cfg.on_bad_sample},
    }


def protocol_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old vs new`` for every differing protocol entry (ignoring :data:`PROTOCOL_IGNORED`)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in PROTOCOL_IGNORED:
            continue
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(protocol_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} (file) vs {b!r} (now)")
    return diffs


def clip_notes(rows: list[dict]) -> list[str]:
    """The protocol note for rows with clip bounds, which evaluation does not apply."""
    clipped = sum(1 for r in rows if "start" in (r.get("meta") or {}) and "end" in (r.get("meta") or {}))
    if not clipped:
        return []
    return [f"{clipped} rows carry clip bounds (meta start/end) that are NOT applied: frames are sampled from the whole video"]
