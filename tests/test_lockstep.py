"""Every process makes the same forward calls in a GRPO step, whatever its own rows (model/lockstep.py).

Under DDP (the buffer broadcast of each forward of the wrapped model), FSDP and ZeRO-3 (a parameter gather at
each call of a sharded module) a model call is a collective: a process making one call fewer than another
hangs the run. Here two ranks run as two threads, each with its own copy of the tiny model, whose rows
would make different numbers of calls (length buckets, probe groups skipped at advantage 0, videos for the
temporal probe, images against videos); the agreement's all-reduce is a thread barrier (with a timeout, so
a disagreement fails instead of hanging) and hooks record the calls of each rank's language model and
vision tower.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
import torch

import video_ktr.training.grpo_stages as stages
from tests.family import px
from video_ktr.core.loss import group_advantages
from video_ktr.model.inputs import encode_prompts, select_prompts, sequence_inputs
from video_ktr.model.loading import load_model, load_processor
from video_ktr.model.lockstep import Lockstep, lockstep_pass
from video_ktr.model.prefix import strip_pixels
from video_ktr.model.rollout import Completions


class ThreadWorld:
    """A stand-in process group of ``n`` threads. Every collective (an all-reduce MAX, or a model call standing
    for FSDP's parameter gather / DDP's buffer broadcast) waits for all ranks and fails when they are not in the
    same collective, as the real ones would hang or mix their data."""

    def __init__(self, n: int, timeout: float = 30.0):
        self.barrier = threading.Barrier(n, timeout=timeout)
        self.slots: list = [None] * n
        self.joins = [0] * n

    def collective(self, rank: int, kind: str, values: torch.Tensor | None = None, op: str = "max") -> torch.Tensor | None:
        self.joins[rank] += 1
        self.slots[rank] = (kind, values)
        self.barrier.wait()
        kinds = [slot[0] for slot in self.slots]
        stacked = torch.stack([slot[1] for slot in self.slots]) if kinds == [kind] * len(kinds) \
            and values is not None else None
        out = None if stacked is None else stacked.max(0).values if op == "max" else stacked.sum(0)
        self.barrier.wait()
        if kinds != [kind] * len(kinds):
            raise RuntimeError(f"rank {rank}: the ranks are in different collectives {kinds}")
        return out

    def all_max(self, rank: int):
        return lambda values: self.collective(rank, "all_max", values)

    def as_collectives(self, rank: int, model: torch.nn.Module) -> list:
        """Make each call of the model and of its vision tower a collective of this world (hooks, to remove)."""
        vision = dict(model.named_modules())["model.visual"]
        return [model.register_forward_pre_hook(lambda *a: self.collective(rank, "forward") and None, prepend=True),
                vision.register_forward_pre_hook(lambda *a: self.collective(rank, "vision") and None, prepend=True)]


@dataclass
class Rank:
    prompts: dict
    media: list
    comps: Completions
    perms: dict
    probed: list[int]


def _ranks(tiny_setup, processor) -> list[Rank]:
    """Rank 0: two videos, ragged completions (one bucket per width), every group probed, a temporal probe for
    both; rank 1: two images, completions of one width, every group skipped (advantage 0), no temporal probe."""
    samples = tiny_setup.samples()
    videos = [s for s in samples if s.data_type == "video"][:2]
    images = [s for s in samples if s.data_type == "image"][:2]
    G, Lc = 4, 8
    out = []
    for rank, picked in enumerate((videos, images)):
        media = [tiny_setup.media(s) for s in picked]
        prompts = encode_prompts(processor, [s.messages() for s in picked], media)
        ids = torch.randint(10, 400, (len(picked) * G, Lc), generator=torch.Generator().manual_seed(rank))
        valid = torch.ones_like(ids, dtype=torch.bool)
        if rank == 0:
            for row, width in enumerate([1, 3, 5, 8, 2, 4, 6, 7]):
                valid[row, width:] = False
        ids = ids.masked_fill(~valid, 0)
        perms = (stages.temporal_permutations(0, 0, list(enumerate(picked)), media, "shuffle") if rank == 0 else {})
        assert bool(perms) == (rank == 0)
        out.append(Rank(prompts, media, Completions(ids, valid, [""] * len(ids)), perms, [0, 1] if rank == 0 else []))
    return out


def _step_calls(model, processor, r: Rank, lockstep: Lockstep | None, plan: stages.ForwardPlan, G: int):
    """The passes of a step after the rollout: probes, reference, policy (with its backward). Returns the
    recorded calls ('lm' for the language model's forward, 'vision' for the vision tower) and the policy log p."""
    calls: list[str] = []
    vision = dict(model.named_modules())["model.visual"]
    hooks = [model.register_forward_pre_hook(lambda *a: calls.append("lm")),
             vision.register_forward_pre_hook(lambda *a: calls.append("vision"))]
    try:
        P = r.prompts["input_ids"].shape[0]
        seq = sequence_inputs(select_prompts(strip_pixels(r.prompts), list(range(P)), G), r.comps.ids, r.comps.valid)
        probes = stages.probe_scores(model, processor, signals=["visual", "temporal"], visual_probe="blank",
                                     prompt_inputs=r.prompts, seq_inputs=seq, media=r.media, comps=r.comps,
                                     perms=r.perms, probed=r.probed, group_size=G, plan=plan, lockstep=lockstep)
        ref = stages.reference_logprobs(model, r.prompts, r.comps, G, plan, lockstep)
        ro = stages.Rollout([], [], 0, r.media, r.prompts, seq, r.comps, torch.zeros(len(r.comps.ids)), {},
                            group_advantages(torch.zeros(len(r.comps.ids)), G), probes, ref)
        model.zero_grad(set_to_none=True)
        logp, _ = stages.policy_logprobs(model, ro, G, plan, with_entropy=True, lockstep=lockstep)
        (logp * r.comps.valid).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        for h in hooks:
            h.remove()
    return calls, logp.detach(), grads


def test_ranks_with_different_rows_make_the_same_forward_calls(tiny_setup, monkeypatch):
    monkeypatch.setattr(stages, "BUCKET_OVERHEAD_TOKENS", 0)  # a bucket per completion width: rank 0 has many
    processor = load_processor(str(tiny_setup.model_dir))
    models = [load_model(str(tiny_setup.model_dir), dtype="float32", attn_implementation="sdpa") for _ in range(2)]
    ranks = _ranks(tiny_setup, processor)
    plan, G = stages.ForwardPlan(), 4

    # on their own (no agreement) the two ranks' calls differ: under FSDP / ZeRO-3 / DDP this would hang
    alone = [_step_calls(models[i], processor, ranks[i], None, plan, G) for i in range(2)]
    assert alone[0][0] != alone[1][0]
    assert alone[0][0].count("lm") > alone[1][0].count("lm") + 4, (alone[0][0], alone[1][0])

    world = ThreadWorld(2)
    locks = [Lockstep(world.all_max(i), sharded=True) for i in range(2)]
    results: list = [None, None]
    errors: list = []

    def work(i):
        hooks = world.as_collectives(i, models[i])
        try:
            results[i] = _step_calls(models[i], processor, ranks[i], locks[i], plan, G)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((i, exc))
            world.barrier.abort()
        finally:
            for h in hooks:
                h.remove()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    (calls0, logp0, grads0), (calls1, logp1, grads1) = results
    assert calls0 == calls1  # the same sequence of language-model and vision-tower calls
    assert world.joins[0] == world.joins[1] > 0
    assert locks[0].padding_calls == 0 and calls0 == alone[0][0]  # rank 0 makes the most calls in every pass
    assert locks[1].padding_calls == len(calls1) - len(alone[1][0]) > 0
    # the padding changes nothing: the same log-probs and gradients as each rank alone
    for i, (logp, grads) in enumerate(((logp0, grads0), (logp1, grads1))):
        assert torch.equal(logp, alone[i][1])
        assert grads.keys() == alone[i][2].keys()
        for name, g in grads.items():
            assert torch.equal(g, alone[i][2][name]), (i, name)


class OtherProcess:
    """A stand-in for the all-reduce with one other process that makes ``calls`` forward calls in the pass."""

    def __init__(self, calls: int):
        self.calls = calls

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        other = 1 if self.calls > 0 else 0
        self.calls -= other
        return torch.maximum(values, torch.tensor([other]))


def test_one_process_has_no_lockstep_and_a_finished_one_pads_the_others_calls(tiny_model):
    model, _ = tiny_model
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with lockstep_pass(None, model):
            pass
        lock = Lockstep(OtherProcess(2))  # the other process makes two calls in the pass, this one none
        with torch.no_grad(), lockstep_pass(lock, model):
            pass
        assert len(calls) == 2 and lock.padding_calls == 2
        lock = Lockstep(OtherProcess(1))  # one call each: no padding
        with torch.no_grad(), lockstep_pass(lock, model):
            model(input_ids=torch.zeros(1, 1, dtype=torch.long))
        assert len(calls) == 3 and lock.padding_calls == 0
    finally:
        handle.remove()


def test_a_padding_call_made_with_gradient_enters_the_result_times_zero(tiny_model):
    model, _ = tiny_model
    lock = Lockstep(OtherProcess(1))
    x = torch.ones(3, requires_grad=True)
    with lockstep_pass(lock, model):
        pass
    y = lock.fold(x * 2)
    assert torch.equal(y, x * 2) and y.requires_grad
    y.sum().backward()
    head = model.get_output_embeddings().weight
    assert head.grad is not None and torch.count_nonzero(head.grad) == 0  # the padding call's backward ran, adding 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("present,other,pads", [(("image", "video"), 1, 0), (("video",), 2, 1), ((), 2, 2)])
def test_vision_tower_calls_are_agreed_before_they_are_made(tiny_model, present, other, pads):
    from video_ktr.model.lockstep import agree_vision_calls
    from video_ktr.model.rollout import pad_encoder_calls

    model, _ = tiny_model
    calls = []
    vision = dict(model.named_modules())["model.visual"]
    handle = vision.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        lock = Lockstep(lambda t: torch.maximum(t, torch.tensor([other])))
        assert agree_vision_calls(lock, present) == pads
        with torch.no_grad():
            pad_encoder_calls(model, lock, padding=pads)
            assert len(calls) == pads == lock.padding_calls
            pad_encoder_calls(model, lock)  # a process with nothing to encode: as many as the other's
        assert len(calls) == pads + other
        ddp = Lockstep(lambda t: torch.maximum(t, torch.tensor([other])), sharded=False)
        assert agree_vision_calls(ddp, present) == 0  # DDP: a vision call is no collective, nothing is padded
        pad_encoder_calls(model, ddp)
        assert len(calls) == pads + other
    finally:
        handle.remove()


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "fsdp2"])
def test_two_gloo_processes_whose_rows_differ_make_the_same_forward_calls(tiny_setup, tmp_path, launch):
    """Two real processes on gloo: DDP (each forward of the wrapped model broadcasts its buffers, a collective) and
    FSDP2 (configs/accelerate/fsdp-cpu-2proc.yaml: each unit gathers its parameters, the vision tower's too).
    Per-rank rows give different bucket counts (a call per completion width), probe groups skipped on image
    prompts (their rewards are all 1) and temporal probes on videos only. Without the agreement the run hangs
    (here: a 60 s process-group timeout); with it every step's policy and reference forwards (and under FSDP2
    the vision-tower calls) are equal on both ranks, and some rank padded."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_trainer import _free_port

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    args = tiny_setup.train_args(out, "--max_steps", "3", "--per_device_train_batch_size", "1",
                                 "--token_selection", "entropy,visual,temporal", "--kl_on", "valid",
                                 "--reward_funcs", "tests.reward_fixtures:count_e_on_videos,format")
    script = str(root / "tests" / "lockstep_launch.py")
    if launch == "ddp":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               script, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(root / "configs" / "accelerate" / "fsdp-cpu-2proc.yaml"), "--main_process_port", str(_free_port()),
               script, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((out / "run_info.json").read_text())
    assert (info["distributed"], info["sharded_parameters"]) == (("DDP", False) if launch == "ddp" else ("FSDP2", True))
    calls = [json.loads((out / f"calls-rank{r}.json").read_text()) for r in range(2)]
    assert len(calls[0]) == len(calls[1]) == 3
    for a, b in zip(*calls):
        assert a["policy"] == b["policy"] and a.get("reference") == b.get("reference"), calls
        if launch == "fsdp2":
            assert a["vision"] == b["vision"], calls
    assert sum(step["padding"] for rank in calls for step in rank) > 0, calls  # the rows did disagree


class SavingAccelerator:
    """A stand-in accelerator of one rank of a ThreadWorld: the reduction and the waits are the world's
    collectives; ``get_state_dict`` (a collective under FSDP / ZeRO-3) is recorded."""

    def __init__(self, world: ThreadWorld, rank: int):
        self.world, self.rank = world, rank
        self.num_processes, self.process_index, self.is_main_process = 2, rank, rank == 0
        self.device, self.distributed_type = torch.device("cpu"), "DistributedType.FSDP"
        self.gathers = 0

    def wait_for_everyone(self):
        self.world.collective(self.rank, "barrier")

    def reduce(self, values, reduction="sum"):
        return self.world.collective(self.rank, "all_reduce", values, op=reduction)

    def unwrap_model(self, model):
        return model

    def get_state_dict(self, model):
        self.gathers += 1
        self.world.collective(self.rank, "gather")
        return model.state_dict()


@pytest.mark.parametrize("layout", ["shard", "zero3"])
def test_a_nan_held_by_one_process_stops_every_process_before_the_gather(tmp_path, layout):
    """The final save's NaN check: each process checks what it holds (an FSDP2 shard, or a ZeRO-3 partition
    behind an empty placeholder), the processes agree, and all of them stop before the weights' gather."""
    from video_ktr.training.checkpoint_verify import NonFiniteModelError
    from video_ktr.training.run import TrainingRun

    world = ThreadWorld(2)
    runs = []
    for rank in range(2):
        run = object.__new__(TrainingRun)
        run.acc, run.processor, run.out = SavingAccelerator(world, rank), None, tmp_path / f"rank{rank}"
        run.model = torch.nn.Linear(2, 2)
        held = run.model.weight.detach().clone()
        if rank == 1:
            held[0, 0] = float("nan")  # only rank 1 holds the bad value
        if layout == "zero3":  # DeepSpeed's layout: the parameter is an empty placeholder, the partition is ds_tensor
            run.model.weight.data = torch.empty(0)
            run.model.weight.ds_tensor = held
        else:
            run.model.weight.data = held
        runs.append(run)
    raised: list = [None, None]

    def work(rank):
        try:
            runs[rank].save_final()
        except BaseException as exc:  # noqa: BLE001 - checked below
            raised[rank] = exc
            if not isinstance(exc, NonFiniteModelError):
                world.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(isinstance(e, NonFiniteModelError) for e in raised), raised
    assert "weight" in str(raised[1]) and "on another process" in str(raised[0])
    assert [r.acc.gathers for r in runs] == [0, 0] and not any(r.out.exists() for r in runs)


