"""Benchmark evaluation (``video-ktr eval``) and re-scoring of a saved evaluation (``video-ktr score``).

``video-ktr eval --model_name_or_path M --benchmark NAME --data_file FILE --media_root DIR --output_dir OUT``
loads the benchmark with :func:`video_ktr.evaluation.tasks.registry.load_benchmark` (an official annotation file or
a Video-R1-schema file), answers every row with the model (batched; one random stream per row, seeded
by ``row_seed(seed, "eval", uid)``, so the answers do not depend on ``--batch_size``), scores the
answers with :func:`video_ktr.core.rewards.eval_score` and writes ``OUT/<benchmark>.json``::

    {"results": [ {...the loaded row (problem, options, solution, path, meta, uid, ...),
                   "media_path": resolved file or null,
                   "output": generated text or null,
                   "prediction": eval_extract(output) or null,
                   "score": eval_score(...) in [0, 1] (MRA for regression) or null,
                   "failed": null or the reason the sample could not be evaluated}, ...],
     "metrics": compute_metrics(benchmark, results) (+ "by_kind" when rows carry a "kind"),
     "protocol": {"model", "benchmark", "data_file", "data_sha256", "media_root", "num_rows",
                  "frames": {...frame settings...}, "prompt": {"layout", "template_hash", "system_prompt"},
                  "decoding": {"temperature", "top_p", "max_new_tokens", "greedy", "seed"},
                  "scoring", "engine", "dtype", "versions": {...}, "notes", "date", "command",
                  "runtime": {"batch_size", "limit", "device", ...}}}

Failed samples. A row whose media cannot be found or decoded is *recorded* as failed (``score`` null,
``failed`` the reason) and counted in ``metrics["num_failed"]`` / ``metrics["failures"]``: it is never
scored as a silent wrong answer. Accuracies are over scored rows; ``overall_all_rows`` counts failures
as 0. ``--on_bad_sample error`` stops at the first such row instead.

Resuming. The file is rewritten (temp file + rename, so it is never half-written) after every batch.
Started again with the same protocol (every protocol key except ``date``, ``command``, ``media_root``
and ``runtime``), the run skips the rows whose ``uid`` already has a result (``--retry_failed`` runs
failed rows again). A different protocol is refused with the differences listed; ``--overwrite``
starts afresh. ``--limit N`` evaluates the first N rows; results of other rows already in the file
are kept.

``video-ktr score FILE.json`` recomputes ``prediction`` and ``score`` from every saved ``output``
(failed rows stay failed), recomputes the metrics, rewrites the file atomically and prints the table.

In-process use (the demo): :func:`evaluate_rows` takes an already-loaded model and processor and a list
of Video-R1-schema rows (as loaded by ``load_benchmark`` or raw rows of a data file) and returns
``(results, metrics)``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from video_ktr.core.rewards import eval_extract, eval_score, normalize_problem_type
from video_ktr.data.media import FrameCache, FrameSettings, MediaError, load_image
from video_ktr.data.options import MediaArgs
from video_ktr.data.prompts import OPTION_LAYOUTS, build_messages, template_hash
from video_ktr.evaluation.tasks.base import MISSING
from video_ktr.evaluation.tasks.metrics import compute_metrics, format_table
from video_ktr.evaluation.tasks.registry import get_benchmark, load_benchmark, media_candidates, resolve_media
from video_ktr.model.sampling import row_seed
from video_ktr.utils.config import field, parse_args
from video_ktr.utils.prefetch import Prefetcher

__all__ = [
    "EvalConfig",
    "EvalError",
    "HFEngine",
    "ProtocolMismatchError",
    "build_protocol",
    "eval_metrics",
    "evaluate",
    "evaluate_rows",
    "load_media",
    "main",
    "prepare_rows",
    "rescore",
    "score_main",
    "write_json_atomic",
]

SCORING = (
    "video_r1: prediction = first <answer>...</answer> (stripped), else the whole output; multiple choice: "
    "exact match; numerical: Video-R1 rule (round 2); regression: MRA over 0.50..0.95 (strict <); "
    "OCR: 1-WER; free-form: mean ROUGE-1/2/L"
)
# protocol keys that may differ between the runs of one resumable evaluation
PROTOCOL_IGNORED = ("date", "command", "media_root", "runtime")
BAD_SAMPLE_CHOICES = ("skip", "error")
ENGINES = ("hf", "vllm")

_ROW_KEYS = ("problem_id", "problem", "data_type", "problem_type", "options", "solution", "path", "data_source")
_SCHEMA_KEYS = {*_ROW_KEYS, "process", "meta", "uid"}


class EvalError(RuntimeError):
    """An evaluation that cannot go on (a bad sample under ``--on_bad_sample error``, a bad file)."""


class ProtocolMismatchError(EvalError):
    """An existing results file was written with another protocol."""


# --------------------------------------------------------------------------------------------------
# options


@dataclass
class EvalConfig(MediaArgs):
    """Evaluate a model on a video reasoning benchmark (official or Video-R1-eval file) and write OUT/<benchmark>.json."""

    # the evaluation defaults of Video-R1 / Video-KTR: 16 frames of at most 256x28x28 pixels
    max_frames: int = field(16, help="Most frames sampled from a video (Video-R1/KTR evaluate with 16, 32 or 64).")
    max_pixels: int = field(256 * 28 * 28, help="Most pixels per video frame after resizing (evaluation: 256x28x28).")

    model_name_or_path: str = field("", help="Model to evaluate: a local directory or a hub id. [required]")
    benchmark: str = field("", help="Benchmark name (videoholmes, videomme, videommmu, mmvu, mvbench, tempcompass, vsibench, video_r1 for any Video-R1-schema file). [required]")
    data_file: str = field("", help="The benchmark's annotation file (official format or a Video-R1-eval eval_*.json), or folder for VideoMMMU/MVBench. [required]")
    media_root: str | None = field(None, help="Folder the rows' media paths are relative to (the benchmark's unpacked video folder); default: the data file's folder.")
    output_dir: str = field("", help="Where <benchmark>.json is written. [required]")

    temperature: float = field(0.1, help="Sampling temperature (Video-R1/KTR evaluation: 0.1).")
    top_p: float = field(0.001, help="Nucleus sampling mass (Video-R1/KTR evaluation: 0.001, i.e. nearly greedy).")
    greedy: bool = field(False, help="Greedy decoding (temperature 0); overrides --temperature and --top_p.")
    max_new_tokens: int = field(1024, help="Most tokens generated per answer.")
    batch_size: int = field(8, help="Prompts generated together (results do not depend on it).")
    seed: int = field(42, help="Seed of the per-row sampling streams (row seed = hash(seed, 'eval', uid)).")
    limit: int | None = field(None, help="Evaluate only the first N rows of the benchmark.")
    prompt_layout: str = field("eval", choices=list(OPTION_LAYOUTS), help="Multiple-choice layout: 'eval' (Video-R1 eval_bench.py: options joined by newlines) or 'train'.")
    system_prompt: str | None = field(None, help="A system turn to add; by default the chat template's default system turn is used.")

    engine: str = field("hf", choices=list(ENGINES), help="Generation engine: 'hf' (transformers, default) or 'vllm' (vLLM offline LLM; written against vLLM >= 0.10 but NOT exercised in this package's tests).")
    on_bad_sample: str = field("skip", choices=list(BAD_SAMPLE_CHOICES), help="A row whose media cannot be found or decoded: 'skip' records it as failed with the reason and counts it (never scored as a wrong answer); 'error' stops.")
    overwrite: bool = field(False, help="Replace an existing OUT/<benchmark>.json even if its protocol differs (default: resume it if the protocol matches, else refuse).")
    retry_failed: bool = field(False, help="When resuming, evaluate again the rows recorded as failed.")
    dtype: str = field("auto", choices=["auto", "float32", "bfloat16", "float16"], help="Model weights dtype ('auto': the checkpoint's).")
    device: str = field("auto", help="Device for the hf engine ('auto': cuda if available, else cpu).")
    attn_implementation: str | None = field("sdpa", help="Attention implementation for the hf engine (sdpa, eager, flash_attention_2).")
    trust_remote_code: bool = field(False, help="Allow custom model code from the hub.")
    tensor_parallel_size: int = field(1, help="vLLM only: GPUs to shard the model over.")
    gpu_memory_utilization: float = field(0.9, help="vLLM only: fraction of GPU memory vLLM may use.")
    max_model_len: int | None = field(None, help="vLLM only: context length to reserve (default: the model's).")
    progress: bool = field(True, help="Show a progress bar on stderr.")
    dataloader_prefetch: bool = field(True, help="Decode the next batch's media (and, with the hf engine, run the processor) in a background thread while this batch generates (same results).")

    def validate(self) -> None:
        for name in ("model_name_or_path", "benchmark", "data_file", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        get_benchmark(self.benchmark)
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {self.limit}")
        self.frame_settings()

    @property
    def decoding(self) -> dict[str, Any]:
        return decoding_settings(self.temperature, self.top_p, self.max_new_tokens, self.greedy, self.seed)


def decoding_settings(temperature: float, top_p: float, max_new_tokens: int, greedy: bool, seed: int) -> dict[str, Any]:
    """The effective decoding (greedy: temperature 0, top_p not used)."""
    return {
        "temperature": 0.0 if greedy else float(temperature),
        "top_p": None if greedy else float(top_p),
        "max_new_tokens": int(max_new_tokens),
        "greedy": bool(greedy),
        "seed": int(seed),
    }


# --------------------------------------------------------------------------------------------------
# rows, media, engines


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
            meta.update({k: v for k, v in row.items() if k not in _SCHEMA_KEYS})
            r = {k: row[k] for k in _ROW_KEYS if k in row}
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
    from video_ktr.model.inputs import Media

    if data_type == "image":
        return Media(image=load_image(path, settings))
    if data_type != "video":
        raise MediaError(path, f"unknown data_type {data_type!r}", "rows must have data_type 'video' or 'image'")
    cache = cache if cache is not None else FrameCache(capacity=1)
    return Media(video=cache.get_or_load(path, settings))


def _load_batch(batch: list[dict], media_root: str | os.PathLike, settings: FrameSettings,
                cache: FrameCache) -> tuple[list[tuple[dict, Any, str]], list[tuple[dict, str, str | None, Exception]]]:
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
            ready.append((row, load_media(path, row.get("data_type", "video"), settings, cache), str(path)))
        except (FileNotFoundError, MediaError) as exc:
            if isinstance(exc, MediaError):
                reason = str(exc)
            else:
                tried = media_candidates(row, media_root)
                reason = (f"media file not found under {media_root} (tried {len(tried)} paths, "
                          f"first {tried[0] if tried else row.get('path')})")
            failures.append((row, reason, None if path is None else str(path), exc))
    return ready, failures


def _takes_prepared(fn: Callable[..., Any]) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "prepared" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class HFEngine:
    """Batched generation with transformers and :func:`video_ktr.model.rollout.generate` (one seed per row)."""

    name = "hf"

    def __init__(self, model: Any, processor: Any) -> None:
        from video_ktr.model.loading import special_tokens, use_sdpa_gqa_on_cpu
        from video_ktr.model.rollout import unwrap

        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        base = unwrap(model)
        self.special = special_tokens(base.config, self.tokenizer)
        param = next(base.parameters())
        self.device = param.device
        use_sdpa_gqa_on_cpu(self.device)
        self.dtype = param.dtype if param.dtype.is_floating_point else None
        self._prepare_processor = None

    def prepare(self, messages: list[list[dict]], media: list[Any]) -> dict[str, Any]:
        """The processor's inputs for a batch (CPU tensors), for :meth:`generate` ``prepared=``.

        Runs on its own copy of the processor, so that it may run in the prefetch thread while the main
        thread decodes text with the tokenizer (a fast tokenizer refuses calls from two threads at once).
        """
        import copy

        from video_ktr.model.inputs import encode_prompts

        if self._prepare_processor is None:
            self._prepare_processor = copy.deepcopy(self.processor)
        return encode_prompts(self._prepare_processor, messages, media)

    def generate(self, messages: list[list[dict]], media: list[Any], seeds: Sequence[int], *,
                 max_new_tokens: int, temperature: float, top_p: float, prepared: dict[str, Any] | None = None) -> list[str]:
        from video_ktr.model.inputs import encode_prompts, to_device
        from video_ktr.model.rollout import generate

        enc = prepared if prepared is not None else encode_prompts(self.processor, messages, media)
        inputs = to_device(enc, self.device, self.dtype)
        comps = generate(
            self.model, self.tokenizer, inputs, seeds=list(seeds), max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, eos_ids=self.special.eos_ids, pad_id=self.special.pad_id,
            suppress_ids=self.special.vision_ids,
        )
        return list(comps.texts)


# --------------------------------------------------------------------------------------------------
# scoring and metrics


def _breakdown(results: list[dict], key: str) -> dict[str, dict]:
    """``{value: {"accuracy", "n", "n_failed"}}`` by ``meta[key]`` (same shape as the benchmark breakdowns)."""
    buckets: dict[str, tuple[list[float], list[int]]] = {}
    for r in results:
        value = (r.get("meta") or {}).get(key, r.get(key))
        name = MISSING if value is None or value == "" else str(value)
        scores, failed = buckets.setdefault(name, ([], [0]))
        if r.get("score") is None:
            failed[0] += 1
        else:
            scores.append(float(r["score"]))
    return {
        k: {"accuracy": (sum(s) / len(s)) if s else None, "n": len(s), "n_failed": f[0]}
        for k, (s, f) in sorted(buckets.items(), key=lambda kv: (kv[0] == MISSING, kv[0]))
    }


def eval_metrics(benchmark: str, results: list[dict]) -> dict:
    """:func:`video_ktr.evaluation.tasks.metrics.compute_metrics` of the results, plus ``by_kind`` when any row's
    ``meta`` has a ``kind`` (the synthetic set). Failure reasons come from each row's ``failed``."""
    metrics = compute_metrics(benchmark, [{**r, "error": r.get("failed")} for r in results])
    if any("kind" in (r.get("meta") or {}) for r in results):
        metrics["by_kind"] = _breakdown(results, "kind")
    return metrics


