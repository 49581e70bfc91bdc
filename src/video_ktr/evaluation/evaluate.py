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

``video-ktr score FILE.json`` (:mod:`video_ktr.commands.score`) recomputes ``prediction`` and ``score`` from every saved ``output``
(failed rows stay failed), recomputes the metrics, rewrites the file atomically and prints the table.

In-process use (the demo): :func:`evaluate_rows` takes an already-loaded model and processor and a list
of Video-R1-schema rows (as loaded by ``load_benchmark`` or raw rows of a data file) and returns
``(results, metrics)``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from video_ktr.data.media import FrameSettings
from video_ktr.data.options import MediaArgs
from video_ktr.data.prompts import build_messages
from video_ktr.data.video import FrameCache
from video_ktr.evaluation.engine import HFEngine, load_batch, pick_device, prepare_rows, takes_prepared
from video_ktr.evaluation.eval_config import (
    BAD_SAMPLE_CHOICES,
    EvalConfig,
    EvalError,
    ProtocolMismatchError,
    decoding_settings,
)
from video_ktr.evaluation.grading import eval_metrics, failed_row, score_output
from video_ktr.evaluation.lmms_export import write_lmms_eval
from video_ktr.evaluation.protocol import build_protocol, clip_notes, protocol_differences, write_json_atomic
from video_ktr.evaluation.tasks.metrics import format_table
from video_ktr.evaluation.tasks.registry import get_benchmark, load_benchmark
from video_ktr.model.adapters import frames_for
from video_ktr.model.loading import load_model, load_processor
from video_ktr.model.sampling import row_seed
from video_ktr.model.vllm_engine import VLLMEngine
from video_ktr.utils.logs import bars_disabled, get_logger, setup_logging
from video_ktr.utils.prefetch import Prefetcher

logger = get_logger(__name__)

__all__ = ["evaluate", "evaluate_rows"]


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
    progress_desc: str | None = None,
    prefetch: bool = True,
    allow_outside_media_root: bool = False,
    special_tokens: str = "refuse",
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
    # the family's side factor from the processor, or the engine's own (the vllm engine loads one; processor is None)
    settings = frames_for(processor if processor is not None else getattr(engine, "processor", None),
                          settings or FrameSettings(max_frames=16, max_pixels=256 * 28 * 28))
    settings.validate()
    rows = prepare_rows(rows, benchmark)
    engine = engine if engine is not None else HFEngine(model, processor)
    dec = decoding_settings(temperature, top_p, max_new_tokens, greedy, seed)
    results: dict[str, dict] = dict(done or {})
    todo = [r for r in rows if r["uid"] not in results]
    cache = FrameCache(capacity=max(16, 2 * batch_size))

    bar = None
    if progress:
        bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc=progress_desc or f"eval {get_benchmark(benchmark).name}",
                   unit="row", file=sys.stderr, dynamic_ncols=True, disable=bars_disabled())
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    # the processor runs ahead only for an engine whose generate() takes its result (a replaced or wrapped
    # generate() without ``prepared`` encodes its own inputs, as before)
    prepare = getattr(engine, "prepare", None) if takes_prepared(engine.generate) else None

    def load(batch: list[dict]) -> tuple[list, list, list, Any]:
        """A batch's media, failures, messages and (engines with ``prepare``) processor inputs, or the
        exception the processor raised (reported with the batch's rows when the batch is taken)."""
        ready, failures = load_batch(batch, media_root, settings, cache, allow_outside=allow_outside_media_root,
                                     special_tokens=special_tokens)
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
                results[row["uid"]] = failed_row(row, reason, path)
            if ready:
                seeds = [row_seed(seed, "eval", r["uid"]) for r, _, _ in ready]
                gen = dict(max_new_tokens=dec["max_new_tokens"], temperature=dec["temperature"], top_p=dec["top_p"] or 1.0)
                try:
                    if isinstance(prepared, Exception):
                        raise prepared
                    extra = {"prepared": prepared} if prepared is not None else {}
                    texts = engine.generate(messages, [m for _, m, _ in ready], seeds, **gen, **extra)
                except Exception as exc:
                    uids = ", ".join(r["uid"] for r, _, _ in ready)
                    if on_bad_sample == "error":
                        raise EvalError(f"generation failed for rows {uids}: {type(exc).__name__}: {exc}") from exc
                    # skip: the batch again row by row, so one bad row is recorded as failed and the rest answered
                    texts = []
                    for k, (_, media, _) in enumerate(ready):
                        try:
                            texts.append(engine.generate([messages[k]], [media], [seeds[k]], **gen)[0])
                        except Exception as row_exc:  # noqa: BLE001 - recorded as the row's failure
                            texts.append(row_exc)
                for (row, _, path), text in zip(ready, texts, strict=True):
                    if isinstance(text, Exception):
                        results[row["uid"]] = failed_row(row, f"generation failed: {type(text).__name__}: {text}", path)
                        continue
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


