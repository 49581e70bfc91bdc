"""The rollout's whole weights and the reference model under ZeRO-3 / FSDP2 (issue 16, points 2 and 3).

DeepSpeed cannot run on these CPU machines: its calls are checked against a stand-in ``deepspeed`` module
that records them. FSDP2 is PyTorch's own and runs on CPU with gloo: the unshard / reshard test runs two
real processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from video_ktr.training import reference as R
from video_ktr.training.distributed import fill_deepspeed_batch_size
from video_ktr.training.rollout_weights import rollout_weights, sharded_for_rollout


def fake_deepspeed(events: list[str], *, with_unwrap: bool = True) -> ModuleType:
    """A stand-in ``deepspeed``: ``initialize`` and ``zero.unwrap_model_for_generation`` record their calls."""
    ds = ModuleType("deepspeed")
    ds.__version__ = "0.19.6"
    ds.zero = ModuleType("deepspeed.zero")

    @contextlib.contextmanager
    def unwrap_model_for_generation(model):
        assert getattr(model, "optimizer", None) is not None  # DeepSpeed's own needs the training engine
        events.append("gather")
        try:  # DeepSpeed's: the hooks come back after the yield, the release is GatheredParameters' __exit__
            yield model
        finally:
            events.append("release")

    if with_unwrap:
        ds.zero.unwrap_model_for_generation = unwrap_model_for_generation

    def initialize(model=None, config=None, **kw):
        events.append("initialize")
        ds.config = config
        engine = torch.nn.Module()
        engine.module = model
        engine.train()
        return engine, None, None, None

    ds.initialize = initialize
    return ds


def as_zero3(model: torch.nn.Module) -> torch.nn.Module:
    """Mark the parameters the way ZeRO-3 partitioning does (a ``ds_id``) and give the 'engine' an optimizer."""
    for i, p in enumerate(model.parameters()):
        p.ds_id = i
    model.optimizer = object()
    return model


# ------------------------------------------------------------------------------------------- point 3
def test_whole_parameters_need_no_gather_and_never_import_deepspeed(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # an import would raise
    model = torch.nn.Linear(2, 2)
    assert not sharded_for_rollout(model)
    with rollout_weights(model) as gen:
        assert gen is model


def test_zero3_gathers_once_for_the_block_and_releases_it(monkeypatch):
    events: list[str] = []
    monkeypatch.setitem(sys.modules, "deepspeed", fake_deepspeed(events))
    model = as_zero3(torch.nn.Linear(2, 2))
    with rollout_weights(model) as gen:
        events.append("generate")
        gen(torch.zeros(1, 2))
    assert events == ["gather", "generate", "release"]
    with rollout_weights(model, gather=False):
        events.append("sharded")
    assert events[3:] == ["sharded"]
    with pytest.raises(RuntimeError, match="boom"), rollout_weights(model):
        raise RuntimeError("boom")
    assert events[-2:] == ["gather", "release"]  # released when the rollout raises, too


def test_an_old_deepspeed_is_refused_with_a_way_out(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", fake_deepspeed([], with_unwrap=False))
    with pytest.raises(RuntimeError, match="gather_for_generation false"), rollout_weights(as_zero3(torch.nn.Linear(2, 2))):
        pass


def test_one_gather_per_rollout_released_before_every_backward(tiny_setup, tmp_path, monkeypatch):
    """The recipe: with 2 micro-batches and T-GRPO, each rollout (the sampled and the shuffled-frame one)
    enters one gather and leaves it before any policy forward with grad and backward runs."""
    from tests.test_trainer import make_trainer

    events: list[str] = []
    monkeypatch.setitem(sys.modules, "deepspeed", fake_deepspeed(events))
    trainer = make_trainer(tiny_setup, tmp_path, "--gradient_accumulation_steps", "2", "--temporal_grpo", "true",
                           "--token_selection", "entropy", "--max_steps", "1")
    as_zero3(trainer.model)
    backward = trainer.acc.backward
    monkeypatch.setattr(trainer.acc, "backward", lambda loss: (events.append("backward"), backward(loss)))
    trainer.train_step()
    tgrpo_rollouts = events.count("gather") - 2
    assert tgrpo_rollouts in (0, 1, 2)  # the shuffled-frame rollout runs on micro-batches with a video
    assert events.count("gather") == events.count("release")
    assert events[-2:] == ["backward", "backward"]
    assert events[:-2] == ["gather", "release"] * (events.count("gather"))
    events.clear()
    trainer.cfg.gather_for_generation = False
    trainer.train_step()
    assert events == ["backward", "backward"]


CPU = SimpleNamespace(device=torch.device("cpu"))


def test_a_sharded_rollout_without_gather_keeps_processes_in_step(monkeypatch):
    from video_ktr.training import grpo
    from video_ktr.training.grpo_config import TrainConfig

    monkeypatch.setattr(grpo, "synced_rollout", lambda model, gather: not gather)
    spec = grpo.KTRTrainer._sampling_spec
    cfg = TrainConfig(model_name_or_path="m", dataset="d", output_dir="o", rollout_decoder="auto", gather_for_generation=False)
    sampling = spec(SimpleNamespace(cfg=cfg, model=None, acc=CPU))
    assert (sampling.decoder, sampling.synced) == ("hf", True)
    with pytest.raises(ValueError, match="static decoder stops"):
        spec(SimpleNamespace(cfg=TrainConfig(rollout_decoder="static", gather_for_generation=False), model=None, acc=CPU))
    with pytest.raises(ValueError, match="temporal_grpo"):
        spec(SimpleNamespace(cfg=TrainConfig(temporal_grpo=True, gather_for_generation=False), model=None, acc=CPU))
    from video_ktr.model.decode import StaticDecoder

    gathered = spec(SimpleNamespace(cfg=TrainConfig(rollout_decoder="static"), model=None, acc=CPU))
    assert isinstance(gathered.decoder, StaticDecoder) and not gathered.synced


def test_the_static_decoder_refuses_synced_processes():
    from video_ktr.model.rollout import generate

    prompts = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="synced_gpus"):
        generate(torch.nn.Linear(1, 1), None, prompts, seeds=[0], max_new_tokens=4, temperature=1.0, top_p=1.0,
                 eos_ids=(0,), pad_id=0, decoder="static", synced_gpus=True)


# ------------------------------------------------------------------------------------------- point 2
class StandInAccelerator:
    def __init__(self, kind: str, config: dict | None = None, fsdp2: bool = False):
        self.distributed_type = f"DistributedType.{kind}"
        self.is_fsdp2 = fsdp2
        self.calls: list[tuple] = []
        stage = (config or {}).get("zero_optimization", {}).get("stage", 0)
        self.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage, deepspeed_config=config or {}))

    def prepare_model(self, model, evaluation_mode=False):
        self.calls.append(("prepare_model", evaluation_mode))
        return model


POLICY_DS = {
    "train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
    "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-6}}, "scheduler": {"type": "WarmupLR"},
    "zero_allow_untested_optimizer": True,
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
                          "stage3_prefetch_bucket_size": 1000, "stage3_gather_16bit_weights_on_model_save": True},
}


def test_zero3_reference_is_its_own_inference_engine(monkeypatch):
    events: list[str] = []
    ds = fake_deepspeed(events)
    monkeypatch.setitem(sys.modules, "deepspeed", ds)
    acc = StandInAccelerator("DEEPSPEED", POLICY_DS)
    ref = torch.nn.Linear(2, 2)
    engine = R.prepare_reference(ref, acc)
    assert events == ["initialize"] and acc.calls == []
    assert engine.module is ref and not engine.training and not any(p.requires_grad for p in ref.parameters())
    assert "optimizer" not in ds.config and "scheduler" not in ds.config and "zero_allow_untested_optimizer" not in ds.config
    zero = ds.config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"] == {"device": "cpu"} and "offload_optimizer" not in zero
    assert zero["stage3_prefetch_bucket_size"] == 1000 and ds.config["bf16"] == {"enabled": True}
    assert POLICY_DS["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}  # the policy's config untouched


def test_a_reference_under_zero2_is_whole_in_a_stage0_engine():
    config = R.reference_deepspeed_config({**POLICY_DS, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    assert config["zero_optimization"] == {"stage": 0}


def test_auto_values_left_in_the_deepspeed_config_are_named():
    with pytest.raises(ValueError, match="zero_optimization.stage3_prefetch_bucket_size"):
        R.reference_deepspeed_config({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto"}})


@pytest.mark.parametrize("kind", ["NO", "MULTI_CPU", "MULTI_GPU"])
def test_whole_reference_under_one_process_or_ddp_as_before(kind):
    acc = StandInAccelerator(kind)
    ref = R.prepare_reference(torch.nn.Linear(2, 2), acc)
    assert acc.calls == [("prepare_model", True)] and not ref.training


def test_fsdp2_reference_goes_through_accelerates_own_wrapping(monkeypatch):
    import accelerate.utils.fsdp_utils as fu

    seen = []
    monkeypatch.setattr(fu, "fsdp2_prepare_model", lambda acc, model: seen.append((acc, model)) or model)
    acc, ref = StandInAccelerator("FSDP", fsdp2=True), torch.nn.Linear(2, 2)
    assert R.prepare_reference(ref, acc) is ref and seen == [(acc, ref)] and acc.calls == []
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        R.prepare_reference(torch.nn.Linear(2, 2), StandInAccelerator("FSDP"))
    wrapped = []
    R.prepare_reference(ref, StandInAccelerator("MULTI_CPU"), fsdp_wrap=lambda m: wrapped.append(m) or m)
    assert wrapped == [ref]


def test_deepspeed_gets_a_micro_batch_where_the_launch_left_auto():
    acc = StandInAccelerator("DEEPSPEED", {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3}})
    fill_deepspeed_batch_size(acc, 2)
    assert acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 2
    acc = StandInAccelerator("DEEPSPEED", {"train_micro_batch_size_per_gpu": 4})
    fill_deepspeed_batch_size(acc, 2)
    assert acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    acc = StandInAccelerator("MULTI_GPU", {})
    fill_deepspeed_batch_size(acc, 2)
    assert acc.state.deepspeed_plugin.deepspeed_config == {}


# ------------------------------------------------------------------------------------------- FSDP2, two real processes
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        self.head = torch.nn.Linear(8, 4)  # the root's own parameters (not a unit of their own)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def _tiny_rollouts(rank: int, model_dir: str, data_json: str, gathers: list[int]) -> dict:
    """The tiny VLM sharded with fully_shard (a unit per decoder layer and vision block, then the root): its
    rollouts inside rollout_weights and, kept sharded, with synced processes, against the whole model's."""
    from torch.distributed.fsdp import fully_shard

    from tests.family import frame_settings
    from video_ktr.data.rows import load_dataset
    from video_ktr.data.video import load_video
    from video_ktr.model.adapters import adapter_for
    from video_ktr.model.inputs import Media, encode_prompts
    from video_ktr.model.loading import load_model, load_processor, special_tokens
    from video_ktr.model.rollout import generate
    from video_ktr.model.sampling import row_seed
    from video_ktr.training.grpo_stages import ForwardPlan, reference_logprobs

    def like_accelerate(model):  # accelerate's TRANSFORMER_BASED_WRAP: decoder layers and vision blocks, then the root
        classes = set(adapter_for(model).wrap_classes())
        for module in [m for m in model.modules() if type(m).__name__ in classes]:
            fully_shard(module)
        return fully_shard(model)

    processor = load_processor(model_dir)
    whole, sharded = load_model(model_dir).eval(), like_accelerate(load_model(model_dir).eval())
    frames = frame_settings()  # 8 frames of the family's F x F .. 2F x 2F (tests/family.py)
    samples = [s for s in load_dataset(data_json) if s.data_type == "video"][rank * 2:rank * 2 + 2]  # each rank its own
    media = [Media(video=load_video(s.media_path, frames)) for s in samples]
    inputs = encode_prompts(processor, [s.messages() for s in samples], media)
    special = special_tokens(whole.config, processor.tokenizer)
    args = dict(seeds=[row_seed(3, "rollout", 0, rank * 2 + p, g) for p in range(2) for g in range(2)], max_new_tokens=12,
                temperature=1.0, top_p=0.95, eos_ids=special.eos_ids, pad_id=special.pad_id,
                suppress_ids=special.vision_ids, group_size=2, decoder="hf")
    reference = generate(whole, processor.tokenizer, inputs, **args)
    before = gathers[0]
    with rollout_weights(sharded) as gen:
        entry = gathers[0] - before
        gathered = generate(gen, processor.tokenizer, inputs, **args)
        inside = gathers[0] - before - entry
    # after the block, a no-grad pass that calls the vision tower outside the root's forward, as the probes do
    # (the tower's patch embedding and merger belong to the root unit here); the reference wrapped the same way
    plan = ForwardPlan(length_buckets=False)  # the same forward calls on both ranks without a lockstep
    whole_logp = reference_logprobs(whole, inputs, reference, 2, plan)
    policy_logp = reference_logprobs(sharded, inputs, reference, 2, plan)
    ref = R.prepare_reference(load_model(model_dir), SimpleNamespace(distributed_type="DistributedType.MULTI_CPU"),
                              fsdp_wrap=like_accelerate)
    ref_logp = reference_logprobs(ref, inputs, reference, 2, plan)
    before = gathers[0]
    synced = generate(sharded, processor.tokenizer, inputs, synced_gpus=True, **args)  # --gather_for_generation false
    return {"policy_pass_same": torch.allclose(policy_logp, whole_logp, atol=1e-5),
            "reference_same": torch.allclose(ref_logp, whole_logp, atol=1e-5),"units": sum(1 for m in sharded.modules() if hasattr(m, "unshard")), "entry": entry, "inside": inside,
            "synced_gathers": gathers[0] - before, "lengths": reference.lengths.tolist(),
            "gathered_same": torch.equal(gathered.ids, reference.ids), "synced_same": torch.equal(synced.ids, reference.ids)}


