"""The package's diagnostics through Python ``logging``, with transformers' ``--log_level`` semantics.

- ``get_logger(__name__)`` gives a logger under ``video_ktr`` whose calls take accelerate's
  ``main_process_only`` keyword (default True: only the main process writes, as
  ``accelerate.logging.get_logger``), without needing accelerate's state to exist first: before an
  ``Accelerator`` / ``PartialState`` is made, the main process is the one whose ``RANK`` is 0 or unset.
- The ``video_ktr`` logger writes the bare message to standard error (looked up at each record, so a
  redirected or captured stream gets it) at INFO and above by default, and does not propagate to the
  root logger (transformers' convention): what used to be printed reads the same.
- ``--log_level`` (the main process) and ``--log_level_replica`` (the others) take transformers'
  choices: debug, info, warning, error, critical or passive (leave the levels as they are). A level
  sets this package's logger and transformers' verbosity, as ``Trainer`` does with
  ``TrainingArguments.get_process_log_level()``.
- ``--disable_tqdm``: no progress bars; left unset, bars are off when the level is above warning
  (transformers' rule), and never drawn on a process other than the main one.

A command's own result (the table of ``eval``, ``done: ...`` of ``train``) stays a ``print``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from video_ktr.utils.config import field

PACKAGE = "video_ktr"
LOG_LEVELS: dict[str, int] = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                              "error": logging.ERROR, "critical": logging.CRITICAL, "passive": -1}
DEFAULT_LEVEL = logging.INFO


@dataclass
class LogOptions:
    """Logging and progress bars (transformers' names and choices)."""

    log_level: str = field("passive", choices=list(LOG_LEVELS), help="Level of this package's messages and transformers' on the main process: debug, info, warning, error, critical, or passive (leave them as they are: info here, warning for transformers).")
    log_level_replica: str = field("warning", choices=list(LOG_LEVELS), help="The same on the other processes of a distributed run (their info messages are not shown by default).")
    disable_tqdm: bool | None = field(None, help="No progress bars (default: off when --log_level is error or critical; bars are drawn by the main process only).")


class _StderrHandler(logging.StreamHandler):
    """A stream handler on whatever ``sys.stderr`` is when a record is written (pytest's capture, a redirect)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # the stream is always the current sys.stderr
        pass


def package_logger() -> logging.Logger:
    """The ``video_ktr`` logger, given its handler and default level once."""
    logger = logging.getLogger(PACKAGE)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(DEFAULT_LEVEL)
        logger.propagate = False
    return logger


def is_main_process() -> bool:
    """Whether this is the main process: accelerate's answer once its state exists, else ``RANK`` 0 or unset."""
    try:
        from accelerate.state import PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        PartialState = None  # noqa: N806
    if PartialState is not None and PartialState._shared_state:
        return bool(PartialState().is_main_process)
    return os.environ.get("RANK", "0") in ("", "0")


class MainProcessLogger(logging.LoggerAdapter):
    """``accelerate.logging.get_logger``'s contract: ``main_process_only=True`` unless the call says otherwise."""

    def log(self, level: int, msg: object, *args: Any, main_process_only: bool = True, **kwargs: Any) -> None:
        if self.isEnabledFor(level) and (not main_process_only or is_main_process()):
            kwargs.setdefault("stacklevel", 3)  # the caller of .info/.warning, not this adapter
            self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> MainProcessLogger:
    """A logger for module ``name`` (``__name__``) under the package's logger."""
    package_logger()
    return MainProcessLogger(logging.getLogger(name), {})


def process_log_level(options: LogOptions, *, main: bool) -> int:
    """The level this process runs at (-1: passive), as ``TrainingArguments.get_process_log_level``."""
    name = options.log_level if main else options.log_level_replica
    if name not in LOG_LEVELS:
        raise ValueError(f"--log_level{'' if main else '_replica'} must be one of {', '.join(LOG_LEVELS)}, got {name!r}")
    return LOG_LEVELS[name]


def setup_logging(options: LogOptions, *, main: bool | None = None) -> int:
    """Set this package's and transformers' levels from ``--log_level`` / ``--log_level_replica``.

    ``main``: whether this is the main process (default: :func:`is_main_process`). Returns the level in
    force for this package's logger. Passive leaves every level as it is.
    """
    main = is_main_process() if main is None else main
    level = process_log_level(options, main=main)
    logger = package_logger()
    if level != -1:
        logger.setLevel(level)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(level)
    return logger.getEffectiveLevel()


def bars_disabled(options: Any = None, *, main: bool | None = None) -> bool:
    """Whether progress bars are off: --disable_tqdm, a level above warning (transformers' rule), or not the main process."""
    main = is_main_process() if main is None else main
    if not main:
        return True
    explicit = getattr(options, "disable_tqdm", None)
    if explicit is not None:
        return bool(explicit)
    return package_logger().getEffectiveLevel() > logging.WARNING


def progress(iterable: Iterable | None = None, *, options: Any = None, main: bool | None = None, **kwargs: Any) -> Any:
    """A tqdm bar (``tqdm.auto``) on the main process, off where :func:`bars_disabled` says so."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", bars_disabled(options, main=main))
    return tqdm(iterable, **kwargs)
