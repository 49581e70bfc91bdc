"""Training diagnostics: the gradient decomposition against a direct computation on a toy LM, selection
overlaps and positions, token records, and a 2-step trainer run with --diagnostics_steps / --log_tokens_every."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from video_ktr.core.diagnostics import (
    LinearUses,
    TokenRecord,
    gradient_decomposition,
    last_decoder_layer,
    output_head,
    overlap_counts,
    position_sums,
    read_token_records,
    record_linear_calls,
    relative_positions,
    token_records,
    token_texts,
    write_token_records,
)
from video_ktr.core.loss import LossSpec, grpo_loss

# ---------------------------------------------------------------------------- a toy LM

V, D, B, T = 13, 5, 6, 7


class ToyLM(torch.nn.Module):
    """embed -> one "decoder layer" -> final layer -> LM head tied to the embedding (float64)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(V, D, generator=g, dtype=torch.float64))
        self.first = torch.nn.Linear(D, D, dtype=torch.float64)
        self.last = torch.nn.Linear(D, D, dtype=torch.float64)
        self.head = torch.nn.Linear(D, V, bias=False, dtype=torch.float64)
        self.head.weight = self.embed  # tied, as Qwen2.5-VL-3B and the tiny test model
        with torch.no_grad():
            for p in (*self.first.parameters(), *self.last.parameters()):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.last(torch.tanh(self.first(self.embed[ids]))))

    def logp(self, ids: torch.Tensor, targets: torch.Tensor, head_weight: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden(ids)
        logits = self.head(h) if head_weight is None else F.linear(h, head_weight)
        return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)


def toy_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([7, 5, 7, 3, 6, 1])
    valid = torch.arange(T)[None, :] < lengths[:, None]
    key = (torch.rand(B, T, generator=g) < 0.4) & valid
    key[0, :2] = True
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    ref_logp = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1).gather(-1, targets[..., None]).squeeze(-1)
    return ids, targets, valid, key, advantages, ref_logp


