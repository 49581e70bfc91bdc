"""Checkpoints that survive a kill: written to a temporary folder, then renamed into place.

``checkpoint-N/`` holds the model (safetensors, loadable with ``from_pretrained``), the processor,
the optimiser and scheduler states (tensors and plain containers, loaded with ``weights_only=True``)
and ``trainer_state.json`` (step, data position, counters, random states as JSON). A folder without
``trainer_state.json`` is incomplete and is never resumed from.

What a kill (SIGKILL, OOM killer, preemption) can leave, and what happens to it:

- killed while ``checkpoint-N`` is being written: the files are in a hidden ``.checkpoint-N.XXXX``
  folder, which no resume ever reads (only ``checkpoint-<digits>`` folders with ``trainer_state.json``
  are checkpoints); the previous checkpoints are untouched. Every file is fsynced before the rename,
  and the folder after it, so a power cut cannot publish a folder whose files are not on disk.
- the hidden leftovers are removed when the next run resumes (:func:`find`) or saves (:func:`save`).
- killed while an old checkpoint is pruned: it is renamed to a hidden folder first, so a half-deleted
  folder is never taken for a checkpoint.
- killed while the final model is written (:func:`save_model`): each file is written beside its target
  and renamed over it, so every file is either the old or the new complete version.
- a checkpoint whose ``optimizer.pt`` / ``scheduler.pt`` holds anything but tensors and plain
  containers is refused (``torch.load(weights_only=True)``): loading a checkpoint never runs code.

Test-only hook: ``VIDEO_KTR_TEST_SAVE_DELAY=SECONDS`` (or ``SECONDS@STEP`` for the save of one step)
makes :func:`save` sleep after every file of the checkpoint is in its temporary folder and before the
rename, so that a test can kill a real run in the middle of a save (tests/test_reliability.py). It is
read at each save; leave it unset outside tests.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
TEST_SAVE_DELAY = "VIDEO_KTR_TEST_SAVE_DELAY"  # test-only, see the module docstring
# hidden folders this module writes into before a rename (and removes when a run left them behind)
_PARTIAL_PREFIXES = (".checkpoint-", ".final-", ".deleting-")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (refused or damaged)."""


@dataclass
class TrainState:
    step: int = 0  # optimiser steps done
    micro_step: int = 0  # micro-batches consumed (the data position)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def full_state_dict(accelerator: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights; EVERY process must call it (under FSDP and DeepSpeed ZeRO-3 it gathers the
    shards, a collective: a save that only the main process entered would hang at its first checkpoint)."""
    return accelerator.get_state_dict(model)


def _write_model(target: Path, accelerator: Any, model: torch.nn.Module, processor: Any,
                 state_dict: dict[str, torch.Tensor]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(str(target), state_dict=state_dict, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(str(target))


def _fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and the folder itself (durable before a rename publishes it)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def save_model(target: Path, accelerator: Any, model: torch.nn.Module, processor: Any) -> None:
    """The model in safetensors (``from_pretrained`` loads it) and its processor, into ``target``.

    Every process calls it (the weights are gathered on all of them, see full_state_dict); the main
    process writes. Written into a hidden folder inside ``target`` first, then each file is renamed over
    its old version: a kill leaves every file either old or new, never half-written.
    """
    state_dict = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    clean_partial(target)
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=target))
    try:
        _write_model(tmp, accelerator, model, processor, state_dict)
        _fsync_tree(tmp)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                dest = target / path.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
        _fsync_dir(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_partial(output_dir: Path) -> list[Path]:
    """Remove the hidden temporary folders a killed save or prune left in ``output_dir``; returns them."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    removed = []
    for stale in sorted(output_dir.iterdir()):
        if stale.name.startswith(_PARTIAL_PREFIXES) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


def _test_delay(step: int) -> float:
    """Seconds to sleep before the rename (``VIDEO_KTR_TEST_SAVE_DELAY``, test-only)."""
    spec = os.environ.get(TEST_SAVE_DELAY, "").strip()
    if not spec:
        return 0.0
    seconds, _, only = spec.partition("@")
    if only and int(only) != step:
        return 0.0
    return float(seconds)


