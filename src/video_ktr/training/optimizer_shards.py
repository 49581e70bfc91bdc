"""The optimiser state of a sharded model as each process's own shards: PyTorch's distributed checkpoint (DCP).

Under FSDP2 each process holds a shard of every parameter and of its Adam moments. :func:`save` writes, from
every process at once, only what that process holds (``torch.distributed.checkpoint.state_dict.
get_optimizer_state_dict`` with ``full_state_dict=False``, then ``torch.distributed.checkpoint.save``): no
process gathers the whole state (a 7B model's fp32 moments are about 56 GB). The folder it writes:

- ``__<rank>_0.distcp``: the tensors of process ``rank`` (its rows of each moment; a value every process holds
  alike, Adam's ``step``, once in one of the files);
- ``.metadata``: DCP's index of the shards (a plain pickle, for PyTorch's own tools; never read here);
- ``metadata.pt``: the same index saved with ``torch.save``, read with ``torch.load(weights_only=True)`` and an
  allow-list of DCP's metadata classes, so that loading a checkpoint never unpickles arbitrary objects;
- ``param_groups.pt``: the optimiser's hyper-parameters (learning rate, betas, ...; the parameters by name),
  written by the main process.

:func:`load` reads back into the optimiser what each process holds now, from whichever files hold it (DCP's
resharding): a checkpoint written by N processes resumes on M processes, or unsharded in one. Only tensors
are stored through DCP (its other values would be read back with ``torch.load(weights_only=False)``); a
folder that holds anything else is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from video_ktr.training.distributed_fsdp import torch_optimizer

METADATA = "metadata.pt"  # DCP's index, torch.save'd (weights-only loadable)
PARAM_GROUPS = "param_groups.pt"


class ShardedOptimizerError(RuntimeError):
    """An optimiser-state folder that cannot be read back (refused or incomplete)."""


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=False)


def _metadata_classes() -> list[Any]:
    import torch.distributed.checkpoint.metadata as meta
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.serialization import _get_layout

    return [meta.Metadata, meta.TensorStorageMetadata, meta.ChunkStorageMetadata, meta.TensorProperties,
            meta.MetadataIndex, meta.StorageMeta, meta.BytesStorageMetadata, meta._MEM_FORMAT_ENCODING, _StorageInfo,
            _get_layout]


def _writer(folder: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        """DCP's file writer that also leaves its index in a weights-only loadable file (``metadata.pt``)."""

        def finish(self, metadata: Any, results: Any) -> None:
            super().finish(metadata, results)  # fills metadata.storage_data, writes .metadata
            target = Path(str(self.path))
            torch.save(dataclasses.replace(metadata, storage_meta=None), target / f"{METADATA}.tmp")
            (target / f"{METADATA}.tmp").replace(target / METADATA)

    return Writer(str(folder), sync_files=True)


def _reader(folder: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta
    from torch.serialization import safe_globals

    class Reader(FileSystemReader):
        """DCP's file reader, taking the index from ``metadata.pt`` (weights-only) instead of the pickle."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            file = Path(str(self.path)) / METADATA
            if not file.is_file():
                raise ShardedOptimizerError(f"{file} is missing: the optimiser state's index was not written")
            with safe_globals(_metadata_classes()):
                metadata = torch.load(file, weights_only=True, map_location="cpu")
            others = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
            if others:
                raise ShardedOptimizerError(f"{file.parent} holds values other than tensors ({others[:3]}), which would "
                                            "be unpickled without weights_only: refused")
            metadata.storage_meta = StorageMeta(load_id=self.load_id)
            return metadata

    return Reader(str(folder))


def _one_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns at every save and load in one process (no process group) that it assumes one process: it is."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _flat_keys(state: dict[str, Any]) -> set[str]:
    return {f"state.{name}.{key}" for name, values in state.items() for key in values}


def save(model: torch.nn.Module, optimizer: Any, folder: Path, *, main: bool) -> None:
    """Write this process's shards of the optimiser state into ``folder``; EVERY process calls it (DCP agrees on
    who writes what: a collective). ``main``: this process writes the hyper-parameters too. ``folder`` must be
    the same path on every process (a file system they share)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, torch_optimizer(optimizer), options=_options())
    for name, values in state["state"].items():
        wrong = [k for k, v in values.items() if not isinstance(v, torch.Tensor)]
        if wrong:  # DCP would store them pickled, to be read back with weights_only=False
            raise TypeError(f"optimiser state of {name} holds values other than tensors ({wrong}): cannot be saved "
                            "as shards")
    with _quiet():
        dcp.save({"state": state["state"]}, storage_writer=_writer(folder), no_dist=_one_process())
    if main:
        torch.save(state["param_groups"], folder / PARAM_GROUPS)


def saved_keys(folder: Path) -> set[str]:
    """The flat keys (``state.<parameter>.<moment>``) an optimiser-state folder holds."""
    return set(_reader(folder).read_metadata().state_dict_metadata)


def storage(folder: Path) -> dict[Any, Any]:
    """Where each saved piece lies: DCP's ``MetadataIndex`` (key, offset of the piece in the whole tensor) ->
    ``_StorageInfo`` (``relative_path``: the file, ``offset`` and ``length`` in it)."""
    return dict(_reader(folder).read_metadata().storage_data)


def load(model: torch.nn.Module, optimizer: Any, folder: Path, param_groups: list[dict[str, Any]]) -> None:
    """Read into ``optimizer`` the shards of its state this process holds now; EVERY process calls it.

    ``param_groups``: the content of ``folder/param_groups.pt`` (read by the caller with weights_only). The state
    must name the same parameters as the model's (a missing or extra one is refused, naming a few)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    opt = torch_optimizer(optimizer)
    current = get_optimizer_state_dict(model, opt, options=_options())  # this process's tensors, to be filled in
    want, have = _flat_keys(current["state"]), saved_keys(folder)
    if want != have:
        raise ShardedOptimizerError(f"the optimiser state in {folder} does not match this model's parameters: missing "
                                    f"{sorted(want - have)[:4]}, not in this model {sorted(have - want)[:4]}")
    box = {"state": current["state"]}
    with _quiet():
        dcp.load(box, storage_reader=_reader(folder), no_dist=_one_process())
    set_optimizer_state_dict(model, opt, {"state": box["state"], "param_groups": param_groups}, options=_options())
