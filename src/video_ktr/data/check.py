"""Data preparation, ``video-ktr data check DATASET``.

``check`` -- validate every row and open every media file
    Every row goes through :func:`video_ktr.data.rows.validate_row` (media must exist under ``--media_root``),
    then every distinct media file is opened in worker processes exactly as training does
    (:func:`video_ktr.data.media.load_video` with the frame options / :func:`video_ktr.data.media.load_image`).
    The summary counts every row (good + bad = rows in the file) by reason with a few examples naming
    file, row and field; the exit status is 1 if any row is bad.  ``--write_clean FILE`` writes the good
    rows, unchanged and in order, in the input's format (JSON list or JSONL), plus
    ``FILE.rejected.jsonl`` with one line per rejected row (row index, reason, field, message).
    With ``--model_name_or_path M --max_prompt_length N`` each good row's prompt is also made and tokenised
    by M's processor as GRPO training does it, so a prompt long only by its visual tokens is named here
    first (``prompt_too_long``, the check the command passes in as ``row_check``).
    In a JSONL file a line that is not valid JSON is one bad row (``bad_json``) and the other lines are
    still checked; a JSON list that does not parse cannot be split into rows and fails as a whole.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from video_ktr.data.media import FrameSettings, MediaError, load_image
from video_ktr.data.options import MediaArgs
from video_ktr.data.prompts import OPTION_LAYOUTS
from video_ktr.data.rows import DataError, Sample, parse_json_list, read_data_text, validate_row
from video_ktr.data.text_checks import SPECIAL_TOKEN_POLICIES, text_char_limit
from video_ktr.utils.config import field


@dataclass
class CheckArgs(MediaArgs):
    """Validate every row of a Video-R1-schema data set and open every media file it names.

    Usage: video-ktr data check DATASET --media_root DIR [--workers N] [--write_clean FILE] [frame options].
    """

    dataset: str = field(help="The data file, JSON list or JSONL (may be given as the first positional argument).", kw_only=True)
    media_root: str | None = field(None, help="Folder that the rows' 'path' fields are relative to (default: the data file's folder).")
    workers: int | None = field(None, help="Worker processes that open media files (default: min(4, CPU count)); 0 opens them in this process.")
    write_clean: str | None = field(None, help="Write the good rows (same format as the input) to this file, and the rejected ones to FILE.rejected.jsonl.")
    open_media: bool = field(True, help="Decode every video / open every image; false only checks the rows and that the files exist.")
    allow_outside_media_root: bool = field(False, help="Accept media paths that are absolute or lead outside --media_root.")
    require_process: bool = field(False, help="Rows must carry the reasoning in 'process' (SFT data).")
    examples: int = field(3, help="Examples shown per reason in the summary.")
    special_tokens: str = field("refuse", help="Control tokens such as <|im_start|> or <|video_pad|> in the text: refuse the row, or escape them (as train/sft/eval do with the same option).")
    max_prompt_length: int | None = field(None, help="The training --max_prompt_length: a text field over 64 characters per token is refused before tokenising (default cap: 200,000 characters); with --model_name_or_path each prompt's tokens are counted exactly.")
    model_name_or_path: str | None = field(None, help="The model to train: its processor makes and tokenises each good row's prompt as GRPO training does (visual tokens included) and rows over --max_prompt_length are refused (prompt_too_long), with the file, row and field training would name. Needs --max_prompt_length; decodes each media file again in this process.")
    prompt_layout: str = field("train", choices=list(OPTION_LAYOUTS), help="The training --prompt_layout (with --model_name_or_path).")
    system_prompt: str | None = field(None, help="The training --system_prompt (with --model_name_or_path).")
    trust_remote_code: bool = field(False, help="Allow custom processor code from the hub (with --model_name_or_path).")

    def validate(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise ValueError("field 'workers' must be >= 0")
        if self.examples < 0:
            raise ValueError("field 'examples' must be >= 0")
        if self.special_tokens not in SPECIAL_TOKEN_POLICIES:
            raise ValueError(f"field 'special_tokens' must be one of {SPECIAL_TOKEN_POLICIES}, got {self.special_tokens!r}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"field 'max_prompt_length' must be >= 1, got {self.max_prompt_length}")
        if self.model_name_or_path and self.max_prompt_length is None:
            raise ValueError("--model_name_or_path counts prompt tokens against --max_prompt_length: give it too")


@dataclass
class Rejection:
    """One bad row: 0-based ``row`` index (as in error messages), reason, field and message."""

    row: int
    reason: str
    field: str | None
    message: str
    line: int | None = None  # JSONL line number
    problem_id: Any = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"row": self.row}
        if self.line is not None:
            out["line"] = self.line
        if self.problem_id is not None:
            out["problem_id"] = self.problem_id
        out.update(reason=self.reason, field=self.field, message=self.message)
        return out


@dataclass
class CheckResult:
    file: str
    format: str  # "json" | "jsonl"
    rows: list[Any]  # every row as read (None for a JSONL line that is not JSON)
    rejected: list[Rejection]
    media_files: int = 0  # distinct media files opened
    media_bad: int = 0

    @property
    def total(self) -> int:
        return len(self.rows)

    @property
    def good_rows(self) -> list[Any]:
        bad = {r.row for r in self.rejected}
        return [row for i, row in enumerate(self.rows) if i not in bad]

    @property
    def ok(self) -> bool:
        return not self.rejected

    def counts(self) -> Counter:
        return Counter(r.reason for r in self.rejected)

    def summary(self, examples: int = 3) -> str:
        n_bad = len({r.row for r in self.rejected})
        lines = [f"{self.file}: {self.total} row(s): {self.total - n_bad} good, {n_bad} bad"]
        if self.media_files:
            lines.append(f"media: {self.media_files} distinct file(s) opened, {self.media_bad} unusable")
        by_reason: dict[str, list[Rejection]] = defaultdict(list)
        for r in self.rejected:
            by_reason[r.reason].append(r)
        if by_reason:
            lines.append("bad rows by reason:")
        for reason, n in self.counts().most_common():
            lines.append(f"  {reason}: {n}")
            for r in by_reason[reason][:examples]:
                lines.append(f"    - {r.message}")
        return "\n".join(lines)


def _read_for_check(path: Path) -> tuple[str, list[Any], list[Rejection], list[int | None]]:
    """(format, rows, rejections for unparsable JSONL lines, line numbers); read as rows.read_rows reads, but a
    JSONL line that is not JSON is one rejection (its row None) instead of the end of the check."""
    text, jsonl = read_data_text(path)
    if jsonl:
        rows: list[Any] = []
        rejected: list[Rejection] = []
        linenos: list[int | None] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as exc:
                msg = getattr(exc, "msg", str(exc))
                err = DataError(path, len(rows), None, f"line {lineno} is not valid JSON ({msg})", "bad_json")
                rejected.append(Rejection(len(rows), err.reason, None, str(err), line=lineno))
                rows.append(None)
            linenos.append(lineno)
        return "jsonl", rows, rejected, linenos
    data = parse_json_list(path, text)
    return "json", data, [], [None] * len(data)


def _media_reason(err: BaseException, data_type: str) -> str:
    text = str(getattr(err, "reason", "") or err)
    if "is a still image" in text or "is a video, not an image" in text:
        return "media_wrong_type"
    if "is empty" in text:
        return "media_empty"
    return "video_unreadable" if data_type == "video" else "image_unreadable"


def open_media(path: str, data_type: str, settings: Any) -> tuple[str, str] | None:
    """Open one media file as training does; None if usable, else (reason, message).  Never raises."""
    # imported here on purpose: the decoder module pulls in torch and torchvision, which `data check
    # --open_media false` and `data unpack` (same command module) never need; the forkserver workers
    # preload it once (_pool), so each worker pays the import once, not per file
    from video_ktr.data.video import load_video

    try:
        if data_type == "video":
            load_video(path, settings)
        else:
            load_image(path, settings)
    except MediaError as err:
        return _media_reason(err, data_type), str(err)
    except Exception as err:  # a decoder bug must not stop the check of the other files
        return "media_error", f"cannot use media file {path!r}: {type(err).__name__}: {err}"
    return None


Opener = Callable[[str, str, Any], "tuple[str, str] | None"]


def _open_batch(batch: list[tuple[str, str]], settings: Any, opener: Opener) -> list[tuple[str, str] | None]:
    return [opener(path, data_type, settings) for path, data_type in batch]


def _worker_init() -> None:
    try:
        import torch

        torch.set_num_threads(1)  # one process per core; do not oversubscribe
    except Exception:  # pragma: no cover - torch is a dependency, but this is only a tuning knob
        pass


def _pool(workers: int) -> ProcessPoolExecutor:
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        # not fork: the parent may hold threads (tqdm, torch); the server preloads the decoders once
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["video_ktr.data.video"])
    else:  # pragma: no cover - Windows / macOS without forkserver
        ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)


def _run_media(
    items: list[tuple[str, str]], settings: Any, workers: int, opener: Opener,
    update: Callable[[int], None], batch_size: int = 8,
) -> list[tuple[str, str] | None]:
    """Open ``items`` [(path, data_type)]; one result per item, in order.

    A worker that dies (a decoder crash, out of memory) breaks the pool; the files not done yet are then
    opened one at a time in a fresh single-worker pool, so the file that kills it is identified and
    reported as ``media_crashed`` instead of aborting the check.
    """
    results: list[tuple[str, str] | None] = [None] * len(items)
    done = [False] * len(items)
    if workers == 0:
        for i, (path, data_type) in enumerate(items):
            results[i] = opener(path, data_type, settings)
            update(1)
        return results
    batches = [list(range(s, min(s + batch_size, len(items)))) for s in range(0, len(items), batch_size)]
    broken = False
    with _pool(workers) as pool:
        futures = {}
        pending_batches = iter(batches)
        # keep at most 2 batches per worker in flight (bounded memory for 260k rows)
        def fill() -> None:
            while len(futures) < 2 * workers:
                idx = next(pending_batches, None)
                if idx is None:
                    return
                futures[pool.submit(_open_batch, [items[i] for i in idx], settings, opener)] = idx

        fill()
        while futures:
            finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
            for fut in finished:
                idx = futures.pop(fut)
                try:
                    out = fut.result()
                except BrokenProcessPool:
                    broken = True
                    continue
                for i, r in zip(idx, out):
                    results[i], done[i] = r, True
                update(len(idx))
            if broken:
                for fut in futures:
                    fut.cancel()
                futures.clear()
                break
            fill()
    if broken:
        left = [i for i in range(len(items)) if not done[i]]
        pool = _pool(1)
        try:
            for i in left:
                path, data_type = items[i]
                try:
                    results[i] = pool.submit(_open_batch, [items[i]], settings, opener).result()[0]
                except BrokenProcessPool:
                    results[i] = ("media_crashed", f"cannot use media file {path!r}: the worker process opening "
                                  "it died (decoder crash or out of memory)")
                    pool.shutdown(wait=True)
                    pool = _pool(1)
                update(1)
        finally:
            pool.shutdown(wait=True)
    return results


def check_dataset(
    dataset: str | os.PathLike,
    media_root: str | os.PathLike | None = None,
    *,
    settings: Any = None,
    workers: int | None = None,
    open_media_files: bool = True,
    allow_outside_media_root: bool = False,
    require_process: bool = False,
    progress: bool = True,
    opener: Opener = open_media,
    special_tokens: str = "refuse",
    max_prompt_length: int | None = None,
    row_check: Callable[[Sample], DataError | None] | None = None,
) -> CheckResult:
    """Check every row of ``dataset`` and (``open_media_files``) open every distinct media file.

    ``row_check(sample)``: a further check of each row still good after that (in this process), e.g. the
    training prompt length (training/grpo_data.prompt_length_check); its error rejects the row.

    Raises :class:`DataError` only when the file itself cannot be read as rows (missing, or a JSON list
    that does not parse); every other problem is one :class:`Rejection` per row.
    """
    path = Path(dataset)
    root = Path(media_root) if media_root is not None else path.parent
    if settings is None:
        settings = FrameSettings()
    fmt, rows, rejected, linenos = _read_for_check(path)
    bad_rows = {r.row for r in rejected}
    media_rows: dict[tuple[str, str], list[int]] = defaultdict(list)
    samples: dict[int, Sample] = {}
    for index, row in enumerate(rows):
        if index in bad_rows:
            continue
        pid = row.get("problem_id") if isinstance(row, dict) else None
        try:
            sample = validate_row(
                row, file=str(path), index=index, media_root=root, check_media_exists=True,
                allow_outside=allow_outside_media_root, require_process=require_process,
                special_tokens=special_tokens, max_text_chars=text_char_limit(max_prompt_length),
            )
        except DataError as err:
            rejected.append(Rejection(index, err.reason, err.field, str(err), linenos[index], pid))
            continue
        except (ValueError, OSError) as exc:  # e.g. a path with a NUL byte or a too long name
            err = DataError(path, index, "path", f"cannot be checked ({type(exc).__name__}: {exc})", "bad_path")
            rejected.append(Rejection(index, err.reason, err.field, str(err), linenos[index], pid))
            continue
        media_rows[(str(sample.media_path), sample.data_type)].append(index)
        samples[index] = sample

    result = CheckResult(file=str(path), format=fmt, rows=rows, rejected=rejected)
    if open_media_files and media_rows:
        items = list(media_rows)
        n_workers = min(4, os.cpu_count() or 1) if workers is None else workers
        n_workers = min(n_workers, len(items))
        from tqdm.auto import tqdm

        with tqdm(total=len(items), desc="media", unit="file", disable=not progress) as bar:
            outcomes = _run_media(items, settings, n_workers, opener, bar.update)
        result.media_files = len(items)
        for item, outcome in zip(items, outcomes):
            if outcome is None:
                continue
            result.media_bad += 1
            reason, message = outcome
            for index in media_rows[item]:
                row = rows[index]
                err = DataError(path, index, "path", message, reason)
                rejected.append(Rejection(index, reason, "path", str(err), linenos[index], row.get("problem_id")))
    if row_check is not None:
        refused = {r.row for r in rejected}
        from tqdm.auto import tqdm

        for index, sample in tqdm(samples.items(), desc="prompts", unit="row", disable=not progress):
            err = None if index in refused else row_check(sample)
            if err is not None:
                rejected.append(Rejection(index, err.reason, err.field, str(err), linenos[index], rows[index].get("problem_id")))
    rejected.sort(key=lambda r: r.row)
    return result


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", encoding="utf-8") as fh:
        for text in lines:
            fh.write(text)
    os.replace(tmp, path)


def write_clean(result: CheckResult, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the good rows (format of the input) to ``out`` and the rejections to ``out.rejected.jsonl``."""
    out = Path(out)
    good = result.good_rows
    if result.format == "jsonl":
        _write_atomic(out, (json.dumps(row, ensure_ascii=False) + "\n" for row in good))
    else:
        _write_atomic(out, [json.dumps(good, ensure_ascii=False, indent=2) + "\n"])
    rejected_path = out.with_name(out.name + ".rejected.jsonl")
    _write_atomic(rejected_path, (json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in result.rejected))
    return out, rejected_path