def score_output(row: dict, output: str) -> tuple[str, float]:
    """(prediction, score) of one output for one row."""
    return eval_extract(output), float(eval_score(output, row["solution"], row["problem_type"]))


def _failed(row: dict, reason: str, media_path: str | None = None) -> dict:
    return {**row, "media_path": media_path, "output": None, "prediction": None, "score": None, "failed": reason}


def rescore(payload: dict, benchmark: str | None = None) -> dict:
    """Recompute predictions, scores and metrics of a saved evaluation (failed rows stay failed)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise EvalError("not an evaluation file: expected an object with a 'results' list")
    name = benchmark or (payload.get("protocol") or {}).get("benchmark") or (payload.get("metrics") or {}).get("benchmark")
    if not name:
        raise EvalError("the file names no benchmark (protocol.benchmark); pass --benchmark")
    results = []
    for i, r in enumerate(payload["results"]):
        if not isinstance(r, dict) or "solution" not in r or "problem_type" not in r:
            raise EvalError(f"results[{i}]: not a result row (needs solution and problem_type)")
        r = dict(r)
        if r.get("failed"):
            r.update(prediction=None, score=None)
        elif not isinstance(r.get("output"), str):
            r.update(prediction=None, score=None, failed="no output saved for this row")
        else:
            r["prediction"], r["score"] = score_output(r, r["output"])
            r["failed"] = None
        results.append(r)
    out = dict(payload)
    out["results"] = results
    out["metrics"] = eval_metrics(name, results)
    return out


# --------------------------------------------------------------------------------------------------
# the evaluation loop


def evaluate_rows(
    model: Any,
    processor: Any,
    rows: Sequence[dict],
    media_root: str | os.PathLike,
    settings: FrameSettings | MediaArgs | None = None,
    *,
    benchmark: str = "video_r1",
    greedy: bool = False,
    temperature: float = 0.1,
    top_p: float = 0.001,
    max_new_tokens: int = 1024,
    batch_size: int = 8,
    seed: int = 42,
    prompt_layout: str = "eval",
    system_prompt: str | None = None,
    on_bad_sample: str = "skip",
    engine: Any = None,
    done: dict[str, dict] | None = None,
    on_batch: Callable[[dict[str, dict]], None] | None = None,
    progress: bool = False,
    prefetch: bool = True,
) -> tuple[list[dict], dict]:
    """Evaluate an already-loaded model on Video-R1-schema rows; returns ``(results, metrics)``.

    ``rows``: loaded benchmark rows or raw rows (see :func:`prepare_rows`; a ``kind`` key gives the
    ``by_kind`` breakdown). ``settings``: frame settings (default: 16 frames of at most 256x28x28
    pixels). ``engine``: an object with the :class:`HFEngine` ``generate`` signature (default: an
    HFEngine on ``model``/``processor``). ``done``: results by uid that are not generated again
    (resume). ``on_batch(results_by_uid)`` is called after every batch (the CLI writes its file there).
    ``prefetch``: the next batch's media decode (and, for an engine with ``prepare`` such as the hf one, go
    through the processor) in a background thread while this batch generates (the same results; a bad
    file is skipped or raised when its batch is taken, as without it).
    ``results`` follow the order of ``rows``.
    """
    if on_bad_sample not in BAD_SAMPLE_CHOICES:
        raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_CHOICES}, got {on_bad_sample!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(settings, MediaArgs):
        settings = settings.frame_settings()
    settings = settings or FrameSettings(max_frames=16, max_pixels=256 * 28 * 28)
    settings.validate()
    rows = prepare_rows(rows, benchmark)
    engine = engine if engine is not None else HFEngine(model, processor)
    dec = decoding_settings(temperature, top_p, max_new_tokens, greedy, seed)
    results: dict[str, dict] = dict(done or {})
    todo = [r for r in rows if r["uid"] not in results]
    cache = FrameCache(capacity=max(16, 2 * batch_size))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc=f"eval {get_benchmark(benchmark).name}",
                   unit="row", file=sys.stderr, dynamic_ncols=True)
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    # the processor runs ahead only for an engine whose generate() takes its result (a replaced or wrapped
    # generate() without ``prepared`` encodes its own inputs, as before)
    prepare = getattr(engine, "prepare", None) if _takes_prepared(engine.generate) else None

    def load(batch: list[dict]) -> tuple[list, list, list, Any]:
        """A batch's media, failures, messages and (engines with ``prepare``) processor inputs, or the
        exception the processor raised (reported with the batch's rows when the batch is taken)."""
        ready, failures = _load_batch(batch, media_root, settings, cache)
        messages = [build_messages(r["problem"], r["problem_type"], r.get("options"), r.get("data_type", "video"),
                                   layout=prompt_layout, system_prompt=system_prompt) for r, _, _ in ready]
        prepared: Any = None
        if ready and prepare is not None:
            try:
                prepared = prepare(messages, [m for _, m, _ in ready])
            except Exception as exc:  # noqa: BLE001 - raised below with the batch's rows
                prepared = exc
        return ready, failures, messages, prepared

    prefetcher = Prefetcher("video-ktr-eval-media") if prefetch else None
    try:
        for i, batch in enumerate(batches):
            ready, failures, messages, prepared = prefetcher.take(i, load, batch) if prefetcher else load(batch)
            if prefetcher is not None and i + 1 < len(batches):
                # the next batch's media decode (and go through the processor) while this one generates
                prefetcher.start(i + 1, load, batches[i + 1])
            for row, reason, path, exc in failures:
                if on_bad_sample == "error":
                    raise EvalError(f"row {row['uid']}: {reason} (use --on_bad_sample skip to record it as failed and go on)") from exc
                results[row["uid"]] = _failed(row, reason, path)
            if ready:
                seeds = [row_seed(seed, "eval", r["uid"]) for r, _, _ in ready]
                try:
                    if isinstance(prepared, Exception):
                        raise prepared
                    extra = {"prepared": prepared} if prepared is not None else {}
                    texts = engine.generate(messages, [m for _, m, _ in ready], seeds, max_new_tokens=dec["max_new_tokens"],
                                            temperature=dec["temperature"], top_p=dec["top_p"] or 1.0, **extra)
                except Exception as exc:
                    uids = ", ".join(r["uid"] for r, _, _ in ready)
                    raise EvalError(f"generation failed for rows {uids}: {type(exc).__name__}: {exc}") from exc
                for (row, _, path), text in zip(ready, texts, strict=True):
                    prediction, score = score_output(row, text)
                    results[row["uid"]] = {**row, "media_path": path, "output": text, "prediction": prediction,
                                           "score": score, "failed": None}
            if on_batch is not None:
                on_batch(results)
            if bar is not None:
                scored = [results[r["uid"]]["score"] for r in rows if results.get(r["uid"], {}).get("score") is not None]
                n_failed = sum(1 for r in rows if results.get(r["uid"], {}).get("failed"))
                bar.set_postfix(acc=f"{sum(scored) / len(scored):.3f}" if scored else "-", failed=n_failed)
                bar.update(len(batch))
    finally:
        if prefetcher is not None:
            prefetcher.close()
        if bar is not None:
            bar.close()
    ordered = [results[r["uid"]] for r in rows]
    return ordered, eval_metrics(benchmark, ordered)


# --------------------------------------------------------------------------------------------------
# files


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
    import torch
    import transformers

    import video_ktr

    out: dict[str, str | None] = {
        "video_ktr": video_ktr.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
    }
    if engine == "vllm":
        try:
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


def _clip_notes(rows: list[dict]) -> list[str]:
    clipped = sum(1 for r in rows if "start" in (r.get("meta") or {}) and "end" in (r.get("meta") or {}))
    if not clipped:
        return []
    return [f"{clipped} rows carry clip bounds (meta start/end) that are NOT applied: frames are sampled from the whole video"]


def evaluate(cfg: EvalConfig, *, command: str | None = None, engine: Any = None) -> dict:
    """Run ``video-ktr eval`` for a config: writes ``OUT/<benchmark>.json``, returns the metrics."""
    cfg.validate()
    spec = get_benchmark(cfg.benchmark)
    data = Path(cfg.data_file)
    if not data.exists():
        raise FileNotFoundError(f"--data_file {data} does not exist")
    media_root = Path(cfg.media_root) if cfg.media_root else (data if data.is_dir() else data.parent)
    if not media_root.is_dir():
        raise FileNotFoundError(f"--media_root {media_root} is not a folder")
    all_rows = load_benchmark(spec.name, data)
    rows = all_rows if cfg.limit is None else all_rows[: cfg.limit]
    notes = _clip_notes(all_rows)
    for note in notes:
        print(f"video-ktr eval: warning: {note}", file=sys.stderr)
    protocol = build_protocol(cfg, num_rows=len(all_rows), notes=notes, command=command)
    out_file = Path(cfg.output_dir) / f"{spec.name}.json"
    # a run killed while flushing leaves the temporary file of write_json_atomic beside the results
    for stale in out_file.parent.glob(f".{out_file.name}.*.tmp"):
        stale.unlink(missing_ok=True)

    done: dict[str, dict] = {}
    if out_file.exists() and not cfg.overwrite:
        try:
            old = json.loads(out_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise EvalError(f"{out_file} exists but is not valid JSON ({exc}); move it away or pass --overwrite true") from None
        diffs = protocol_differences(old.get("protocol") or {}, protocol)
        if diffs:
            raise ProtocolMismatchError(
                f"{out_file} holds results of a different protocol:\n  " + "\n  ".join(diffs)
                + "\nrun with --overwrite true to replace it, or choose another --output_dir"
            )
        done = {r["uid"]: r for r in old.get("results", []) if isinstance(r, dict) and "uid" in r}
        if cfg.retry_failed:
            done = {u: r for u, r in done.items() if not r.get("failed")}
        n_resume = sum(1 for r in rows if r["uid"] in done)
        if n_resume:
            print(f"video-ktr eval: resuming {out_file}: {n_resume} of {len(rows)} rows already done", file=sys.stderr)

    order = {r["uid"]: i for i, r in enumerate(all_rows)}

    def merged(by_uid: dict[str, dict]) -> list[dict]:
        return sorted((r for u, r in by_uid.items() if u in order), key=lambda r: order[r["uid"]])

    def flush(by_uid: dict[str, dict]) -> None:
        results = merged(by_uid)
        write_json_atomic(out_file, {"results": results, "metrics": eval_metrics(spec.name, results), "protocol": protocol})

    model = processor = None
    if engine is None:
        if cfg.engine == "vllm":
            from video_ktr.model.vllm_engine import VLLMEngine

            engine = VLLMEngine.from_pretrained(
                cfg.model_name_or_path, dtype=cfg.dtype, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code,
                tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
                max_model_len=cfg.max_model_len,
            )
        else:
            from video_ktr.model.loading import load_model, load_processor

            processor = load_processor(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
            model = load_model(cfg.model_name_or_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                               trust_remote_code=cfg.trust_remote_code, device=pick_device(cfg.device))
            model.eval()
            engine = HFEngine(model, processor)

    dec = cfg.decoding
    by_uid = dict(done)

    def on_batch(results: dict[str, dict]) -> None:
        by_uid.update(results)
        flush(by_uid)

    evaluate_rows(
        model, processor, rows, media_root, cfg.frame_settings(), benchmark=spec.name, greedy=cfg.greedy,
        temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=dec["max_new_tokens"], batch_size=cfg.batch_size,
        seed=cfg.seed, prompt_layout=cfg.prompt_layout, system_prompt=cfg.system_prompt,
        on_bad_sample=cfg.on_bad_sample, engine=engine, done=by_uid, on_batch=on_batch, progress=cfg.progress,
        prefetch=cfg.dataloader_prefetch,
    )
    results = merged(by_uid)
    metrics = eval_metrics(spec.name, results)
    write_json_atomic(out_file, {"results": results, "metrics": metrics, "protocol": protocol})
    print(format_table(metrics))
    print(f"\nwrote {out_file}")
    if results and metrics["num_failed"] == len(results):
        print(f"video-ktr eval: warning: every row failed; check --media_root ({media_root})", file=sys.stderr)
    return metrics


# --------------------------------------------------------------------------------------------------
# commands


def _error(prog: str, exc: BaseException) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """``video-ktr eval``."""
    from video_ktr.evaluation.tasks.base import BenchmarkDataError
    from video_ktr.model.vllm_engine import VLLMUnavailableError

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(EvalConfig, argv, prog="video-ktr eval")
    try:
        evaluate(cfg, command=shlex.join(["video-ktr", "eval", *argv]))
    except (EvalError, FileNotFoundError, BenchmarkDataError, VLLMUnavailableError) as exc:
        return _error("video-ktr eval", exc)
    return 0


def score_main(argv: list[str] | None = None) -> int:
    """``video-ktr score FILE.json [FILE.json ...]``: recompute predictions, scores and metrics."""
    parser = argparse.ArgumentParser(
        prog="video-ktr score",
        description="Recompute prediction and score of every saved output (failed rows stay failed) and the "
        "metrics of evaluation files written by `video-ktr eval`; rewrite them atomically and print the tables.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE.json", help="Evaluation file(s) to re-score.")
    parser.add_argument("--benchmark", default=None, help="Benchmark whose metrics to compute (default: the file's protocol.benchmark).")
    parser.add_argument("--dry_run", action="store_true", help="Print the tables without rewriting the files.")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    for name in args.files:
        path = Path(name)
        try:
            if not path.is_file():
                raise EvalError(f"{path} does not exist")
            try:
                payload = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise EvalError(f"{path} is not valid JSON ({exc})") from None
            new = rescore(payload, args.benchmark)
        except (EvalError, ValueError) as exc:
            return _error("video-ktr score", exc)
        if not args.dry_run:
            write_json_atomic(path, new)
        if len(args.files) > 1:
            print(f"== {path}")
        print(format_table(new["metrics"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
