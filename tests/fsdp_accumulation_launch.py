"""Gradient accumulation under FSDP2 on two gloo processes, with and without the gradient sync off.

Used by tests/test_fsdp_cpu.py (not a test module itself): ``python -m torch.distributed.run --nproc_per_node 2
tests/fsdp_accumulation_launch.py <tiny model folder> <output folder>``. The tiny Qwen2.5-VL is sharded the way
the trainers shard it on CPU processes (training/distributed_fsdp.shard_model); each process runs three
micro-batches of its own (a text loss) twice: reducing the gradients at every micro-batch, then with
``gradients_unsynced`` around the first two (what the trainers do). Each process writes the whole gradients
of both (``grads-rank<r>.pt``) and how many gradient reductions (FSDP2's ``foreach_reduce``, one per unit and
backward that reduces) each made (``counts-rank<r>.json``).
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group

from video_ktr.training.distributed_fsdp import gradients_unsynced, shard_model

MICRO_BATCHES = 3


def main(model_dir: str, out: str) -> None:
    from transformers import AutoModelForImageTextToText

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    shard_model(model)
    reductions = [0]
    original = param_group.foreach_reduce

    def counted(*args, **kwargs):
        reductions[0] += 1
        return original(*args, **kwargs)

    param_group.foreach_reduce = counted
    no_accelerate = SimpleNamespace(no_sync=None)  # never reached: the model is FSDP2
    vocab = model.config.get_text_config().vocab_size
    grads, counts = {}, {}
    for mode in ("synced", "unsynced"):
        model.zero_grad(set_to_none=True)
        reductions[0] = 0
        gen = torch.Generator().manual_seed(100 + rank)  # each process its own micro-batches, the same in both modes
        for j in range(MICRO_BATCHES):
            ids = torch.randint(0, vocab, (2, 7), generator=gen)
            with gradients_unsynced(no_accelerate, model, mode == "unsynced" and j < MICRO_BATCHES - 1):
                loss = model(input_ids=ids, labels=ids).loss / MICRO_BATCHES
                loss.backward()
        counts[mode] = reductions[0]
        grads[mode] = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    torch.save(grads, Path(out) / f"grads-rank{rank}.pt")
    (Path(out) / f"counts-rank{rank}.json").write_text(json.dumps(counts))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
