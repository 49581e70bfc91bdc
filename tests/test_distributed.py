"""What every process must do under sharded set-ups (FSDP, DeepSpeed ZeRO-3), checked with stand-in accelerators.

Nothing here is a collective under the two-process gloo DDP tests (tests/test_trainer.py), so those cannot see
a save that only the main process enters; these stand-ins record the calls each process makes.
"""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from video_ktr.training import checkpoint as ckpt
from video_ktr.training.distributed import (
    backend,
    check_backend,
    own_fsdp2,
    requested_backend,
    sharded_parameters,
)


class StandInAccelerator:
    """Records the calls a process makes; ``kind`` is accelerate's DistributedType name."""

    def __init__(self, *, main: bool, kind: str = "NO", zero_stage: int = 0, clipping=None):
        self.is_main_process, self.distributed_type = main, f"DistributedType.{kind}"
        self.calls: list[str] = []
        self.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(
            zero_stage=zero_stage, deepspeed_config={"gradient_clipping": clipping} if clipping is not None else {}))

    def wait_for_everyone(self):
        self.calls.append("wait_for_everyone")

    def get_state_dict(self, model):
        self.calls.append("get_state_dict")  # a collective under FSDP / ZeRO-3
        return {k: v.clone() for k, v in model.state_dict().items()}

    def unwrap_model(self, model):
        return model


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def save_pretrained(self, folder, state_dict, safe_serialization=True):
        from safetensors.torch import save_file

        save_file(state_dict, f"{folder}/model.safetensors")


def _save_all(acc, out, model):
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.save(out, 1, acc, model, None, opt, sched, ckpt.TrainState(step=1, micro_step=1))
    ckpt.save_model(out, acc, model, None)


@pytest.mark.parametrize("kind", ["NO", "MULTI_CPU", "FSDP", "DEEPSPEED"])
def test_every_process_gathers_the_weights_for_a_checkpoint_and_the_final_model(tmp_path, kind):
    """A rank that is not the main one still enters both gathers (FSDP / ZeRO-3 would hang otherwise) and writes nothing."""
    model = TinyModel()
    other, main = StandInAccelerator(main=False, kind=kind), StandInAccelerator(main=True, kind=kind)
    _save_all(other, tmp_path / "other", model)
    _save_all(main, tmp_path / "main", model)
    assert other.calls.count("get_state_dict") == main.calls.count("get_state_dict") == 2
    assert other.calls == main.calls  # the same sequence of collectives on every rank
    assert not (tmp_path / "other").exists()
    assert (tmp_path / "main" / "checkpoint-1" / "model.safetensors").is_file()
    assert (tmp_path / "main" / "model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["FSDP"])  # FSDP1 (accelerate's, not FSDP2); DeepSpeed saves through its engine (below)
def test_a_sharded_optimizer_state_is_not_saved_as_if_whole_and_such_a_checkpoint_is_refused(tmp_path, kind):
    model = TinyModel()
    _save_all(StandInAccelerator(main=True, kind=kind), tmp_path, model)
    folder = tmp_path / "checkpoint-1"
    assert not (folder / "optimizer.pt").exists()  # the main process holds only its part of it
    assert json.loads((folder / ckpt.STATE_FILE).read_text())["optimizer_state"] == "sharded-not-saved"
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ckpt.CheckpointError, match="cannot be resumed from"):
        ckpt.load(folder, StandInAccelerator(main=True), model, opt, sched, ckpt.TrainState())


def test_backend_names_and_the_launch_request(monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    assert backend(StandInAccelerator(main=True)) == "single"
    assert backend(StandInAccelerator(main=True, kind="MULTI_CPU")) == "DDP"
    fsdp2 = StandInAccelerator(main=True, kind="FSDP")
    assert backend(fsdp2) == "FSDP1"
    fsdp2.is_fsdp2 = True
    assert backend(fsdp2) == "FSDP2"
    assert backend(StandInAccelerator(main=True, kind="DEEPSPEED", zero_stage=3)) == "DeepSpeed ZeRO-3"
    assert requested_backend({"ACCELERATE_USE_FSDP": "true"}) == "FSDP"
    assert requested_backend({"ACCELERATE_USE_DEEPSPEED": "True"}) == "DeepSpeed"
    assert requested_backend({}) is None
    # an FSDP launch on CPU processes: accelerate set up MULTI_CPU, the trainers shard the model themselves
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cpu = StandInAccelerator(main=True, kind="MULTI_CPU")
    assert own_fsdp2(cpu) and backend(cpu) == "FSDP2" and sharded_parameters(cpu)
    assert not own_fsdp2(StandInAccelerator(main=True)) and backend(StandInAccelerator(main=True)) == "single"


FSDP2_CPU = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
             "FSDP_OFFLOAD_PARAMS": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}