def _fsdp_worker(rank: int, folder: str, model_dir: str = "", data_json: str = "") -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    gathers = [0]
    real = dist.all_gather_single

    def counting(*a, **k):
        gathers[0] += 1
        return real(*a, **k)

    dist.all_gather_single = counting
    whole, model = Net(), Net()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(rank))

    def train_step() -> int:
        before = gathers[0]
        model(x).pow(2).mean().backward()
        model.zero_grad()
        return gathers[0] - before

    out: dict = {"train_before": [train_step(), train_step()]}
    before = gathers[0]
    with rollout_weights(model) as gen, torch.no_grad():
        out["entry"] = gathers[0] - before
        full_inside = [tuple(p.shape) == tuple(q.shape) and not hasattr(p, "to_local")
                       for p, q in zip(gen.parameters(), whole.parameters())]
        outs = [gen(x) for _ in range(5)]
        out["inside"] = gathers[0] - before - out["entry"]
    out["full_inside"] = all(full_inside)
    out["same_numbers"] = all(torch.allclose(o, whole(x), atol=1e-6) for o in outs)
    out["sharded_after"] = all(p.to_local().shape[0] == q.shape[0] // 2
                               for p, q in zip(model.layers.parameters(), whole.layers.parameters()))
    out["train_after"] = [train_step(), train_step()]

    def wrap(module):
        for layer in module.layers:
            fully_shard(layer)
        return fully_shard(module)

    ref = R.prepare_reference(Net(), SimpleNamespace(distributed_type="DistributedType.MULTI_CPU"), fsdp_wrap=wrap)
    per_forward = []
    for _ in range(2):
        before = gathers[0]
        with torch.no_grad():
            ref(x)
        per_forward.append(gathers[0] - before)
    out["reference_forwards"] = per_forward
    out["reference_sharded"] = all(p.to_local().shape[0] == q.shape[0] // 2
                                   for p, q in zip(ref.layers.parameters(), whole.layers.parameters()))
    out["reference_sharded"] &= all(p.shape == q.shape for p, q in zip(ref.head.parameters(), whole.head.parameters()))
    if model_dir:
        out["tiny"] = _tiny_rollouts(rank, model_dir, data_json, gathers)
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_unshards_once_for_the_rollout_and_reshards_as_before(tmp_path, tiny_setup):
    import torch.multiprocessing as mp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    mp.spawn(_fsdp_worker, args=(str(tmp_path), str(tiny_setup.model_dir), str(tiny_setup.train_json)), nprocs=2, join=True)
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["entry"] == 4  # one all-gather per unit (3 layers + the root), all before the first forward
        assert out["inside"] == 0  # five forwards, no collective
        assert out["full_inside"] and out["same_numbers"] and out["sharded_after"]
        # after the block each unit is as a forward leaves it: the layers sharded, the root (which does not
        # reshard after its forward) whole until the backward; then training gathers exactly as before
        assert out["train_after"] == [out["train_before"][1] - 1, out["train_before"][1]], out
        # the reference: its layers resharded after each forward (no backward to keep them for), the root's own
        # parameters gathered once when it was prepared and kept
        assert out["reference_forwards"] == [3, 3] and out["reference_sharded"], out
        # the tiny VLM: one all-gather per unit for the whole rollout, none while decoding, the whole model's
        # tokens; kept sharded (synced processes, every token's forward gathering) the same tokens too
        tiny = out["tiny"]
        assert tiny["entry"] == tiny["units"] and tiny["inside"] == 0, tiny
        assert tiny["gathered_same"] and tiny["synced_same"], tiny
        assert tiny["policy_pass_same"] and tiny["reference_same"], tiny
        assert tiny["synced_gathers"] > 12, tiny  # a gather per decoder layer at each of the 12 tokens
    lengths = [json.loads((tmp_path / f"rank{r}.json").read_text())["tiny"]["lengths"] for r in range(2)]
    assert lengths[0] != lengths[1]  # the processes' rows ended at different steps (what synced_gpus must cover)