def direct_gradients(model: ToyLM, batch, mask: torch.Tensor, **kw) -> torch.Tensor:
    """The gradient of the loss on one token set, from its own forward and backward, as one flat vector:
    the last layer's parameters, then the head weight as an UNTIED copy (the head's use only)."""
    ids, targets, valid, _, advantages, ref_logp = batch
    head = model.embed.detach().clone().requires_grad_(True)
    logp = model.logp(ids, targets, head_weight=head)
    loss = grpo_loss(logp, advantages, mask, LossSpec(**kw), valid=valid, ref_logp=ref_logp)
    params = [*model.last.parameters(), head]
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1) for g in grads[:-1]]), grads[-1].reshape(-1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("kw", [
    dict(beta=0.04),  # the released form: KL and normalisation on key tokens
    dict(beta=0.1, kl_on="valid", normalize_by="valid"),
    dict(beta=0.0, loss_type="dapo"),
])
def test_gradient_decomposition_equals_direct_computation_on_a_toy_lm(kw):
    model = ToyLM()
    batch = toy_batch()
    ids, targets, valid, key, advantages, ref_logp = batch
    with record_linear_calls(model.head) as head_calls:
        logp = model.logp(ids, targets)
    groups = {"last_layer": list(model.last.parameters()), "lm_head": [head_calls]}
    got = gradient_decomposition(logp, advantages, key, valid, groups, LossSpec(**kw), ref_logp=ref_logp)

    sets = {"key": key & valid, "masked": valid & ~key, "full": valid}
    want = {name: direct_gradients(model, batch, m, **kw) for name, m in sets.items()}
    for name in sets:
        layer, head = want[name]
        assert got[f"grad_norm_{name}_last_layer"] == pytest.approx(float(layer.norm()), rel=1e-10)
        assert got[f"grad_norm_{name}_lm_head"] == pytest.approx(float(head.norm()), rel=1e-10)
        assert got[f"grad_norm_{name}"] == pytest.approx(float(torch.cat([layer, head]).norm()), rel=1e-10)
    for name in ("key", "masked"):
        (layer, head), (full_layer, full_head) = want[name], want["full"]
        assert got[f"cos_{name}_full_last_layer"] == pytest.approx(_cos(layer, full_layer), abs=1e-10)
        assert got[f"cos_{name}_full_lm_head"] == pytest.approx(_cos(head, full_head), abs=1e-10)
        assert got[f"cos_{name}_full"] == pytest.approx(_cos(torch.cat([layer, head]), torch.cat([full_layer, full_head])), abs=1e-10)
    # the numbers are not degenerate: the three sets give different gradients
    assert got["grad_norm_key"] > 0 and got["grad_norm_masked"] > 0
    assert abs(got["cos_key_full"]) < 0.999 and abs(got["cos_masked_full"]) < 0.999


def test_head_gradient_is_the_heads_use_only_not_the_tied_embedding():
    # differentiating the tied parameter itself would add the input-embedding path
    model = ToyLM()
    ids, targets, valid, key, advantages, ref_logp = toy_batch()
    with record_linear_calls(model.head) as head_calls:
        logp = model.logp(ids, targets)
    got = gradient_decomposition(logp, advantages, key, valid, {"lm_head": [head_calls]}, spec=LossSpec(beta=0.0))
    loss = grpo_loss(logp, advantages, valid, valid=valid, spec=LossSpec(beta=0.0))
    (tied,) = torch.autograd.grad(loss, [model.embed], retain_graph=True)
    assert abs(got["grad_norm_full_lm_head"] - float(tied.norm())) > 1e-6


def test_decomposition_does_not_touch_grad_and_the_training_backward_is_unchanged():
    batch = toy_batch()
    ids, targets, valid, key, advantages, ref_logp = batch

    def train_grads(diagnose: bool) -> list[torch.Tensor]:
        model = ToyLM()
        with record_linear_calls(model.head) as calls:
            logp = model.logp(ids, targets)
        loss = grpo_loss(logp, advantages, key, valid=valid, ref_logp=ref_logp, spec=LossSpec(beta=0.04))
        if diagnose:
            gradient_decomposition(logp, advantages, key, valid, {"last_layer": list(model.last.parameters()), "lm_head": [calls]},
                                   ref_logp=ref_logp, spec=LossSpec(beta=0.04))
            assert all(p.grad is None for p in model.parameters())
        loss.backward()  # the graph is still there
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(train_grads(False), train_grads(True)):
        assert torch.equal(a, b)


def test_vanilla_selection_has_no_masked_gradient():
    model = ToyLM()
    ids, targets, valid, _, advantages, _ = toy_batch()
    logp = model.logp(ids, targets)
    got = gradient_decomposition(logp, advantages, valid.clone(), valid, {"last_layer": list(model.last.parameters())}, spec=LossSpec(beta=0.0))
    assert got["grad_norm_masked"] == 0.0 and got["cos_masked_full"] == 0.0  # undefined cosine: reported as 0
    assert got["grad_norm_key"] == pytest.approx(got["grad_norm_full"], rel=1e-12)
    assert got["cos_key_full"] == pytest.approx(1.0, abs=1e-12)


def test_linear_uses_sum_over_calls():
    # the head called in two chunks (policy_chunk_rows): the gradient is the sum of both calls'
    model = ToyLM()
    ids, targets, valid, key, advantages, _ = toy_batch()
    with record_linear_calls(model.head) as calls:
        logp = torch.cat([model.logp(ids[:3], targets[:3]), model.logp(ids[3:], targets[3:])])
    assert len(calls.calls) == 2
    got = gradient_decomposition(logp, advantages, key, valid, {"lm_head": [calls]}, spec=LossSpec(beta=0.0))
    _, head = direct_gradients(model, (ids, targets, valid, key, advantages, None), valid, beta=0.0)
    assert got["grad_norm_full"] == pytest.approx(float(head.norm()), rel=1e-10)
    assert isinstance(calls, LinearUses)


def test_a_target_outside_the_graph_is_refused_not_reported_as_zero():
    model = ToyLM()
    ids, targets, valid, key, advantages, _ = toy_batch()
    logp = model.logp(ids, targets)
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="not used by the loss's graph"):
        gradient_decomposition(logp, advantages, key, valid, {"last_layer": [*model.last.parameters(), unused]}, spec=LossSpec(beta=0.0))


def test_sharded_parameters_are_detected():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from video_ktr.training.distributed import sharded_parameters

    def acc(kind, stage=None):
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))

    assert sharded_parameters(acc(DistributedType.FSDP)) and sharded_parameters(acc(DistributedType.DEEPSPEED, 3))
    assert not sharded_parameters(acc(DistributedType.DEEPSPEED, 2)) and not sharded_parameters(acc(DistributedType.MULTI_CPU))
    assert not sharded_parameters(acc(DistributedType.NO))


# ---------------------------------------------------------------------------- selection statistics


def test_overlap_counts_are_jaccard_counts_with_temporal_on_video_rows():
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    e = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    v = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)  # [1, 3] is not valid
    t = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    rows = torch.tensor([True, False])  # row 1 is an image: no temporal set
    got = overlap_counts({"entropy": e, "visual": v, "temporal": t, "key": e | v | t}, valid, rows)
    assert got == {
        "jaccard_entropy_visual": (2, 4),  # both rows: {(0,1), (1,0)} of {(0,0), (0,1), (0,2), (1,0)}
        "jaccard_entropy_temporal": (0, 4),  # row 0 only: {} of {(0,0), (0,1), (0,2), (0,3)}
        "jaccard_visual_temporal": (1, 3),  # row 0 only: {(0,2)} of {(0,1), (0,2), (0,3)}
    }