def evaluate(cfg: EvalConfig, *, command: str | None = None, engine: Any = None) -> dict:
    """Run ``video-ktr eval`` for a config: writes ``OUT/<benchmark>.json``, returns the metrics."""
    cfg.validate()
    setup_logging(cfg)  # --log_level / --log_level_replica
    spec = get_benchmark(cfg.benchmark)
    data = Path(cfg.data_file)
    if not data.exists():
        raise FileNotFoundError(f"--data_file {data} does not exist")
    media_root = Path(cfg.media_root) if cfg.media_root else (data if data.is_dir() else data.parent)
    if not media_root.is_dir():
        raise FileNotFoundError(f"--media_root {media_root} is not a folder")
    all_rows = load_benchmark(spec.name, data)
    rows = all_rows if cfg.limit is None else all_rows[: cfg.limit]
    notes = clip_notes(all_rows)
    for note in notes:
        logger.warning(f"video-ktr eval: warning: {note}")
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
            logger.info(f"video-ktr eval: resuming {out_file}: {n_resume} of {len(rows)} rows already done")

    order = {r["uid"]: i for i, r in enumerate(all_rows)}

    def merged(by_uid: dict[str, dict]) -> list[dict]:
        return sorted((r for u, r in by_uid.items() if u in order), key=lambda r: order[r["uid"]])

    def flush(by_uid: dict[str, dict]) -> None:
        results = merged(by_uid)
        write_json_atomic(out_file, {"results": results, "metrics": eval_metrics(spec.name, results), "protocol": protocol})

    model = processor = None
    if engine is None:
        if cfg.engine == "vllm":

            engine = VLLMEngine.from_pretrained(
                cfg.model_name_or_path, dtype=cfg.dtype, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code,
                tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
                max_model_len=cfg.max_model_len,
            )
        else:

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
        on_bad_sample=cfg.on_bad_sample, engine=engine, done=by_uid, on_batch=on_batch, progress=cfg.progress and not bars_disabled(cfg),
        prefetch=cfg.dataloader_prefetch, allow_outside_media_root=cfg.allow_outside_media_root,
        special_tokens=cfg.special_tokens,
    )
    results = merged(by_uid)
    metrics = eval_metrics(spec.name, results)
    write_json_atomic(out_file, {"results": results, "metrics": metrics, "protocol": protocol})
    lmms_results, lmms_samples = write_lmms_eval(cfg.output_dir, spec.name, results, metrics, protocol,
                                                 model_name=cfg.model_name_or_path)
    print(format_table(metrics))
    print(f"\nwrote {out_file}\nwrote {lmms_results} and {lmms_samples.name} (lmms-eval's layout)")
    if results and metrics["num_failed"] == len(results):
        logger.warning(f"video-ktr eval: warning: every row failed; check --media_root ({media_root})")
    return metrics


# --------------------------------------------------------------------------------------------------
# commands