@pytest.mark.slow
def test_two_fsdp2_processes_with_a_sharded_reference_equal_one_process(tiny_setup, tmp_path):
    """The whole trainer under FSDP2 over two CPU processes (accelerate launch, configs/accelerate/fsdp-cpu-2proc.yaml):
    the reference model sharded like the policy (its own fully_shard units) and one gather per rollout; its KL,
    loss, rewards and gradient norm over two steps are one process's with both prompts (1e-5)."""
    import socket
    import subprocess

    root = Path(__file__).resolve().parents[1]
    run = ["--max_steps", "2", "--num_generations", "2", "--max_completion_length", "8", "--learning_rate", "1e-3",
           "--token_selection", "none", "--beta", "0.04", "--reward_funcs", "tests.reward_fixtures:count_e"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(PYTHONPATH=str(root) + os.pathsep + env.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    launches = {
        "fsdp": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(root / "configs" / "accelerate" / "fsdp-cpu-2proc.yaml"), "--main_process_port", port, "-m", "video_ktr",
                 "train", *tiny_setup.train_args(tmp_path / "fsdp", *run, "--per_device_train_batch_size", "1")],
        "one": [sys.executable, "-m", "video_ktr", "train",
                *tiny_setup.train_args(tmp_path / "one", *run, "--per_device_train_batch_size", "2")],
    }
    metrics = {}
    for name, cmd in launches.items():
        proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        metrics[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    info = json.loads((tmp_path / "fsdp" / "run_info.json").read_text())
    assert (info["distributed"], info["world_size"], info["sharded_parameters"]) == ("FSDP2", 2, True)
    assert metrics["fsdp"][1]["kl"] > 0  # the second step's policy has moved away from the reference
    for sharded, whole in zip(metrics["fsdp"], metrics["one"]):
        for key in ("loss", "kl", "reward", "grad_norm", "completion_length"):
            assert sharded[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), (key, sharded, whole)
