"""From rows to model answers: validating rows, loading a batch's media, and the transformers engine
(:class:`HFEngine`; the vLLM engine is :mod:`video_ktr.model.vllm_engine`).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from video_ktr.core.rewards import normalize_problem_type
from video_ktr.data.media import FrameSettings, MediaError, load_image
from video_ktr.data.text_checks import DEFAULT_MAX_TEXT_CHARS, clean_text, text_problem
from video_ktr.data.video import FrameCache
from video_ktr.evaluation.eval_config import ROW_KEYS, SCHEMA_KEYS
from video_ktr.evaluation.tasks.registry import get_benchmark, media_candidates, resolve_media
from video_ktr.evaluation.tasks.subtitles import with_subtitles
from video_ktr.model.decode import rollout_decoder
from video_ktr.model.inputs import Media, encode_prompts, to_device
from video_ktr.model.loading import grouped_kv_attention, special_tokens, unwrap, use_grouped_kv_sdpa
from video_ktr.model.rollout import generate

__all__ = ["HFEngine", "load_media", "prepare_rows"]


def prepare_rows(rows: Sequence[dict], benchmark: str = "video_r1") -> list[dict]:
    """Rows in the loader's schema (``meta`` and ``uid``), from loaded rows or raw Video-R1 rows.

    Rows that already have ``uid`` and ``meta`` are kept (copied). For raw rows every non-schema key
    (e.g. the synthetic set's ``kind``) goes to ``meta`` and ``uid`` is ``"<benchmark>:<problem_id>"``;
    ``process`` is dropped. Raises ValueError naming the row for a missing field or a duplicate uid.
    """
    name = get_benchmark(benchmark).name
    out, seen = [], {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"row {i}: expected a dict, got {type(row).__name__}")
        for key in ("problem", "problem_type", "solution", "path"):
            if key not in row:
                raise ValueError(f"row {i}: field '{key}' missing (Video-R1 schema)")
        if "uid" in row and "meta" in row:
            r = dict(row)
            r["meta"] = dict(row["meta"] or {})
        else:
            meta = dict(row.get("meta") or {})
            meta.update({k: v for k, v in row.items() if k not in SCHEMA_KEYS})
            r = {k: row[k] for k in ROW_KEYS if k in row}
            r.setdefault("problem_id", i)
            r.setdefault("data_type", "video")
            r.setdefault("options", None)
            r.setdefault("data_source", "")
            r["meta"] = meta
            r["uid"] = str(row.get("uid") or f"{name}:{r['problem_id']}")
        try:
            r["problem_type"] = normalize_problem_type(r["problem_type"])
        except ValueError as exc:
            raise ValueError(f"row {i} ({r['uid']}): {exc}") from None
        if r["uid"] in seen:
            raise ValueError(f"row {i}: duplicate uid {r['uid']!r} (also row {seen[r['uid']]})")
        seen[r["uid"]] = i
        out.append(r)
    return out


def load_media(path: str | os.PathLike, data_type: str, settings: FrameSettings, cache: FrameCache | None = None) -> Any:
    """A :class:`video_ktr.model.inputs.Media` for a video or image file (raises MediaError)."""

    if data_type == "image":
        return Media(image=load_image(path, settings))
    if data_type != "video":
        raise MediaError(path, f"unknown data_type {data_type!r}", "rows must have data_type 'video' or 'image'")
    cache = cache if cache is not None else FrameCache(capacity=1)
    return Media(video=cache.get_or_load(path, settings))


def row_problem(row: dict, media_root: str | os.PathLike, path: Path, *, allow_outside: bool = False,
                special_tokens: str = "refuse") -> str | None:
    """Why a benchmark row cannot be evaluated before its media is decoded, or None: media outside the
    media root (absolute, '..' or an outward symlink; as train refuses them), or text that the tokenizer would
    choke on or read as control tokens (:mod:`video_ktr.data.text_checks`)."""
    if not allow_outside:
        root = Path(media_root).resolve()
        try:
            inside = path.resolve().is_relative_to(root)
        except (OSError, ValueError):
            inside = False
        if not inside:
            return (f"media path {str(row.get('path'))[:200]!r} leads outside --media_root {root} (absolute, '..' or "
                    "a symlink); refused (allow with --allow_outside_media_root)")
    texts = [("problem", row.get("problem"))] + [(f"option {k}", o) for k, o in enumerate(row.get("options") or [])]
    for name, value in texts:
        if isinstance(value, str):
            problem = text_problem(value, special_tokens=special_tokens, max_chars=DEFAULT_MAX_TEXT_CHARS)
            if problem is not None:
                return f"{name}: {problem[1]}"
    return None


def _writable(value: Any) -> Any:
    return value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value


def load_batch(batch: list[dict], media_root: str | os.PathLike, settings: FrameSettings,
                cache: FrameCache, *, allow_outside: bool = False, special_tokens: str = "refuse",
               ) -> tuple[list[tuple[dict, Any, str]], list[tuple[dict, str, str | None, Exception]]]:
    """The media of a batch of rows: ``(ready, failures)``.

    ``ready`` holds (row, media, path) in row order; ``failures`` (row, reason, path or None, exception)
    for media that cannot be found or decoded. It records nothing itself (it may run in the prefetch
    thread): the caller skips or raises when it takes the batch.
    """
    ready: list[tuple[dict, Any, str]] = []
    failures: list[tuple[dict, str, str | None, Exception]] = []
    for row in batch:
        path = None
        try:
            path = resolve_media(row, media_root)
            refused = row_problem(row, media_root, path, allow_outside=allow_outside, special_tokens=special_tokens)
            if refused is not None:  # the recorded row's text made writable (a lone surrogate as '\\ud800')
                shown = {**row, "problem": _writable(row.get("problem")),
                         "options": [_writable(o) for o in row["options"]] if row.get("options") else row.get("options")}
                failures.append((shown, refused, str(path), ValueError(refused)))
                continue
            if special_tokens == "escape":
                row = {**row, "problem": clean_text(str(row.get("problem", "")), "escape"),
                       "options": [clean_text(str(o), "escape") for o in row["options"]] if row.get("options") else row.get("options")}
            media = load_media(path, row.get("data_type", "video"), settings, cache)
            if (row.get("meta") or {}).get("with_subtitles") and media.video is not None:  # videomme_sub
                row = with_subtitles(row, media.video, path, media_root)
            ready.append((row, media, str(path)))
        except (FileNotFoundError, MediaError) as exc:
            if isinstance(exc, MediaError):
                reason = str(exc)
            else:
                tried = media_candidates(row, media_root)
                reason = (f"media file not found under {media_root} (tried {len(tried)} paths, "
                          f"first {tried[0] if tried else row.get('path')})")
            failures.append((row, reason, None if path is None else str(path), exc))
    return ready, failures


def takes_prepared(fn: Callable[..., Any]) -> bool:
    """Whether an engine's ``generate`` accepts ``prepared=`` (processor outputs made ahead in the prefetch thread)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "prepared" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class HFEngine:
    """Batched generation with transformers and :func:`video_ktr.model.rollout.generate` (one seed per row)."""

    name = "hf"

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        base = unwrap(model)
        self.special = special_tokens(base.config, self.tokenizer)
        param = next(base.parameters())
        self.device = param.device
        if grouped_kv_attention(self.device):  # the same numbers without per-head key/value copies
            use_grouped_kv_sdpa(base)
        self.dtype = param.dtype if param.dtype.is_floating_point else None
        self._prepare_processor = None
        # 'hf' on CPU (as 'auto'); on CUDA the static decoder, keeping its captured graph for batches of the same shape
        self.decoder = rollout_decoder("auto", self.device)

    def prepare(self, messages: list[list[dict]], media: list[Any]) -> dict[str, Any]:
        """The processor's inputs for a batch (CPU tensors), for :meth:`generate` ``prepared=``.

        Runs on its own copy of the processor, so that it may run in the prefetch thread while the main
        thread decodes text with the tokenizer (a fast tokenizer refuses calls from two threads at once).
        """

        if self._prepare_processor is None:
            self._prepare_processor = copy.deepcopy(self.processor)
        return encode_prompts(self._prepare_processor, messages, media)

    def generate(self, messages: list[list[dict]], media: list[Any], seeds: Sequence[int], *,
                 max_new_tokens: int, temperature: float, top_p: float, prepared: dict[str, Any] | None = None) -> list[str]:
        enc = prepared if prepared is not None else encode_prompts(self.processor, messages, media)
        inputs = to_device(enc, self.device, self.dtype)
        comps = generate(
            self.model, self.tokenizer, inputs, seeds=list(seeds), max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, eos_ids=self.special.eos_ids, pad_id=self.special.pad_id,
            suppress_ids=self.special.vision_ids, decoder=self.decoder,
        )
        return list(comps.texts)
