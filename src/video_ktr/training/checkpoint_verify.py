"""Checkpoints checked before a resume, a fallback to the newest intact one, and no non-finite final model.

:func:`verify` reads what a resume needs without loading the tensors: ``trainer_state.json`` must parse
as an object with integer ``step`` and ``micro_step``; every ``*.safetensors`` file must have a whole
header whose tensors end exactly at the end of the file (a truncated or overwritten file does not);
``optimizer.pt`` and ``scheduler.pt`` must be complete zip archives (torch's format; a truncated one has no
central directory). Each problem is a :class:`~video_ktr.training.checkpoint.CheckpointError` naming the
file.

:func:`find_resumable` is the resume's choice: an explicit folder must verify; ``latest`` takes the newest
``checkpoint-N`` that verifies, and names each newer one it skipped and why.

:func:`check_finite_model` runs before the final model is written: a parameter holding NaN or inf stops
the run with :class:`NonFiniteModelError` (non-zero exit) instead of saving a broken model as final.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import torch

from video_ktr.training import checkpoint as ckpt
from video_ktr.training.checkpoint import CheckpointError


class NonFiniteModelError(RuntimeError):
    """The model's weights hold NaN or inf; it is not saved as the final model."""


def _verify_safetensors(file: Path) -> None:
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header of {n} bytes does not fit in the file's {size} bytes")
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is damaged: not a readable safetensors file ({exc})") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{file} is damaged: its tensors need {8 + n + end} bytes, the file has {size} "
                              "(truncated or overwritten)")


def verify(path: str | Path) -> None:
    """Raise CheckpointError naming the first damaged or missing file of checkpoint folder ``path``."""
    path = Path(path)
    state = path / ckpt.STATE_FILE
    try:
        payload = json.loads(state.read_text())
        if not isinstance(payload, dict):
            raise ValueError("not a JSON object")
        int(payload["step"]), int(payload["micro_step"])
    except FileNotFoundError:
        raise CheckpointError(f"{state} is missing: {path} is not a complete checkpoint") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{state} is damaged ({type(exc).__name__}: {exc})") from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{path} holds no *.safetensors weights")
    for file in weights:
        _verify_safetensors(file)
    if payload.get("optimizer_state") == "deepspeed":  # each process's partitions, in DeepSpeed's own files
        engine_dir = path / ckpt.DEEPSPEED_DIR / ckpt.DEEPSPEED_TAG
        if not engine_dir.is_dir() or not any(engine_dir.iterdir()):
            raise CheckpointError(f"{engine_dir} is missing or empty: the DeepSpeed engine's checkpoint was not written")
    if payload.get("optimizer_state") == ckpt.MODEL_ONLY:
        raise CheckpointError(f"{path} {ckpt.MODEL_ONLY_REFUSAL}")
    if payload.get("optimizer_state") == ckpt.SHARDS:  # FSDP2: each process's shards (training/optimizer_shards.py)
        _verify_shards(path / ckpt.OPTIMIZER_DIR)
    names = ("scheduler.pt",) if payload.get("optimizer_state") in ("deepspeed", ckpt.SHARDS) else ("optimizer.pt", "scheduler.pt")
    for name in names:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        try:
            with zipfile.ZipFile(file) as zf:
                zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"{file} is damaged: not a complete torch archive ({exc})") from None


def _verify_shards(folder: Path) -> None:
    """The sharded optimiser state's index and hyper-parameters are complete archives, and every shard file it
    names holds the bytes the index places in it."""
    from video_ktr.training import optimizer_shards

    for name in (optimizer_shards.METADATA, optimizer_shards.PARAM_GROUPS):
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the optimiser's shards were not completely written")
        try:
            with zipfile.ZipFile(file) as zf:
                zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"{file} is damaged: not a complete torch archive ({exc})") from None
    needed: dict[str, int] = {}
    for info in optimizer_shards.storage(folder).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = folder / name
        have = file.stat().st_size if file.is_file() else None
        if have is None or have < size:
            raise CheckpointError(f"{file} is {'missing' if have is None else 'damaged'}: the optimiser's shard index "
                                  f"places {size} bytes in it" + ("" if have is None else f", the file has {have}"))


def find_resumable(output_dir: str | Path, spec: str) -> tuple[Path, list[str]]:
    """(checkpoint to resume from, one line per newer checkpoint skipped as damaged)."""
    output_dir = Path(output_dir)
    if spec.lower() not in {"latest", "true", "last"}:
        path = ckpt.find(output_dir, spec)
        verify(path)
        return path, []
    ckpt.clean_partial(output_dir)
    skipped = []
    for path in reversed(ckpt.complete_checkpoints(output_dir)):
        try:
            verify(path)
        except CheckpointError as err:
            skipped.append(f"skipped {path.name}: {err}")
            continue
        return path, skipped
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {output_dir} to resume from:\n  " + "\n  ".join(skipped))
    return ckpt.find(output_dir, spec), []  # raises: no checkpoint at all


def _held(p: torch.Tensor) -> torch.Tensor:
    """What this process holds of parameter ``p``: its shard of an FSDP2 DTensor, its ZeRO-3 partition
    (``ds_tensor``; the parameter itself is then an empty placeholder), else the whole tensor."""
    if hasattr(p, "to_local"):
        return p.detach().to_local()
    return (p.ds_tensor if getattr(p, "ds_tensor", None) is not None else p).detach()


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding NaN or inf in what this process holds (its shard or partition)."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(_held(p)).all())]


def check_finite_model(model: torch.nn.Module, bad: list[str] | None = None) -> None:
    """Raise NonFiniteModelError naming the parameters that hold NaN or inf (``bad``: already found)."""
    bad = non_finite_parameters(model) if bad is None else bad
    if bad:
        raise NonFiniteModelError(
            f"{len(bad)} parameter tensor(s) hold NaN or inf (first: {', '.join(bad[:3])}); the final model is not "
            "saved. Resume from an earlier checkpoint with a lower --learning_rate or --max_grad_norm.")
