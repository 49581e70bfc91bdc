"""The colocated vLLM rollout's contract (model/vllm_rollout.py), with a stand-in engine: vLLM cannot run here.

The stand-in records every call; its ``generate`` builds each request's prompt tokens the way vLLM's
processor would (the transformers processor run on the request's prompt text, frames and processor
kwargs), so the test also shows the requests carry everything needed to reproduce the trainer's prompt.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from video_ktr.model.adapters import adapter_for
from video_ktr.model.inputs import encode_prompts
from video_ktr.model.loading import special_tokens
from video_ktr.model.sampling import row_seed
from video_ktr.model.vllm_rollout import (
    VLLMRollout,
    VLLMRolloutError,
    completions_from_tokens,
    policy_weights,
)


class StandInParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class StandInVLLMModel:
    def __init__(self, log):
        self.log = log
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        self.log.append(("load_weights", len(weights)))
        for name, tensor in weights:
            self.loaded[name] = tensor.clone()


class StandInLLM:
    """Records calls; generate() samples from each row's seed and prompts like vLLM's processor would."""

    def __init__(self, processor, *, extra_prompt_token: bool = False):
        self.processor = processor
        self.log: list[tuple] = []
        self.model = StandInVLLMModel(self.log)
        self.requests = None
        self.params = None
        self.extra_prompt_token = extra_prompt_token

    def sleep(self, level):
        self.log.append(("sleep", level))

    def wake_up(self, tags=None):
        self.log.append(("wake_up", tuple(tags)))

    def apply_model(self, func):
        self.log.append(("apply_model",))
        return [func(self.model)]

    def reset_prefix_cache(self):
        self.log.append(("reset_prefix_cache",))

    def _prompt_ids(self, request):
        from transformers.video_utils import VideoMetadata

        kwargs = {"text": [request["prompt"]], "return_tensors": "pt"}
        mm = request.get("multi_modal_data", {})
        proc = {k: v for k, v in request.get("mm_processor_kwargs", {}).items() if k != "fps"}
        if "video" in mm:
            frames, metadata = mm["video"][0]
            meta = {k: metadata[k] for k in ("total_num_frames", "fps", "frames_indices", "duration")}
            kwargs.update(videos=[frames], video_metadata=[VideoMetadata(**meta)], videos_kwargs=proc)
        elif "image" in mm:
            kwargs.update(images=[mm["image"]], images_kwargs=proc)
        ids = self.processor(**kwargs)["input_ids"][0].tolist()
        return ids + [7] if self.extra_prompt_token else ids

    def generate(self, requests, sampling_params=None, use_tqdm=True):
        self.log.append(("generate", len(requests)))
        self.requests, self.params = requests, sampling_params
        outs = []
        for req, sp in zip(requests, sampling_params):
            g = torch.Generator().manual_seed(sp.kwargs["seed"])
            n = int(torch.randint(3, sp.kwargs["max_tokens"] + 4, (1,), generator=g))  # some longer than allowed
            tokens = torch.randint(40, 300, (n,), generator=g).tolist()
            if n % 2:
                tokens[n // 2] = sp.kwargs["stop_token_ids"][0]  # an end-of-turn token in the middle
            outs.append(SimpleNamespace(prompt_token_ids=self._prompt_ids(req),
                                        outputs=[SimpleNamespace(token_ids=tokens, text="ignored")]))
        return outs


@pytest.fixture(scope="module")
def batch(tiny_setup, tiny_model):
    model, processor = tiny_model
    samples = tiny_setup.samples()
    picked = [next(s for s in samples if s.data_type == "video"), next(s for s in samples if s.data_type == "image")]
    media = [tiny_setup.media(s) for s in picked]
    messages = [s.messages() for s in picked]
    inputs = encode_prompts(processor, messages, media)
    return messages, media, inputs, special_tokens(model.config, processor.tokenizer)


def _generate(engine, model, batch, version, G=3, **kw):
    messages, media, inputs, special = batch
    seeds = [row_seed(5, "rollout", version, p, g) for p in range(len(messages)) for g in range(G)]
    args = dict(seeds=seeds, group_size=G, max_new_tokens=12, temperature=1.0, top_p=0.9, eos_ids=special.eos_ids,
                pad_id=special.pad_id, suppress_ids=special.vision_ids)
    args.update(kw)
    return engine.generate(model, version, messages, media, inputs, engine.processor.tokenizer, **args), seeds


def test_rollout_wakes_pushes_generates_and_sleeps_in_order(tiny_model, batch):
    model, processor = tiny_model
    llm = StandInLLM(processor)
    engine = VLLMRollout(llm, processor, sampling_params_cls=StandInParams, sleep_mode=True)
    engine.sleep()  # as start() leaves it
    _generate(engine, model, batch, version=0)
    n_params = len(list(model.named_parameters()))
    assert llm.log == [("sleep", 1), ("wake_up", ("weights",)), ("apply_model",), ("load_weights", n_params),
                       ("reset_prefix_cache",), ("wake_up", ("kv_cache",)), ("generate", 6), ("sleep", 1)]
    # the same policy version again (gradient accumulation): no second push
    llm.log.clear()
    _generate(engine, model, batch, version=0)
    assert llm.log == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",)), ("generate", 6), ("sleep", 1)]
    # without sleep mode: no sleep / wake calls, still one push per version
    llm2 = StandInLLM(processor)
    plain = VLLMRollout(llm2, processor, sampling_params_cls=StandInParams, sleep_mode=False)
    _generate(plain, model, batch, version=3)
    _generate(plain, model, batch, version=3)
    assert [c[0] for c in llm2.log] == ["apply_model", "load_weights", "reset_prefix_cache", "generate", "generate"]


def test_pushed_weights_are_the_policys_after_each_step(tiny_model, batch):
    model, processor = tiny_model
    llm = StandInLLM(processor)
    engine = VLLMRollout(llm, processor, sampling_params_cls=StandInParams, sleep_mode=True)
    _generate(engine, model, batch, version=0)
    params = dict(model.named_parameters())
    assert set(llm.model.loaded) == set(params)
    assert all(torch.equal(llm.model.loaded[k], v) for k, v in params.items())
    assert any(k.startswith("model.language_model.") for k in params) and any(k.startswith("model.visual.") for k in params)
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    saved = params[name].detach().clone()
    try:
        with torch.no_grad():
            params[name].add_(1.0)  # an optimizer step
        _generate(engine, model, batch, version=1)
        assert torch.equal(llm.model.loaded[name], saved + 1.0)
    finally:
        with torch.no_grad():
            params[name].copy_(saved)


def test_requests_carry_the_trainers_prompts_frames_and_seeds(tiny_model, batch):
    model, processor = tiny_model
    messages, media, inputs, special = batch
    llm = StandInLLM(processor)
    engine = VLLMRollout(llm, processor, sampling_params_cls=StandInParams, sleep_mode=True)
    comps, seeds = _generate(engine, model, batch, version=0, G=3)
    reqs = llm.requests
    assert len(reqs) == 6 and reqs[0] is reqs[1] is reqs[2] and reqs[3]["prompt"] != reqs[0]["prompt"]
    text = processor.apply_chat_template(messages[0], add_generation_prompt=True, tokenize=False)
    assert reqs[0]["prompt"] == text
    frames, metadata = reqs[0]["multi_modal_data"]["video"][0]
    assert torch.equal(torch.from_numpy(frames), media[0].video.frames.permute(0, 2, 3, 1))
    assert metadata["do_sample_frames"] is False and reqs[0]["mm_processor_kwargs"]["do_sample_frames"] is False
    assert reqs[3]["multi_modal_data"]["image"] is media[1].image
    # the processor bounds hold exactly these frame / image sizes (as inputs.processor_call's do), in the family's
    # terms: one frame's area (Qwen2/2.5-VL), frames x height x width (Qwen3-VL, whose processor bounds the video)
    t, (h, w) = media[0].video.frames.shape[0], media[0].video.frames.shape[-2:]
    area = h * w * (t if adapter_for(model).name.startswith("qwen3") else 1)
    assert reqs[0]["mm_processor_kwargs"]["size"] == {"shortest_edge": area, "longest_edge": area}
    iw, ih = media[1].image.size
    assert reqs[3]["mm_processor_kwargs"]["size"] == {"shortest_edge": iw * ih, "longest_edge": iw * ih}
    # the stand-in's processor run on each request gave back the trainer's unpadded prompt tokens (else it raised)
    kw = [p.kwargs for p in llm.params]
    assert [k["seed"] for k in kw] == seeds
    assert all(k["n"] == 1 and k["temperature"] == 1.0 and k["top_p"] == 0.9 and k["max_tokens"] == 12 for k in kw)
    assert kw[0]["stop_token_ids"] == list(special.eos_ids)
    assert set(kw[0]["logit_bias"]) == set(special.vision_ids) and set(kw[0]["logit_bias"].values()) == {-100.0}
    greedy = engine.sampling_params([1], max_new_tokens=4, temperature=0.0, top_p=0.5, eos_ids=special.eos_ids)
    assert greedy[0].kwargs["top_p"] == 1.0 and greedy[0].kwargs["temperature"] == 0.0


def test_vllm_tokens_become_completions_like_the_transformers_path(tiny_model, batch):
    model, processor = tiny_model
    _, _, _, special = batch
    llm = StandInLLM(processor)
    engine = VLLMRollout(llm, processor, sampling_params_cls=StandInParams, sleep_mode=True)
    comps, _ = _generate(engine, model, batch, version=0)
    assert comps.ids.shape[0] == 6 and comps.ids.shape[1] <= 12  # cut at max_new_tokens
    eos = special.eos_ids[0]
    for r in range(6):
        n = int(comps.lengths[r])
        row = comps.ids[r].tolist()
        assert all(t == special.pad_id for t in row[n:])
        assert eos not in row[: n - 1]  # valid up to and including the first end-of-turn token
        assert comps.texts[r] == processor.tokenizer.decode(row[:n], skip_special_tokens=True)
    assert (comps.lengths < comps.ids.shape[1]).any()  # some rows ended early
    direct = completions_from_tokens([[5, eos, 9], [6, 7]], processor.tokenizer, eos_ids=special.eos_ids,
                                     pad_id=special.pad_id)
    assert direct.ids.tolist() == [[5, eos, special.pad_id], [6, 7, special.pad_id]]
    assert direct.valid.tolist() == [[True, True, False], [True, True, False]]


def test_a_prompt_vllm_expands_differently_is_an_error(tiny_model, batch):
    model, processor = tiny_model
    engine = VLLMRollout(StandInLLM(processor, extra_prompt_token=True), processor, sampling_params_cls=StandInParams)
    with pytest.raises(VLLMRolloutError, match="prompt 0 differs"):
        _generate(engine, model, batch, version=0)
    assert engine.llm.log[-1] == ("sleep", 1)  # the engine went back to sleep all the same


def test_peft_names_are_mapped_to_the_base_models():
    class Peft(torch.nn.Module):
        prefix = "lora_"

        def __init__(self):
            super().__init__()
            self.base_model = torch.nn.Module()
            self.base_model.model = torch.nn.Module()
            self.base_model.model.q = torch.nn.Module()
            self.base_model.model.q.base_layer = torch.nn.Linear(2, 2)
            self.base_model.model.q.lora_A = torch.nn.Linear(2, 1)

        def merge_adapter(self):
            pass

    names = [n for n, _ in policy_weights(Peft())]
    assert names == ["q.weight", "q.bias"]


def test_trainer_with_use_vllm_trains_on_the_engines_tokens(tiny_setup, tmp_path, monkeypatch):
    """--use_vllm in the GRPO step: the rollout comes from the (stand-in) engine, one weight push per optimizer
    step, and the rest of the step (rewards, probes, loss) runs on those tokens."""
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.config import parse_args

    engines = []

    def start(self):
        engine = VLLMRollout(StandInLLM(self.processor), self.processor, sampling_params_cls=StandInParams)
        engine.sleep()
        engines.append(engine)
        return engine

    monkeypatch.setattr(KTRTrainer, "_start_vllm", start)
    cfg = parse_args(TrainConfig, tiny_setup.train_args(tmp_path / "out", "--use_vllm", "--max_steps", "2",
                                                        "--token_selection", "all", "--probe_all_groups"))
    trainer = KTRTrainer(cfg)
    seen = []
    original = trainer.vllm.generate

    def generate(*a, **kw):
        comps = original(*a, **kw)
        seen.append(comps)
        return comps

    trainer.vllm.generate = generate
    m1 = trainer.train_step()
    m2 = trainer.train_step()
    log = engines[0].llm.log
    assert [c[0] for c in log].count("load_weights") == 2  # versions 0 and 1: a push after the optimizer step
    assert [c[0] for c in log].count("generate") == 2 and log[-1] == ("sleep", 1)
    assert len(seen) == 2 and seen[0].ids.shape[0] == 4 * 2  # 2 prompts x 4 completions
    assert abs(m1["completion_length"] - float(seen[0].lengths.float().mean())) < 1e-6
    assert all(v == v for v in (m1["loss"], m2["loss"]))  # finite losses scored on vLLM's tokens
    pushed = engines[0].llm.model.loaded
    name = next(n for n, _ in trainer.model.named_parameters() if n.endswith("down_proj.weight"))
    assert torch.equal(pushed[name], dict(trainer.model.named_parameters())[name].detach())  # the policy's weights


def test_use_vllm_settings_are_checked():
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.config import from_dict

    base = {"model_name_or_path": "m", "dataset": "d.json", "output_dir": "o"}
    with pytest.raises(ValueError, match="temporal_grpo"):
        from_dict(TrainConfig, {**base, "use_vllm": True, "temporal_grpo": True}, source="test")
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization"):
        from_dict(TrainConfig, {**base, "use_vllm": True, "vllm_gpu_memory_utilization": 1.5}, source="test")
    with pytest.raises(ValueError, match="rollout_decoder"):
        from_dict(TrainConfig, {**base, "rollout_decoder": "fast"}, source="test")
