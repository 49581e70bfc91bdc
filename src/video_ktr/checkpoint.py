"""Checkpoints that survive a kill: written to a temporary folder, then renamed into place.

``checkpoint-N/`` holds the model (safetensors, loadable with ``from_pretrained``), the processor,
the optimiser and scheduler states (tensors and plain containers, loaded with ``weights_only=True``)
and ``trainer_state.json`` (step, data position, counters, random states as JSON). A folder without
``trainer_state.json`` is incomplete and is never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


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


def save_model(target: Path, accelerator: Any, model: torch.nn.Module, processor: Any) -> None:
    """The model in safetensors (``from_pretrained`` loads it) and its processor, into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    unwrapped.save_pretrained(str(target), state_dict=state_dict, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(str(target))


def save(output_dir: Path, step: int, accelerator: Any, model: torch.nn.Module, processor: Any,
         optimizer: Any, scheduler: Any, state: TrainState, extra: dict[str, Any] | None = None) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically (temporary folder + rename)."""
    final = output_dir / f"checkpoint-{step}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in output_dir.glob(".checkpoint-*"):  # left by a run killed while saving
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=output_dir))
        save_model(tmp, accelerator, model, processor)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        payload = {**asdict(state), "rng": _rng_state(), "extra": extra or {}}
        with open(tmp / STATE_FILE, "w") as fh:
            json.dump(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


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
    """``spec`` as a checkpoint folder, or 'latest' / 'true' for the newest complete one."""
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

    unwrapped = accelerator.unwrap_model(model)
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    if not weights:
        raise FileNotFoundError(f"{path} holds no safetensors weights")
    missing, unexpected = _load_weights(unwrapped, weights)
    if unexpected or missing:
        raise RuntimeError(f"checkpoint {path} does not match this model: unexpected {unexpected[:5]}, missing {missing[:5]}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    payload = json.loads((path / STATE_FILE).read_text())
    state.step, state.micro_step = int(payload["step"]), int(payload["micro_step"])
    _set_rng_state(payload.get("rng", {}))
    return payload.get("extra", {})


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


def prune(output_dir: Path, keep: int) -> None:
    found = complete_checkpoints(output_dir)
    for old in found[: max(0, len(found) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