def test_a_launch_whose_fsdp_or_deepspeed_would_fall_back_is_refused_or_sharded_by_the_trainers():
    cfg = SimpleNamespace(gradient_accumulation_steps=1, max_grad_norm=1.0)
    ddp = StandInAccelerator(main=True, kind="MULTI_CPU")  # what accelerate 1.15 makes of an FSDP config on CPU
    with pytest.raises(RuntimeError, match="asked for DeepSpeed.*set up DDP"):
        check_backend(ddp, cfg, {"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(RuntimeError, match="asked for FSDP.*set up single"):  # one process: nothing to shard over
        check_backend(StandInAccelerator(main=True), cfg, FSDP2_CPU)
    check_backend(ddp, cfg, {})
    check_backend(ddp, cfg, FSDP2_CPU)  # the trainers' own FSDP2 takes over
    check_backend(StandInAccelerator(main=True, kind="FSDP"), cfg, {"ACCELERATE_USE_FSDP": "true"})


@pytest.mark.parametrize("setting,match", [
    ({"FSDP_VERSION": "1"}, "FSDP version 1 on CPU"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
    ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "fsdp_cpu_ram_efficient_loading"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "--gradient_checkpointing"),
    ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "SIZE_BASED_WRAP"),
])
def test_fsdp_settings_the_cpu_wrapping_does_not_honour_are_refused(setting, match):
    cfg = SimpleNamespace(gradient_accumulation_steps=1, max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match=match):
        check_backend(StandInAccelerator(main=True, kind="MULTI_CPU"), cfg, {**FSDP2_CPU, **setting})


def test_fsdp_on_cpu_processes_refuses_mixed_precision():
    cfg = SimpleNamespace(gradient_accumulation_steps=1, max_grad_norm=1.0)
    acc = StandInAccelerator(main=True, kind="MULTI_CPU")
    acc.mixed_precision = "bf16"
    with pytest.raises(RuntimeError, match="without mixed precision.*bf16"):
        check_backend(acc, cfg, FSDP2_CPU)


def test_deepspeed_settings_that_cannot_be_made_correct_are_refused():
    zero3 = StandInAccelerator(main=True, kind="DEEPSPEED", zero_stage=3, clipping=1.0)
    with pytest.raises(RuntimeError, match="gradient_accumulation_steps > 1 is not supported under DeepSpeed"):
        check_backend(zero3, SimpleNamespace(gradient_accumulation_steps=4, max_grad_norm=1.0), {})
    with pytest.raises(RuntimeError, match="clips gradients at 1.0.*--max_grad_norm is 0.5"):
        check_backend(zero3, SimpleNamespace(gradient_accumulation_steps=1, max_grad_norm=0.5), {})
    check_backend(zero3, SimpleNamespace(gradient_accumulation_steps=1, max_grad_norm=1.0), {"ACCELERATE_USE_DEEPSPEED": "true"})


class StandInEngine(TinyModel):
    """DeepSpeed's engine as the checkpoint code uses it: save_checkpoint / load_checkpoint (every process)."""

    def __init__(self, rank: int = 0):
        super().__init__()
        self.rank, self.calls = rank, []

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, exclude_frozen_parameters=False):
        from pathlib import Path

        self.calls.append(("save_checkpoint", save_dir, tag, save_latest))
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"rank": self.rank}, folder / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt")

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        from pathlib import Path

        self.calls.append(("load_checkpoint", load_dir, tag, load_optimizer_states, load_lr_scheduler_states))
        return (str(Path(load_dir) / tag), {}) if (Path(load_dir) / tag).is_dir() else (None, None)