def save(output_dir: Path, step: int, accelerator: Any, model: torch.nn.Module, processor: Any,
         optimizer: Any, scheduler: Any, state: TrainState, extra: dict[str, Any] | None = None) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically (temporary folder + rename); every process calls it.

    Under FSDP or DeepSpeed the optimiser state is split over the processes and the main process holds
    only its part: it is not written (``optimizer.pt`` absent, ``optimizer_state: "sharded-not-saved"``
    in trainer_state.json), so such a checkpoint holds the whole model but cannot be resumed from
    (:func:`load` says so).
    """
    final = output_dir / f"checkpoint-{step}"
    accelerator.wait_for_everyone()
    state_dict = full_state_dict(accelerator, model)  # a collective under FSDP / ZeRO-3: every process
    sharded_optimizer = optimizer_state_sharded(accelerator)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        clean_partial(output_dir)  # left by a run killed while saving
        tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=output_dir))
        _write_model(tmp, accelerator, model, processor, state_dict)
        if not sharded_optimizer:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        payload = {**asdict(state), "rng": _rng_state(), "extra": extra or {},
                   "optimizer_state": "sharded-not-saved" if sharded_optimizer else "optimizer.pt"}
        with open(tmp / STATE_FILE, "w") as fh:
            json.dump(payload, fh)
        _fsync_tree(tmp)
        delay = _test_delay(step)
        if delay > 0:
            time.sleep(delay)
        if final.exists():  # the same step saved again (a resume from an older checkpoint)
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
    accelerator.wait_for_everyone()
    return final


def optimizer_state_sharded(accelerator: Any) -> bool:
    """Whether each process holds only part of the optimiser state (FSDP, DeepSpeed ZeRO 1-3)."""
    kind = str(getattr(accelerator, "distributed_type", ""))
    return kind.endswith("FSDP") or kind.endswith("DEEPSPEED")


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _CKPT.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find(output_dir: Path, spec: str) -> Path:
    """``spec`` as a checkpoint folder, or 'latest' / 'true' for the newest complete one.

    Called when a run resumes: the temporary folders of a save that a kill interrupted in
    ``output_dir`` are removed first (they are never resumed from).
    """
    clean_partial(Path(output_dir))
    if spec.lower() in {"latest", "true", "last"}:
        found = complete_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"no complete checkpoint-N folder in {output_dir} to resume from")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE}); pass 'latest' to take the newest")
    return path


def load(path: Path, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: TrainState) -> dict[str, Any]:
    """Restore model weights, optimiser, scheduler, counters and random states from ``path``."""
    from safetensors.torch import load_file

    payload = json.loads((path / STATE_FILE).read_text())
    if payload.get("optimizer_state", "optimizer.pt") != "optimizer.pt":
        raise CheckpointError(
            f"{path} was written under FSDP / DeepSpeed, whose optimiser state is split over the processes and was not "
            "saved: it holds the whole model (load it with --model_name_or_path to start a new run from it) but "
            "cannot be resumed from. Resuming sharded runs is not implemented yet.")
    if optimizer_state_sharded(accelerator):
        raise CheckpointError("resuming under FSDP / DeepSpeed is not implemented yet (the optimiser state is split "
                              "over the processes); start a new run from the checkpoint's model instead")

    unwrapped = accelerator.unwrap_model(model)
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    if not weights:
        raise FileNotFoundError(f"{path} holds no safetensors weights")
    missing, unexpected = _load_weights(unwrapped, weights)
    if unexpected or missing:
        raise RuntimeError(f"checkpoint {path} does not match this model: unexpected {unexpected[:5]}, missing {missing[:5]}")
    optimizer.load_state_dict(_load_tensors(path / "optimizer.pt"))
    scheduler.load_state_dict(_load_tensors(path / "scheduler.pt"))
    state.step, state.micro_step = int(payload["step"]), int(payload["micro_step"])
    _set_rng_state(payload.get("rng", {}))
    return payload.get("extra", {})


def _load_tensors(file: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never code."""
    import pickle

    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{file} was refused: it holds pickled objects other than tensors and plain containers, and "
            f"loading them could run arbitrary code (torch.load weights_only=True). Resume only from "
            f"checkpoints this package wrote. ({str(err).splitlines()[0]})") from err


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = model.state_dict()
    # save_pretrained may drop tied weights (lm_head tied to the embeddings) and rename prefixes
    mapping = {}
    for key in weights:
        if key in own:
            mapping[key] = key
        else:
            candidates = [k for k in own if k.endswith(key) or key.endswith(k)]
            if len(candidates) == 1:
                mapping[key] = candidates[0]
    unexpected = [k for k in weights if k not in mapping]
    result = model.load_state_dict({mapping[k]: v for k, v in weights.items() if k in mapping}, strict=False)
    missing = [k for k in result.missing_keys if "lm_head" not in k]
    return missing, unexpected


def _discard(folder: Path) -> None:
    """Rename ``folder`` to a hidden name, then delete it: a kill in between never leaves a
    half-deleted ``checkpoint-N`` that looks complete."""
    trash = Path(tempfile.mkdtemp(prefix=".deleting-", dir=folder.parent))
    os.replace(folder, trash / folder.name)
    shutil.rmtree(trash, ignore_errors=True)


def prune(output_dir: Path, keep: int) -> None:
    found = complete_checkpoints(output_dir)
    for old in found[: max(0, len(found) - keep)]:
        _discard(old)