def test_relative_positions_and_position_sums():
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    pos = relative_positions(valid)
    assert pos[0].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert pos[1, :2].tolist() == [0.0, 1.0] and pos[2, 0] == 0.0
    key = torch.tensor([[0, 0, 0, 1, 1], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    got = position_sums({"key": key, "entropy": key}, valid)
    assert got["position_key"] == (1.75, 4)  # 0.75 + 1 + 0 + 0
    assert got["position_nonkey"] == (1.75, 4)  # 0 + 0.25 + 0.5 + 1
    assert got["position_valid"] == (3.5, 8)


# ---------------------------------------------------------------------------- token records


class ByteLevelTokenizer:
    """convert_ids_to_tokens of a byte-level BPE: id -> piece."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]


def test_token_texts_decode_byte_level_pieces():
    # "Ġthe" = " the"; "Ċ" = newline; "é" = bytes C3 A9 = pieces "Ã" "©" (a character split over 2 tokens)
    tok = ByteLevelTokenizer(["The", "Ġthe", "Ċ", "Ã", "©", "<|im_end|>", "▁x"])
    assert token_texts(tok, [0, 1, 2, 3, 4, 5]) == ["The", " the", "\n", "", "é", "<|im_end|>"]
    assert token_texts(tok, [3]) == ["\ufffd"]  # an unfinished character at the end is shown as such
    assert token_texts(tok, [6]) == [" x"]  # SentencePiece pieces keep their text


def test_token_texts_join_to_the_decoded_completion(tiny_setup):
    from video_ktr.model.loading import load_processor

    tokenizer = load_processor(str(tiny_setup.model_dir)).tokenizer
    text = "<think>Le café ouvre à 9h, the 2 clocks.\n</think> <answer>B</answer><|im_end|>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert "".join(token_texts(tokenizer, ids)) == tokenizer.decode(ids) == text


def _records(**over):
    B2, T2 = 2, 4
    kw = dict(
        step=3, problem_ids=["p0", "p0"], kinds=["count", "count"], data_types=["video", "image"],
        tokenizer=ByteLevelTokenizer(["a", "Ġb", "c", "Ċ"]), completion_ids=torch.tensor([[0, 1, 2, 3], [1, 1, 0, 0]]),
        valid=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool), rewards=torch.tensor([1.0, 0.123456]),
        advantages=torch.tensor([0.7071067, -0.7071067]),
        masks={"entropy": torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool),
               "key": torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)},
        entropy=torch.tensor([[0.123456, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]]),
        visual=torch.full((B2, T2), -0.5), temporal=torch.tensor([[0.1, float("nan"), 0.3, 0.4], [9.0, 9.0, 9.0, 9.0]]),
        temporal_rows=torch.tensor([True, False]),
    )
    kw.update(over)
    return token_records(**kw)


def test_token_records_round_trip(tmp_path):
    records = _records()
    a, b = records
    assert a.tokens == ["a", " b", "c", "\n"] and b.tokens == [" b", " b", "a"]  # valid tokens only
    assert a.entropy[0] == 0.1235 and b.reward == 0.1235 and a.advantage == 0.7071
    assert a.temporal == [0.1, None, 0.3, 0.4] and b.temporal is None  # image row: not computed
    assert a.selected == {"entropy": [True, False, False, False], "key": [True, False, False, True]}
    path = tmp_path / "tokens.jsonl"
    write_token_records(path, records)
    write_token_records(path, _records(step=4))
    back = read_token_records(path)
    assert back == records + _records(step=4)
    assert all(isinstance(r, TokenRecord) for r in back)
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_token_records(tmp_path / "bad.jsonl")


def test_finds_the_last_decoder_layer_and_the_head(tiny_model):
    model, _ = tiny_model
    layer = last_decoder_layer(model)
    assert layer is model.model.language_model.layers[-1]
    assert output_head(model) is model.lm_head


# ---------------------------------------------------------------------------- trainer runs

REWARDS = ["--reward_funcs", "accuracy,format,tests.reward_fixtures:count_e"]
BASE = ["--max_steps", "2", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", *REWARDS]
DIAG = ["--diagnostics_steps", "1", "--log_tokens_every", "1"]
RUNS = {
    "all": ["--token_selection", "all", *DIAG],
    "none": ["--token_selection", "none", *DIAG],
    "all-plain": ["--token_selection", "all"],
}
GRADIENT_KEYS = [f"{m}{g}" for m in ("grad_norm_key", "grad_norm_masked", "grad_norm_full", "cos_key_full", "cos_masked_full")
                 for g in ("", "_last_layer", "_lm_head")]


def diagnostics_run(tiny_setup, tmp_path_factory, name: str) -> Path:
    """A 2-step run, made once per session (test_report uses the same folders)."""
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.config import parse_args

    out = tmp_path_factory.getbasetemp() / "diagnostics-runs" / name
    if not (out / "model.safetensors").is_file():
        KTRTrainer(parse_args(TrainConfig, tiny_setup.train_args(out, *BASE, *RUNS[name]))).train()
    return out


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_diagnostics_run_logs_finite_diagnostics_and_tokens(tiny_setup, tmp_path_factory):
    out = diagnostics_run(tiny_setup, tmp_path_factory, "all")
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    keys = [*GRADIENT_KEYS, "loss_variance", "jaccard_entropy_visual", "jaccard_entropy_temporal", "jaccard_visual_temporal",
            "position_key", "position_nonkey", "position_entropy", "position_visual", "position_temporal", "position_valid",
            "time_diagnostics"]
    for m in metrics:
        missing = [k for k in keys if k not in m]
        assert not missing, missing
        assert all(isinstance(m[k], float) and math.isfinite(m[k]) for k in keys), m
        assert all(0 <= m[k] <= 1 for k in keys if k.startswith(("jaccard", "position")))
        assert all(-1 <= m[k] <= 1 for k in keys if k.startswith("cos"))
    assert any(m["grad_norm_key"] > 0 and m["grad_norm_masked"] > 0 for m in metrics)
    # tokens.jsonl: the first (only) micro-batch of each step, 2 prompts x 4 completions
    path = out / "tokens.jsonl"
    records = read_token_records(path)
    assert [r.step for r in records] == [1] * 8 + [2] * 8
    assert [r.to_json() for r in records] == path.read_text(encoding="utf-8").splitlines()  # round trip
    for r in records:
        n = len(r.tokens)
        assert 0 < n <= 16 and len(r.token_ids) == n and len(r.entropy) == n and len(r.visual) == n
        assert (r.temporal is None) == (r.data_type == "image")
        assert set(r.selected) == {"entropy", "visual", "temporal", "key"} and all(len(f) == n for f in r.selected.values())
        union = [any(r.selected[s][t] for s in ("entropy", "visual", "temporal")) for t in range(n)]
        assert union == r.selected["key"]
    for step, m in zip((1, 2), metrics):  # one micro-batch, one process: the records are the whole step
        flags = [f for r in records if r.step == step for f in r.selected["key"]]
        assert sum(flags) / len(flags) == pytest.approx(m["key_token_fraction"], abs=1e-12)
        assert len(flags) == pytest.approx(m["completion_length"] * 8)


def test_diagnostics_do_not_change_training(tiny_setup, tmp_path_factory):
    from safetensors.torch import load_file

    diag = diagnostics_run(tiny_setup, tmp_path_factory, "all")
    plain = diagnostics_run(tiny_setup, tmp_path_factory, "all-plain")
    for a, b in zip(read_metrics(diag), read_metrics(plain)):
        for k in ("loss", "grad_norm", "reward", "key_token_fraction", "loss_variance", "kl"):
            assert a[k] == b[k], k
        assert not any(k.startswith(("grad_norm_", "cos_", "jaccard_", "position_")) for k in b)
    pa, pb = load_file(str(diag / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not (plain / "tokens.jsonl").exists()


def test_vanilla_run_has_loss_variance_and_no_masked_gradient(tiny_setup, tmp_path_factory):
    out = diagnostics_run(tiny_setup, tmp_path_factory, "none")
    for m in read_metrics(out):
        assert math.isfinite(m["loss_variance"]) and m["key_token_fraction"] == 1.0
        assert m["grad_norm_masked"] == 0.0 and m["cos_masked_full"] == 0.0
        assert m["grad_norm_key"] == pytest.approx(m["grad_norm_full"], rel=1e-12)
        assert "position_nonkey" not in m  # no non-key token: left out, not reported as 0
        assert not any(k.startswith("jaccard") for k in m) and "entropy" not in m
    records = read_token_records(out / "tokens.jsonl")
    assert records and all(r.entropy is not None and r.visual is None and r.temporal is None for r in records)
    assert all(set(r.selected) == {"key"} and all(r.selected["key"]) for r in records)


def test_negative_diagnostics_steps_is_refused(tiny_setup, tmp_path):
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.config import parse_args

    with pytest.raises(SystemExit):
        parse_args(TrainConfig, tiny_setup.train_args(tmp_path, "--diagnostics_steps", "-1"))