def test_deepspeed_checkpoints_hold_the_engines_partitions_and_resume_through_the_engine(tmp_path):
    """Under DeepSpeed the engine writes each process's partitions into the checkpoint's temporary folder
    (accelerate save_state's call and tag), the folder is published by the rename, verify accepts it, and a
    resume goes through the engine's load_checkpoint (optimizer states on, its own scheduler off: ours is
    scheduler.pt). A stand-in engine: DeepSpeed does not run on this machine."""
    from video_ktr.training.checkpoint_verify import verify

    engine, acc = StandInEngine(), StandInAccelerator(main=True, kind="DEEPSPEED", zero_stage=3)
    opt = torch.optim.AdamW(engine.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    folder = ckpt.save(tmp_path, 3, acc, engine, None, opt, sched, ckpt.TrainState(step=3, micro_step=6))
    (call,) = engine.calls
    assert call[0] == "save_checkpoint" and call[2] == ckpt.DEEPSPEED_TAG and call[3] is False
    assert f"{tmp_path}/.checkpoint-3." in call[1] and call[1].endswith("/deepspeed")  # written before the rename
    assert (folder / "deepspeed" / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    assert not (folder / "optimizer.pt").exists() and (folder / "model.safetensors").is_file()
    assert json.loads((folder / ckpt.STATE_FILE).read_text())["optimizer_state"] == "deepspeed"
    verify(folder)

    resumed, state = StandInEngine(), ckpt.TrainState()
    ckpt.load(folder, acc, resumed, opt, sched, state)
    assert resumed.calls == [("load_checkpoint", str(folder / "deepspeed"), "pytorch_model", True, False)]
    assert (state.step, state.micro_step) == (3, 6)
    # not resumable without DeepSpeed, nor with its partitions gone
    with pytest.raises(ckpt.CheckpointError, match="resume it under DeepSpeed"):
        ckpt.load(folder, StandInAccelerator(main=True), TinyModel(), opt, sched, ckpt.TrainState())
    import shutil

    shutil.rmtree(folder / "deepspeed" / "pytorch_model")
    with pytest.raises(ckpt.CheckpointError, match="DeepSpeed engine's checkpoint was not written"):
        verify(folder)


def test_under_deepspeed_every_process_writes_into_the_main_processs_folder(tmp_path, monkeypatch):
    """The non-main process learns the main one's temporary folder (a broadcast) and writes its partitions there;
    it writes nothing else."""
    shared = tmp_path / ".checkpoint-1.abcd"
    monkeypatch.setattr(ckpt, "_from_main_process", lambda acc, value: str(shared))  # the broadcast of its path
    engine, acc = StandInEngine(rank=1), StandInAccelerator(main=False, kind="DEEPSPEED", zero_stage=2)
    opt = torch.optim.AdamW(engine.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.save(tmp_path, 1, acc, engine, None, opt, sched, ckpt.TrainState(step=1, micro_step=1))
    assert engine.calls == [("save_checkpoint", str(shared / "deepspeed"), "pytorch_model", False)]
    assert sorted(p.name for p in (shared / "deepspeed" / "pytorch_model").iterdir()) == ["zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert acc.calls.count("get_state_dict") == 1 and not (tmp_path / "checkpoint-1").exists()


def test_an_fsdp2_checkpoint_resumes_in_one_process(tmp_path, monkeypatch):
    """The FSDP2 format (whole weights, the optimiser state as DCP shards in optimizer/) restores Adam's moments
    into a model that is not sharded: a run saved under FSDP2 can go on in one process. The FSDP2 save path runs
    on a plain model in one process here (DCP and PyTorch's state-dict functions take both); the real two-process
    shards are tests/test_fsdp_cpu.py's. verify() checks the shard files against their index; a state that does
    not name the model's parameters, and one holding pickled values, are refused."""
    from video_ktr.training import distributed_fsdp as fsdp
    from video_ktr.training import optimizer_shards
    from video_ktr.training.checkpoint_verify import verify

    model = TinyModel()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.layer(torch.randn(3, 2)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with monkeypatch.context() as m:
        m.setattr(fsdp, "is_fsdp2", lambda model: True)
        folder = ckpt.save(tmp_path, 1, StandInAccelerator(main=True), model, None, opt, sched, ckpt.TrainState(1, 1))
    payload = json.loads((folder / ckpt.STATE_FILE).read_text())
    assert (payload["optimizer_state"], payload["optimizer_processes"]) == ("sharded", 1)
    assert not (folder / "optimizer.pt").exists()
    shards = folder / ckpt.OPTIMIZER_DIR
    assert optimizer_shards.saved_keys(shards) == {f"state.layer.{p}.{k}" for p in ("weight", "bias")
                                                   for k in ("step", "exp_avg", "exp_avg_sq")}
    assert {p.name for p in shards.iterdir()} >= {"__0_0.distcp", ".metadata", "metadata.pt", "param_groups.pt"}
    verify(folder)

    fresh = TinyModel()
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    ckpt.load(folder, StandInAccelerator(main=True), fresh, opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0),
              ckpt.TrainState())
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert torch.equal(a["step"], b["step"])
    assert opt2.param_groups[0]["lr"] == 0.1  # the saved hyper-parameters
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))

    class Other(TinyModel):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(2, 1)

    other = Other()
    other.load_state_dict(model.state_dict(), strict=False)
    opt3 = torch.optim.AdamW(other.parameters())
    with pytest.raises(ckpt.CheckpointError, match=r"does not match this model's parameters: missing \['state.extra"):
        ckpt._load_shards(folder, payload, StandInAccelerator(main=True), other, opt3)
    shard = shards / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="__0_0.distcp is damaged: the optimiser's shard index places"):
        verify(folder)

    import torch.distributed.checkpoint as dcp

    pickled = tmp_path / "pickled"  # DCP stores a value other than a tensor pickled; reading it back is refused
    with optimizer_shards._quiet():
        dcp.save({"state": {"layer.weight": {"note": "a string"}}}, storage_writer=optimizer_shards._writer(pickled),
                 no_dist=True)
    with pytest.raises(optimizer_shards.ShardedOptimizerError, match="values other than tensors"):
        optimizer_shards.saved_keys(pickled)


def test_accelerates_fsdp2_plugin_also_wraps_the_vision_tower(tiny_model):
    """accelerate's TRANSFORMER_BASED_WRAP takes the model's _no_split_modules (decoder layer, vision block); the
    tower that owns the blocks is added, so get_*_features (called outside the root's forward) finds its patch
    embedding and merger gathered by a unit of its own. A user's explicit list is kept and extended."""
    from video_ktr.training.distributed_fsdp import wrap_vision_towers_too

    model, _ = tiny_model
    tower = type(model.model.visual).__name__
    plugin = SimpleNamespace(transformer_cls_names_to_wrap=None)
    names = wrap_vision_towers_too(plugin, model)
    assert set(names) == {*model._no_split_modules, tower} and names[-1] == tower
    assert plugin.transformer_cls_names_to_wrap == names
    assert wrap_vision_towers_too(plugin, model) == names  # once only
    block = type(model.model.visual.blocks[0]).__name__
    mine = SimpleNamespace(transformer_cls_names_to_wrap=[block])
    assert wrap_vision_towers_too(mine, model) == [block, tower]
    text_only = SimpleNamespace(transformer_cls_names_to_wrap=[type(model.model.language_model.layers[0]).__name__])
    wrap_vision_towers_too(text_only, model)
    assert tower not in text_only.transformer_cls_names_to_wrap  # no vision block wrapped: the tower stays in the root


def test_the_trainers_turn_fsdp2_gradient_sync_off_for_the_micro_batches_before_the_last(monkeypatch):
    """Our own FSDP2 wrapping on CPU processes is invisible to accelerate's no_sync (it set up plain processes): the
    recipe's accumulation block turns each unit's gradient sync off itself, and back on; under DDP it is accelerate's
    no_sync; the last micro-batch runs with neither. (The reductions counted on two real processes:
    tests/test_fsdp_cpu.py.)"""
    from video_ktr.training import distributed_fsdp as fsdp
    from video_ktr.training.grpo import KTRTrainer

    class Unit:
        def __init__(self):
            self.calls = []

        def set_requires_gradient_sync(self, flag):
            self.calls.append(flag)

    monkeypatch.setattr(fsdp, "is_fsdp2", lambda model: isinstance(model, Unit))
    monkeypatch.setattr(fsdp, "_is_fsdp_module", lambda model: isinstance(model, Unit))
    entered = []

    @contextlib.contextmanager
    def no_sync(model):
        entered.append(model)
        yield

    unit, acc = Unit(), SimpleNamespace(no_sync=no_sync)
    with KTRTrainer._accumulating(SimpleNamespace(acc=acc, model=unit), True):
        assert unit.calls == [False]
    with KTRTrainer._accumulating(SimpleNamespace(acc=acc, model=unit), False):
        pass
    assert unit.calls == [False, True] and not entered
    ddp = torch.nn.Linear(1, 1)
    with KTRTrainer._accumulating(SimpleNamespace(acc=acc, model=ddp), True):
        assert entered == [ddp]


def test_save_only_model_checkpoints_hold_the_model_and_are_never_resumed(tmp_path):
    """--save_only_model: the weights and trainer_state.json, no optimiser, scheduler or random states; resuming it is
    refused with the reason, and 'latest' falls back to an older full checkpoint (saying why)."""
    from video_ktr.training.checkpoint_verify import find_resumable

    model, acc = TinyModel(), StandInAccelerator(main=True)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    full = ckpt.save(tmp_path, 1, acc, model, None, opt, sched, ckpt.TrainState(1, 1))
    only = ckpt.save(tmp_path, 2, acc, model, None, opt, sched, ckpt.TrainState(2, 2), model_only=True)
    assert sorted(p.name for p in only.iterdir()) == ["model.safetensors", ckpt.STATE_FILE]
    assert json.loads((only / ckpt.STATE_FILE).read_text())["optimizer_state"] == "not-saved"
    with pytest.raises(ckpt.CheckpointError, match="written with --save_only_model"):
        ckpt.load(only, acc, TinyModel(), opt, sched, ckpt.TrainState())
    with pytest.raises(ckpt.CheckpointError, match="written with --save_only_model"):
        find_resumable(tmp_path, str(only))
    path, skipped = find_resumable(tmp_path, "latest")
    assert path == full and len(skipped) == 1 and "checkpoint-2" in skipped[0] and "save_only_model" in skipped[0]