@pytest.mark.slow
def test_sft_evaluation_under_fsdp2_with_rows_that_do_not_split_evenly(tiny_setup, tmp_path):
    """SFT's eval loss on two FSDP2 processes: 5 rows in batches of 2 give rank 0 two batches and rank 1 one.
    Every sharded forward is a collective, so the evaluation gathers the weights once (rollout_weights) and
    runs on the whole model: the run finishes (it crashed with mismatched gathers before) with one process's
    eval loss (learning rate 0: the same weights)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_trainer import _free_port
    from video_ktr.training.sft import SFTConfig, SFTTrainer
    from video_ktr.utils.config import parse_args

    root = Path(__file__).resolve().parents[1]
    rows = json.loads(tiny_setup.test_json.read_text())[:5]
    (tmp_path / "eval5.json").write_text(json.dumps(rows))
    common = ["--model_name_or_path", str(tiny_setup.model_dir), "--dataset", str(tiny_setup.train_json),
              "--media_root", str(tiny_setup.data_dir), "--eval_dataset", str(tmp_path / "eval5.json"),
              "--eval_steps", "1", "--per_device_eval_batch_size", "2", "--max_steps", "1",
              "--per_device_train_batch_size", "1", "--learning_rate", "0", "--logging_steps", "0", "--max_frames", "8",
              "--video_fps", "4",
              "--min_pixels", str(px(1)), "--max_pixels", str(px(4))]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "configs" / "accelerate" / "fsdp-cpu-2proc.yaml"), "--main_process_port", str(_free_port()),
           "-m", "video_ktr", "sft", *common, "--output_dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "two" / "run_info.json").read_text())["distributed"] == "FSDP2"
    SFTTrainer(parse_args(SFTConfig, [*common, "--output_dir", str(tmp_path / "one")])).train()
    one, two = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                for run in ("one", "two"))
    assert [r["eval_tokens"] for r in two] == [r["eval_tokens"] for r in one] and one[-1]["eval_tokens"] > 0
    for a, b in zip(one, two, strict=True):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
