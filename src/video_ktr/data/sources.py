"""Where training and SFT rows come from: a JSON / JSONL / parquet file, a `datasets` folder, or a hub id.

:func:`read_source` returns the raw rows (dicts, one per row, in order) and the label that error messages
name ("file", "folder[split]" or "hub id[split]"); :func:`video_ktr.data.rows.load_dataset` validates
them into the Video-R1 schema as it does for a JSON file, so a bad row's error names source, row and field.

- ``*.json`` / ``*.jsonl``: read by :func:`video_ktr.data.rows.read_rows` (no extra dependency);
- ``*.parquet``, or a folder of ``*.parquet`` files (read in name order): pyarrow;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: ``datasets.load_from_disk``
  (a DatasetDict needs ``split``, default "train");
- anything else that is not a local path, e.g. ``Video-R1/Video-R1-260k``: ``datasets.load_dataset(id,
  config, split=split)``, refused with HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1) so that an offline run
  never waits on the network.

Media paths stay relative to ``--media_root``; the default is the file's folder (or the dataset folder),
and a hub dataset needs ``--media_root`` (its videos are not in the downloaded table).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SourceError", "default_media_root", "is_local", "read_source"]

_JSON_SUFFIXES = (".json", ".jsonl")


class SourceError(ValueError):
    """A data source that cannot be read: ``source`` (a file, folder or hub id) and what is wrong."""

    def __init__(self, source: str | os.PathLike, detail: str):
        self.source, self.detail = str(source), detail
        super().__init__(f"{source}: {detail}")


def is_local(spec: str | os.PathLike) -> bool:
    p = Path(spec)
    return p.exists() or Path(str(spec)).suffix in (*_JSON_SUFFIXES, ".parquet") or str(spec).startswith((".", "/", "~"))


def default_media_root(spec: str | os.PathLike) -> Path | None:
    """The folder media paths are relative to when --media_root is not given (None for a hub id)."""
    p = Path(spec)
    if p.is_dir():
        return p
    if is_local(spec):
        return p.parent
    return None


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _need(module: str, spec: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SourceError(spec, f"reading it needs the '{module}' package ({exc}); "
                          f"install it with pip install {module}") from None


def _read_parquet(files: list[Path], label: str) -> list[dict[str, Any]]:
    _need("pyarrow", label)
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for f in files:
        try:
            rows += pq.read_table(f).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a corrupt or foreign file
            raise SourceError(f, f"not a readable parquet file ({type(exc).__name__}: {exc})") from None
    return rows


def _rows_of(ds: Any, label: str, split: str | None) -> tuple[list[dict[str, Any]], str]:
    """A Dataset's rows; a DatasetDict's ``split`` (default train), naming the splits it has otherwise."""
    if isinstance(getattr(ds, "column_names", None), dict):  # a DatasetDict
        names = list(ds.keys())
        want = split or "train"
        if want not in names:
            raise SourceError(label, f"no split {want!r} (splits: {', '.join(names)}); pick one with --dataset_split")
        ds, label = ds[want], f"{label}[{want}]"
    elif split:
        label = f"{label}[{split}]"
    return ds.to_list(), label


def read_source(spec: str | os.PathLike, *, read_rows: Callable[[Path], list[Any]], config: str | None = None,
                split: str | None = None) -> tuple[list[Any], str]:
    """(rows, label) of the data named by ``spec``; see the module docstring for the forms.

    ``read_rows`` reads a JSON/JSONL file (``data.rows.read_rows``, passed in by the caller so this
    module stays below ``data.rows``, which imports it)."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".parquet":
            return _read_parquet([path], str(path)), str(path)
        return read_rows(path), str(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            datasets = _need("datasets", text)
            try:
                ds = datasets.load_from_disk(str(path))
            except Exception as exc:
                raise SourceError(path, f"not a readable save_to_disk folder ({type(exc).__name__}: {exc})") from None
            return _rows_of(ds, str(path), split)
        parquet = sorted(path.rglob("*.parquet"))
        if split:
            parquet = [f for f in parquet if f.name.startswith(f"{split}-") or f.parent.name == split] or parquet
        if parquet:
            return _read_parquet(parquet, str(path)), str(path)
        raise SourceError(path, "a folder with neither a save_to_disk dataset (dataset_dict.json / state.json) "
                          "nor *.parquet files")
    if is_local(spec):
        raise SourceError(path, "data file does not exist")
    if _offline():
        raise SourceError(text, "not a local file or folder, and HF_HUB_OFFLINE is set, so it is not fetched from "
                          "the hub (unset HF_HUB_OFFLINE to download it, or pass a local path)")
    datasets = _need("datasets", text)
    try:
        ds = datasets.load_dataset(text, config, split=split)
    except Exception as exc:  # network, missing repo, bad config: name what was asked
        raise SourceError(text, f"cannot load from the hub (config={config!r}, split={split!r}): "
                          f"{type(exc).__name__}: {exc}") from None
    return _rows_of(ds, text, split)
