"""A GRPO run under torchrun whose ranks' rows would make different numbers of forward calls, recording them.

Used by tests/test_lockstep.py (not a test module itself): ``python -m torch.distributed.run --nproc_per_node 2
tests/lockstep_launch.py <train options>``. Each length bucket is its own forward call (the bucket overhead is
0), so the ranks' completion lengths give them different bucket counts; the process group times out after
60 s, so a disagreement ends the run with an error instead of a hang. Each rank writes, per step, how many
calls its policy model, reference model and vision tower got and how many of them were padding
(``calls-rank<r>.json`` in the output folder).
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import video_ktr.training.grpo_stages as stages
from video_ktr.model.loading import unwrap
from video_ktr.training.distributed import accelerator_device_kwargs
from video_ktr.training.grpo import KTRTrainer
from video_ktr.training.grpo_config import TrainConfig
from video_ktr.utils.config import parse_args


def _counter(module, counts, key):
    def hook(*args):
        counts[key] = counts.get(key, 0) + 1
    return module.register_forward_pre_hook(hook)


def main(argv: list[str]) -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    stages.BUCKET_OVERHEAD_TOKENS = 0  # a forward call per completion width
    cfg = parse_args(TrainConfig, argv)
    acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=60))], **accelerator_device_kwargs())
    trainer = KTRTrainer(cfg, accelerator=acc)
    policy = unwrap(trainer.model)
    vision = next(m for name, m in policy.named_modules() if name.endswith("visual"))
    steps, counts = [], {}
    hooks = [_counter(policy, counts, "policy"), _counter(vision, counts, "vision")]
    if trainer.ref_model is not None:
        hooks.append(_counter(unwrap(trainer.ref_model), counts, "reference"))
    step = trainer.train_step

    def recorded_step():
        counts.clear()
        before = trainer.lockstep.padding_calls
        out = step()
        steps.append({**counts, "padding": trainer.lockstep.padding_calls - before})
        return out

    trainer.train_step = recorded_step
    trainer.train()
    for h in hooks:
        h.remove()
    (Path(cfg.output_dir) / f"calls-rank{acc.process_index}.json").write_text(json.dumps(steps))


if __name__ == "__main__":
    main(sys.argv[1:])
