"""An output folder owned by one run: a lock, and a used folder refused unless the run resumes or overwrites.

``claim_output_dir(folder, resuming=..., overwrite=...)`` (called by the training runs' scaffold on the main
process before anything is written):

- **Lock.** ``FOLDER/.video-ktr.lock`` is opened and locked with ``fcntl.flock`` (exclusive, non-blocking)
  and holds the holder's host, pid and start time as JSON. A second run on the folder is refused with
  that holder named. The operating system drops the lock when the holder exits or is killed, so a lock file
  left by a dead run is stale by construction: it is taken over and the message says whose it was. (flock
  is per host: two hosts writing into one network folder are not kept apart by it; the holder's host is
  in the file to name it.) In one process a second claim of the same folder (a notebook or a test that
  builds a new trainer on the folder) reuses the lock.
- **Used folder.** A folder that holds a previous run (a ``checkpoint-N``, ``metrics.jsonl`` with lines, or
  a saved model's ``config.json``) is refused unless the run resumes (``--resume_from_checkpoint``) or the
  user passes ``--overwrite_output_dir`` (the name of transformers' TrainingArguments option), which removes
  the old run's checkpoints (visible and hidden), logs and run config before the new run starts, so a later
  ``--resume_from_checkpoint latest`` can never continue the old run under the new settings.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from video_ktr.utils.logs import get_logger

logger = get_logger(__name__)
LOCK_NAME = ".video-ktr.lock"
_CHECKPOINT = re.compile(r"^\.?checkpoint-\d+")
# what a training run writes into its folder besides the final model (removed by --overwrite_output_dir)
RUN_FILES = ("metrics.jsonl", "completions.jsonl", "tokens.jsonl", "train_config.json", "sft_config.json",
             "run_config.json", "eval_metrics.jsonl")

_HELD: dict[str, RunDirLock] = {}


class RunDirError(RuntimeError):
    """The output folder is in use by another run, or holds a previous run; the message says what to do."""


@dataclass
class RunDirLock:
    path: Path
    fd: int
    taken_over: str | None = None  # the stale holder, when the lock file of a dead run was found

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1
        _HELD.pop(str(self.path), None)


def _holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown run"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')})"


def lock_output_dir(folder: str | os.PathLike) -> RunDirLock:
    """Take the folder's lock or raise RunDirError naming the run that holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_NAME).resolve()
    held = _HELD.get(str(path))
    if held is not None and held.fd >= 0:
        return held
    stale = _holder(path) if path.exists() else None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise RunDirError(f"output folder {folder} is in use by another run: {_describe(_holder(path))} holds "
                          f"{path}. Wait for it to finish, or use another --output_dir.") from None
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(me).encode())
    os.fsync(fd)
    lock = RunDirLock(path, fd, taken_over=_describe(stale) if stale is not None else None)
    _HELD[str(path)] = lock
    return lock


def previous_run(folder: str | os.PathLike) -> list[str]:
    """The names in ``folder`` that show a previous run (empty for a new or empty folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = sorted(p.name for p in folder.iterdir() if _CHECKPOINT.match(p.name) and not p.name.startswith("."))
    metrics = folder / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    if (folder / "config.json").is_file():
        found.append("config.json (a saved model)")
    return found


def clear_previous_run(folder: Path) -> list[str]:
    """Remove the checkpoints (visible and hidden), logs and run config of a previous run; returns the names."""
    removed = []
    for p in sorted(folder.iterdir()):
        if _CHECKPOINT.match(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
            removed.append(p.name)
        elif p.name in RUN_FILES and p.is_file():
            p.unlink()
            removed.append(p.name)
    return removed


def claim_output_dir(folder: str | os.PathLike, *, resuming: bool, overwrite: bool) -> RunDirLock:
    """Lock ``folder`` for this run and refuse (or, with ``overwrite``, clear) a previous run in it."""
    folder = Path(folder)
    lock = lock_output_dir(folder)
    if lock.taken_over:
        logger.warning(f"{folder}: took over the lock of a run that is no longer running ({lock.taken_over})")
    if resuming:
        return lock
    used = previous_run(folder)
    if used and not overwrite:
        lock.release()
        shown = ", ".join(used[:4]) + (f" and {len(used) - 4} more" if len(used) > 4 else "")
        raise RunDirError(f"output folder {folder} already holds a run ({shown}). Resume it with "
                          "--resume_from_checkpoint latest, start over with --overwrite_output_dir (its "
                          "checkpoints and logs are removed), or use another --output_dir.")
    if used:
        removed = clear_previous_run(folder)
        logger.info(f"{folder}: --overwrite_output_dir removed the previous run's {', '.join(removed) or 'files'}")
    return lock
