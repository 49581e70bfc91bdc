"""Checkpoints that survive a kill: written to a temporary folder, then renamed into place.

``checkpoint-N/`` holds the model (safetensors, loadable with ``from_pretrained``), the processor,
the optimiser and scheduler states (tensors and plain containers, loaded with ``weights_only=True``; under
FSDP2 the optimiser state is ``optimizer/``, each process's shards, see training/optimizer_shards.py)
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

from video_ktr.utils.logs import get_logger

logger = get_logger(__name__)

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
    shards, a collective: a save that only the main process entered would hang at its first checkpoint).
    A model wrapped with FSDP2 (accelerate's or this package's own on CPU processes) goes through PyTorch's
    get_model_state_dict (full, on the main process's CPU)."""
    from video_ktr.training import distributed_fsdp as fsdp

    if fsdp.is_fsdp2(model):
        return fsdp.full_model_state_dict(model)
    return accelerator.get_state_dict(model)


def _rng_states(accelerator: Any) -> list[dict[str, Any]] | None:
    """Every process's random states (a collective when several processes run), else None."""
    import torch.distributed as dist

    if int(getattr(accelerator, "num_processes", 1)) <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, _rng_state())
    return states


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
         optimizer: Any, scheduler: Any, state: TrainState, extra: dict[str, Any] | None = None, *,
         model_only: bool = False) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically (temporary folder + rename); every process calls it.

    Under FSDP2 every process writes its own shards of the optimiser state into ``optimizer/`` of the main
    process's temporary folder (PyTorch's distributed checkpoint, ``optimizer_state: "sharded"``,
    training/optimizer_shards.py): no process holds the whole state; the model itself is gathered and written
    whole (safetensors, ``from_pretrained`` loads it). Under DeepSpeed every process writes its own partitions
    with the engine's ``save_checkpoint`` into ``deepspeed/pytorch_model/`` of the same temporary folder (what
    accelerate's ``save_state`` calls; ``optimizer_state: "deepspeed"``), resumed with ``load_checkpoint`` on
    the same number of processes. Both need the output folder on a file system every process sees. Under FSDP1
    the optimiser state is not written (``optimizer.pt`` absent, ``optimizer_state: "sharded-not-saved"``): such
    a checkpoint holds the whole model but cannot be resumed from (:func:`load` says so). Every process's random
    states are kept (``rng_per_process``). One process and DDP: the whole state in ``optimizer.pt``, as ever.
    ``model_only`` (``--save_only_model``): the model, processor and ``trainer_state.json`` only
    (``optimizer_state: "not-saved"``): not resumable (:func:`load` and checkpoint_verify say so).
    """
    from video_ktr.training import distributed_fsdp as fsdp
    from video_ktr.training import optimizer_shards

    final = output_dir / f"checkpoint-{step}"
    accelerator.wait_for_everyone()
    state_dict = full_state_dict(accelerator, model)  # a collective under FSDP / ZeRO-3: every process
    shards = fsdp.is_fsdp2(model) and not model_only  # each process writes its own shards of the optimiser state (DCP)
    engine = deepspeed_engine(accelerator, model) if not model_only else None
    sharded_optimizer = optimizer_state_sharded(accelerator) and not shards and engine is None and not model_only
    rng_states = _rng_states(accelerator)  # a collective with several processes
    tmp = None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        clean_partial(output_dir)  # left by a run killed while saving
        tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=output_dir))
    if engine is not None or shards:  # every process writes its part into the main process's temporary folder
        tmp = Path(_from_main_process(accelerator, str(tmp) if tmp is not None else None))
        if engine is not None:
            engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
        else:
            optimizer_shards.save(accelerator.unwrap_model(model), optimizer, tmp / OPTIMIZER_DIR,
                                  main=accelerator.is_main_process)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        assert tmp is not None
        _write_model(tmp, accelerator, model, processor, state_dict)
        if not sharded_optimizer and engine is None and not shards and not model_only:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if not model_only:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        payload = {**asdict(state), "rng": _rng_state(), "extra": extra or {},
                   "optimizer_state": MODEL_ONLY if model_only else "deepspeed" if engine is not None else
                   SHARDS if shards else "sharded-not-saved" if sharded_optimizer else "optimizer.pt"}
        if shards:
            payload["optimizer_processes"] = int(getattr(accelerator, "num_processes", 1))
        if rng_states is not None:
            payload["rng_per_process"] = rng_states
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


DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "pytorch_model"  # the engine's checkpoint, as accelerate's save_state names it
OPTIMIZER_DIR, SHARDS = "optimizer", "sharded"  # FSDP2: each process's optimiser shards (training/optimizer_shards.py)
MODEL_ONLY = "not-saved"  # --save_only_model: no optimiser, scheduler or random states
MODEL_ONLY_REFUSAL = ("was written with --save_only_model: it holds the model only (no optimiser, scheduler or random "
                      "states) and cannot be resumed from; start a new run from it with --model_name_or_path")


def deepspeed_engine(accelerator: Any, model: Any) -> Any | None:
    """The DeepSpeed engine accelerate.prepare returned (it saves and loads its own partitions), else None."""
    kind = str(getattr(accelerator, "distributed_type", ""))
    if kind.endswith("DEEPSPEED") and callable(getattr(model, "save_checkpoint", None)) \
            and callable(getattr(model, "load_checkpoint", None)):
        return model
    return None


def optimizer_state_sharded(accelerator: Any) -> bool:
    """Whether each process holds only part of the optimiser state (FSDP, DeepSpeed ZeRO 1-3)."""
    from video_ktr.training.distributed import own_fsdp2

    kind = str(getattr(accelerator, "distributed_type", ""))
    return kind.endswith("FSDP") or kind.endswith("DEEPSPEED") or own_fsdp2(accelerator)


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
    """Restore model weights, optimiser, scheduler, counters and random states from ``path``.

    Every process calls it. Under FSDP2 the main process reads the whole weights, they are broadcast tensor by
    tensor and each process keeps its shard (PyTorch's set_model_state_dict with broadcast_from_rank0); each
    process reads its own shards of a sharded optimiser state (any number of processes, one included).
    """
    from safetensors.torch import load_file

    from video_ktr.training import distributed_fsdp as fsdp

    payload = json.loads((path / STATE_FILE).read_text())
    mode, engine = payload.get("optimizer_state", "optimizer.pt"), deepspeed_engine(accelerator, model)
    if mode == "deepspeed":
        if engine is None:
            raise CheckpointError(f"{path} was written under DeepSpeed (each process's partitions in {path / DEEPSPEED_DIR}): "
                                  "resume it under DeepSpeed with the same ZeRO stage and number of processes, or start a "
                                  "new run from its model (--model_name_or_path)")
        loaded, _ = engine.load_checkpoint(str(path / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=False, load_module_strict=False)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint '{DEEPSPEED_TAG}' in {path / DEEPSPEED_DIR}")
        return _restore_counters(path, payload, accelerator, scheduler, state)
    if mode == MODEL_ONLY:
        raise CheckpointError(f"{path} {MODEL_ONLY_REFUSAL}")
    if mode not in ("optimizer.pt", SHARDS):
        raise CheckpointError(
            f"{path} was written under FSDP1, whose optimiser state is split over the processes and was not "
            "saved: it holds the whole model (load it with --model_name_or_path to start a new run from it) but "
            "cannot be resumed from.")
    sharded = fsdp.is_fsdp2(model)
    if engine is not None or (optimizer_state_sharded(accelerator) and not sharded):
        raise CheckpointError(f"{path} holds an optimiser state ({mode}) that DeepSpeed's / FSDP1's partitions cannot "
                              "take: resume it with the set-up that wrote it, or start a new run from its model")
    by_name = payload.get("optimizer_format") == "by-name"  # the whole state by name (FSDP2 checkpoints before DCP)
    if sharded and mode == "optimizer.pt" and not by_name:
        raise CheckpointError(f"{path}/optimizer.pt was written without FSDP2 (its state is keyed by parameter position, "
                              "not name) and cannot be split over FSDP2's shards: resume it with the set-up that wrote it")

    unwrapped = accelerator.unwrap_model(model)
    if sharded:
        _load_fsdp2(path, accelerator, unwrapped, optimizer, whole_optimizer=mode == "optimizer.pt")
    else:
        weights: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            weights.update(load_file(str(f)))
        if not weights:
            raise FileNotFoundError(f"{path} holds no safetensors weights")
        missing, unexpected = _load_weights(unwrapped, weights)
        if unexpected or missing:
            raise RuntimeError(f"checkpoint {path} does not match this model: unexpected {unexpected[:5]}, missing {missing[:5]}")
        if mode == "optimizer.pt":
            optim_state = _load_tensors(path / "optimizer.pt")
            if by_name:
                fsdp.load_full_optimizer_state_dict(model, optimizer, optim_state)
            else:
                optimizer.load_state_dict(optim_state)
    if mode == SHARDS:
        _load_shards(path, payload, accelerator, unwrapped, optimizer)
    return _restore_counters(path, payload, accelerator, scheduler, state)


def _load_shards(path: Path, payload: dict[str, Any], accelerator: Any, model: torch.nn.Module, optimizer: Any) -> None:
    """The optimiser state each process holds now, from the shards every process wrote (DCP reshards: a
    checkpoint of N processes resumes on M, or in one unsharded process). Every process calls it."""
    from torch.distributed.checkpoint.api import CheckpointException

    from video_ktr.training import optimizer_shards

    folder = path / OPTIMIZER_DIR
    groups, problem = None, None
    if accelerator.is_main_process:
        try:
            groups = _load_tensors(folder / optimizer_shards.PARAM_GROUPS)
        except (OSError, CheckpointError, RuntimeError) as err:
            problem = f"{type(err).__name__}: {err}"
    groups, problem = _from_main_process(accelerator, (groups, problem))
    if problem:
        raise CheckpointError(problem)
    saved, now = payload.get("optimizer_processes"), int(getattr(accelerator, "num_processes", 1))
    if saved != now and accelerator.is_main_process:
        logger.info("resuming %s: its optimiser state was written by %s processes, resharded over %d", path.name, saved, now)
    try:
        optimizer_shards.load(model, optimizer, folder, groups)
    except (optimizer_shards.ShardedOptimizerError, CheckpointException) as err:
        raise CheckpointError(f"{folder}: the optimiser's shards could not be read back: {err}") from err


def _load_fsdp2(path: Path, accelerator: Any, model: torch.nn.Module, optimizer: Any, *, whole_optimizer: bool) -> None:
    """Weights of an FSDP2 model (and, with ``whole_optimizer``, a whole optimiser state keyed by name: the
    format before the shards): the main process reads the files, the tensors are broadcast one by one and each
    process keeps its shard. A problem found on the main process stops every process."""
    from safetensors.torch import load_file

    from video_ktr.training import distributed_fsdp as fsdp

    weights: dict[str, torch.Tensor] = {}
    optim_state: dict[str, Any] = {}
    problem = None
    if accelerator.is_main_process:
        try:
            raw: dict[str, torch.Tensor] = {}
            for f in sorted(path.glob("*.safetensors")):
                raw.update(load_file(str(f)))
            own = list(model.state_dict())  # the names, with DTensor values: no collective
            mapping, unexpected = _match_keys(own, raw)
            missing = [k for k in own if k not in set(mapping.values()) and "lm_head" not in k]
            if not raw:
                problem = f"{path} holds no safetensors weights"
            elif unexpected or missing:
                problem = f"checkpoint {path} does not match this model: unexpected {unexpected[:5]}, missing {missing[:5]}"
            else:
                weights = {mapping[k]: v for k, v in raw.items()}
                if whole_optimizer:
                    optim_state = _load_tensors(path / "optimizer.pt")
        except Exception as err:  # every process must hear of it, or the others would wait in the broadcast
            problem = f"{type(err).__name__}: {err}"
    problem = _from_main_process(accelerator, problem)
    if problem:
        raise CheckpointError(problem)
    fsdp.load_full_model_state_dict(model, weights, from_main_process=True)
    if whole_optimizer:
        fsdp.load_full_optimizer_state_dict(model, optimizer, optim_state, from_main_process=True)


def _from_main_process(accelerator: Any, value: Any) -> Any:
    """The main process's ``value`` on every process (a broadcast when several run)."""
    if int(getattr(accelerator, "num_processes", 1)) <= 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _restore_counters(path: Path, payload: dict[str, Any], accelerator: Any, scheduler: Any,
                      state: TrainState) -> dict[str, Any]:
    """The scheduler, the counters and this process's random states; returns the recipe's extra state."""
    scheduler.load_state_dict(_load_tensors(path / "scheduler.pt"))
    state.step, state.micro_step = int(payload["step"]), int(payload["micro_step"])
    per_process = payload.get("rng_per_process")
    rank, world = int(getattr(accelerator, "process_index", 0)), int(getattr(accelerator, "num_processes", 1))
    _set_rng_state(per_process[rank] if isinstance(per_process, list) and len(per_process) == world
                   else payload.get("rng", {}))
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


def _match_keys(own: list[str], weights: dict[str, torch.Tensor]) -> tuple[dict[str, str], list[str]]:
    """(saved key -> the model's key, saved keys that match none); save_pretrained may drop tied weights
    (lm_head tied to the embeddings) and rename prefixes."""
    mapping = {}
    own_set = set(own)
    for key in weights:
        if key in own_set:
            mapping[key] = key
        else:
            candidates = [k for k in own if k.endswith(key) or key.endswith(k)]
            if len(candidates) == 1:
                mapping[key] = candidates[0]
    return mapping, [k for k in weights if k not in mapping]


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    mapping, unexpected = _match_keys(list(model.state_dict()), weights)
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
