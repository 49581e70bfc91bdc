"""The stages of one GRPO-KTR step, each a function from plain values to plain values.

The recipe that calls them in order is :meth:`video_ktr.training.grpo.KTRTrainer.train_step`:

    batch -> rollout (sample_completions) -> rewards (score_rewards, tgrpo_bonus) -> advantages
    -> probes (probe_scores) and reference (reference_logprobs), no grad -> Rollout (frozen)
    -> policy log-probs (policy_logprobs, grad) -> selection (select_tokens) -> loss (micro_loss)

Shapes: P prompts, G completions each, N = P x G rows of Lc completion tokens. No stage keeps state;
what a pass runs fast or slow is a :class:`ForwardPlan`, decided once at set-up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from video_ktr.core.loss import LossSpec, grpo_loss, sequence_losses
from video_ktr.core.rewards import length_bonus, load_reward_function, temporal_bonus
from video_ktr.core.selection import SelectionSpec, random_mask_like, signal_masks
from video_ktr.core.weighting import WeightingSpec, soft_token_weights
from video_ktr.data.rows import Sample
from video_ktr.model.inputs import Media, select_prompts, sequence_inputs
from video_ktr.model.loading import SpecialTokens
from video_ktr.model.lockstep import Lockstep, lockstep_pass
from video_ktr.model.prefix import shared_prefix_logprobs
from video_ktr.model.probes import (
    frame_permutation,
    probe_logprobs,
    shuffled_prompts,
    temporal_probe_logprobs,
    visual_probe_logprobs,
)
from video_ktr.model.rollout import Completions, encode_visual_once, generate, pad_encoder_calls
from video_ktr.model.sampling import row_seed
from video_ktr.model.scoring import BUCKET_OVERHEAD_TOKENS, sequence_logprobs


@dataclass(frozen=True)
class ForwardPlan:
    """How the forward passes run: speed and memory only, never the numbers (tests pin each fast path against
    the plain one). Not user switches: :meth:`for_run` decides them once at set-up."""

    chunk_rows: int | None = None  # rows per probe / reference forward (None: all at once)
    policy_chunk_rows: int | None = None  # rows whose full-vocabulary logits exist at once in the policy pass
    shared_prefix: bool = True  # probe and reference passes run each prompt once for its G completions
    policy_shared_prefix: bool = True  # the policy pass too (with gradient checkpointing: per layer, prefix.py)
    length_buckets: bool = True  # completions run in buckets of similar length
    encode_visual_once: bool = True  # the policy pass runs the vision tower once per prompt
    rollout_shared_prefill: bool = True  # the rollout prefills each prompt once and repeats its cache
    probe_dtype: str = "weights"  # the probe passes' precision (probes.probe_precision): not exact when 'bfloat16'

    @property
    def bucket_overhead(self) -> int | None:
        return BUCKET_OVERHEAD_TOKENS if self.length_buckets else None

    def prefix_group(self, group_size: int) -> int | None:
        return group_size if self.shared_prefix else None

    @classmethod
    def for_run(cls, cfg: Any) -> ForwardPlan:
        """The plan of a run with TrainConfig ``cfg``: every fast path (the policy pass's shared prompt with
        gradient checkpointing too, per layer); ``cfg.plain_forwards``: the plain path everywhere (:meth:`plain`).
        The probes' precision is the user's ``--probe_dtype`` (not exact in bfloat16, so a choice)."""
        kept = {"chunk_rows": cfg.forward_batch_size, "policy_chunk_rows": cfg.policy_chunk_rows,
                "probe_dtype": cfg.probe_dtype}
        return cls.plain(**kept) if cfg.plain_forwards else cls(**kept)

    @classmethod
    def plain(cls, **kept: Any) -> ForwardPlan:
        """Every pass the plain way: each row carries its prompt and video, padded to the batch's longest;
        ``kept``: the chunk sizes and probe precision."""
        return cls(shared_prefix=False, policy_shared_prefix=False, length_buckets=False, encode_visual_once=False,
                   rollout_shared_prefill=False, **kept)


@dataclass(frozen=True)
class SamplingSpec:
    """How completions are sampled (the rollout's settings)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    decoder: Any = "auto"  # rollout.generate's decoder: 'auto' (static on CUDA), 'hf', 'static', a StaticDecoder
    synced: bool = False  # every process decodes until all are done (sharded forwards: training/rollout_weights.py)


@dataclass(frozen=True)
class Rewards:
    total: Tensor  # (N,) weighted sum of the components
    components: dict[str, Tensor]  # name -> (N,), per reward function and bonus


@dataclass(frozen=True)
class ProbeScores:
    """The probe passes' log-probs of the sampled tokens (no grad)."""

    probed_rows: Tensor  # (N,) bool: rows whose groups ran the probes (the others have advantage 0)
    visual: Tensor | None = None  # (N, Lc) log p_vis, 0 on rows not probed
    temporal: Tensor | None = None  # (N, Lc) log p_tmp, 0 off the temporal rows
    temporal_rows: Tensor | None = None  # (N,) bool: rows with a temporal probe (videos with a permutation)


@dataclass(frozen=True)
class Rollout:
    """Everything about one micro-batch that does not change across ``num_iterations`` passes."""

    samples: list[Sample]
    indices: list[int]  # dataset index of each prompt
    micro_step: int  # the data position it was drawn at (seeds its random streams)
    media: list[Media]  # each prompt's decoded video or image
    prompt_inputs: dict[str, Any]  # the P un-repeated prompts (for once-per-prompt vision)
    seq_inputs: dict[str, Any]  # the N prompt+completion rows, without pixel tensors
    completions: Completions
    rewards: Tensor  # (N,)
    components: dict[str, Tensor]  # per reward function, (N,)
    advantages: Tensor  # (N,)
    probes: ProbeScores
    ref_logp: Tensor | None = None  # (N, Lc)


# ---------------------------------------------------------------------------------------- rollout, rewards
def rollout_seeds(seed: int, stream: str, micro_step: int, indices: Sequence[int], count: int) -> list[int]:
    """One sampling seed per row: (seed, stream, data position, dataset row, completion index)."""
    return [row_seed(seed, stream, micro_step, idx, g) for idx in indices for g in range(count)]


def sample_completions(model: torch.nn.Module, tokenizer: Any, prompt_inputs: dict[str, Tensor], seeds: list[int], *,
                       group_size: int, sampling: SamplingSpec, special: SpecialTokens, plan: ForwardPlan) -> Completions:
    """``group_size`` completions per prompt, one seeded stream per row (rows of a prompt consecutive)."""
    return generate(
        model, tokenizer, prompt_inputs, seeds=seeds, max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature, top_p=sampling.top_p, eos_ids=special.eos_ids, pad_id=special.pad_id,
        suppress_ids=special.vision_ids, group_size=group_size, shared_prefill=plan.rollout_shared_prefill,
        decoder=sampling.decoder, synced_gpus=sampling.synced,
    )


RewardFn = tuple[str, Callable[..., Sequence[float]], float]  # (spec as given, function, weight)


def score_rewards(samples: list[Sample], comps: Completions, reward_fns: Sequence[RewardFn], group_size: int, *,
                  with_length_bonus: bool = False) -> Rewards:
    """R_i = sum_f w_f r_f(completion_i) (+ Video-R1's length bonus, counting real tokens)."""
    G = group_size
    rows = [s for s in samples for _ in range(G)]
    sols, types = [s.solution for s in rows], [s.problem_type for s in rows]
    components = {}
    total = torch.zeros(len(comps.texts))
    for spec, fn, weight in reward_fns:
        values = torch.tensor([float(v) for v in fn(comps.texts, sols, types, samples=rows)])
        if values.shape[0] != len(comps.texts) or not torch.isfinite(values).all():
            raise ValueError(f"reward function {spec!r} must return one finite float per completion")
        components[spec.split(":")[-1]] = values
        total += weight * values
    acc = accuracy_component(components)
    if with_length_bonus and acc is not None:
        bonus = [b for p in range(len(samples)) for b in length_bonus(
            acc[p * G:(p + 1) * G].tolist(), comps.lengths[p * G:(p + 1) * G].tolist())]
        components["length_bonus"] = torch.tensor(bonus)
        total = total + components["length_bonus"]
    return Rewards(total, components)


def accuracy_component(components: dict[str, Tensor]) -> Tensor | None:
    return components.get("accuracy", components.get("batch_accuracy_reward"))


def temporal_permutations(seed: int, micro_step: int, picked: Sequence[tuple[int, Sample]], media: Sequence[Media],
                          mode: str) -> dict[int, list[int]]:
    """prompt position -> its frame order for the temporal probe / T-GRPO (videos with more than one frame)."""
    perms = {}
    for p, ((idx, _), m) in enumerate(zip(picked, media)):
        if m.kind == "video":
            g = torch.Generator().manual_seed(row_seed(seed, "temporal", micro_step, idx))
            perm = frame_permutation(m.video.frames.shape[0], mode, g)
            if perm is not None:
                perms[p] = perm
    return perms


def tgrpo_bonus(model: torch.nn.Module, tokenizer: Any, processor: Any, rewards: Rewards, samples: list[Sample],
                prompt_inputs: dict[str, Tensor], media: list[Media], perms: dict[int, list[int]], *, seed: int,
                micro_step: int, indices: list[int], group_size: int, sampling: SamplingSpec, special: SpecialTokens,
                plan: ForwardPlan) -> Rewards:
    """Video-R1's T-GRPO bonus per prompt group: also sample G/2 completions on shuffled frames.

    Their streams are seeded like the rollout's ("tgrpo" stream). The component exists at every step
    (zeros without a video), so every process and every micro-batch reports the same metric names.
    Only processes with a multi-frame video sample: under ZeRO-3 / FSDP the caller gathers the weights
    first (training/rollout_weights.py), so these forwards are no collectives.
    """
    G, acc = group_size, accuracy_component(rewards.components)
    if acc is None:
        return rewards
    bonus = torch.zeros_like(rewards.total)
    if perms:
        rows, shuffled = shuffled_prompts(processor, prompt_inputs, media, perms)
        half = max(1, G // 2)
        seeds = rollout_seeds(seed, "tgrpo", micro_step, [indices[p] for p in rows], half)
        s_comps = sample_completions(model, tokenizer, shuffled, seeds, group_size=half, sampling=sampling,
                                     special=special, plan=plan)
        accuracy = load_reward_function("accuracy")
        for j, p in enumerate(rows):
            s_acc = accuracy(s_comps.texts[j * half:(j + 1) * half], [samples[p].solution] * half,
                             [samples[p].problem_type] * half)
            b = temporal_bonus(acc[p * G:(p + 1) * G].tolist(), [float(v) for v in s_acc])
            bonus[p * G:(p + 1) * G] = torch.tensor(b, dtype=bonus.dtype)
    return Rewards(rewards.total + bonus, {**rewards.components, "temporal_bonus": bonus})


# ---------------------------------------------------------------------------------------- probes, reference
def groups_to_probe(advantages: Tensor, num_prompts: int, *, every_group: bool) -> list[int]:
    """The prompt groups whose visual / temporal probes run: all of them, unless skipping is exact.

    A group whose advantages are all 0 (equal rewards) has no policy gradient; where its key tokens
    feed no other term (TrainConfig.zero_advantage_masks_matter) its probes cannot change the loss
    and are skipped. ``every_group``: that is not so, or the step records diagnostics or token records
    (which describe whole batches).
    """
    everything = list(range(num_prompts))
    if every_group:
        return everything
    informative = (advantages.view(num_prompts, -1) != 0).any(1).tolist()
    return [p for p in everything if informative[p]]


@torch.no_grad()
def probe_scores(model: torch.nn.Module, processor: Any, *, signals: Sequence[str], visual_probe: str,
                 prompt_inputs: dict[str, Any], seq_inputs: dict[str, Any], media: list[Media], comps: Completions,
                 perms: dict[int, list[int]], probed: list[int], group_size: int, plan: ForwardPlan,
                 lockstep: Lockstep | None = None) -> ProbeScores:
    """log p_vis and log p_tmp of the sampled tokens for the groups in ``probed`` (spec: algorithm.md).

    With a ``lockstep`` each probe pass makes as many forward calls on every process (model/lockstep.py):
    a process whose groups were all skipped, or without a permuted video, still enters the pass and pads.
    """
    G, P = group_size, prompt_inputs["input_ids"].shape[0]
    probed_rows = torch.zeros(P, dtype=torch.bool, device=comps.ids.device)
    probed_rows[probed] = True
    probed_rows = probed_rows.repeat_interleave(G)
    visual = temporal = temporal_rows = None
    if "visual" in signals:
        visual = torch.zeros(comps.ids.shape, device=comps.ids.device)
        with lockstep_pass(lockstep, model):
            if probed:
                rows = probed_rows.nonzero().squeeze(1)
                everything = len(probed) == P
                visual[rows] = visual_probe_logprobs(
                    model, visual_probe, completion_ids=comps.ids[rows], completion_valid=comps.valid[rows],
                    seq_inputs=seq_inputs if everything else select_prompts(seq_inputs, rows.tolist()),
                    prompt_inputs=prompt_inputs if everything else select_prompts(prompt_inputs, probed),
                    media=[media[p] for p in probed], group_size=G, processor=processor, chunk_rows=plan.chunk_rows,
                    shared_prefix=plan.shared_prefix, bucket_overhead=plan.bucket_overhead, lockstep=lockstep,
                    dtype=plan.probe_dtype,
                )
            elif visual_probe == "blank":
                pad_encoder_calls(model, lockstep)  # the blank frames' vision calls of the other processes
    if "temporal" in signals:
        with lockstep_pass(lockstep, model):
            temporal, temporal_rows = temporal_probe_logprobs(
                model, processor, prompt_inputs, media, {p: perms[p] for p in probed if p in perms}, comps.ids,
                comps.valid, G, plan.chunk_rows, shared_prefix=plan.shared_prefix, bucket_overhead=plan.bucket_overhead,
                lockstep=lockstep, dtype=plan.probe_dtype)
    return ProbeScores(probed_rows, visual, temporal, temporal_rows)


@torch.no_grad()
def reference_logprobs(ref_model: torch.nn.Module, prompt_inputs: dict[str, Any], comps: Completions, group_size: int,
                       plan: ForwardPlan, lockstep: Lockstep | None = None) -> Tensor:
    """log p_ref of the sampled tokens (the frozen reference, or the policy with its adapters disabled)."""
    P = prompt_inputs["input_ids"].shape[0]
    with lockstep_pass(lockstep, ref_model):
        inputs = sequence_inputs(encode_visual_once(ref_model, prompt_inputs, list(range(P)), group_size, lockstep=lockstep),
                                 comps.ids, comps.valid)
        return probe_logprobs(ref_model, inputs, comps.ids, plan.chunk_rows, plan.prefix_group(group_size),
                              plan.bucket_overhead)


# ---------------------------------------------------------------------------------------- policy, selection, loss
def policy_inputs(model: torch.nn.Module, ro: Rollout, group_size: int, plan: ForwardPlan,
                  lockstep: Lockstep | None = None) -> dict[str, Any]:
    """The policy pass's inputs: the vision tower runs once per prompt (with grad), not G times.

    Without plan.encode_visual_once the rows get the prompts' pixels repeated G times, built for this
    pass only (the rollout keeps no pixel copies).
    """
    P = ro.prompt_inputs["input_ids"].shape[0]
    if not plan.encode_visual_once:
        rows = select_prompts(ro.prompt_inputs, list(range(P)), group_size)
    else:
        rows = encode_visual_once(model, ro.prompt_inputs, list(range(P)), group_size, grad=True, lockstep=lockstep)
    return sequence_inputs(rows, ro.completions.ids, ro.completions.valid)


def policy_logprobs(model: torch.nn.Module, ro: Rollout, group_size: int, plan: ForwardPlan, *,
                    with_entropy: bool, lockstep: Lockstep | None = None) -> tuple[Tensor, Tensor | None]:
    """log p (N, Lc, with grad) and entropy (N, Lc, or None) of the rollout's completions under the policy.

    With plan.policy_shared_prefix each prompt runs once and its cache serves its G completions
    (prefix.shared_prefix_logprobs with grad: the same numbers and gradients). With a ``lockstep`` the
    pass makes as many forward calls on every process; the padding calls' outputs enter log p times 0,
    so their backward runs with the loss's and adds nothing (model/lockstep.py).
    """
    with lockstep_pass(lockstep, model):
        inputs = policy_inputs(model, ro, group_size, plan, lockstep)
        if plan.policy_shared_prefix:
            per_chunk = max(1, plan.policy_chunk_rows // group_size) if plan.policy_chunk_rows else None
            logp, entropy = shared_prefix_logprobs(
                model, inputs, ro.completions.ids, group_size, with_entropy=with_entropy, prompts_per_chunk=per_chunk,
                bucket_overhead=plan.bucket_overhead, grad=True)
        else:
            logp, entropy = sequence_logprobs(model, inputs, ro.completions.ids, with_entropy=with_entropy,
                                              chunk_rows=plan.policy_chunk_rows, bucket_overhead=plan.bucket_overhead)
    return (lockstep.fold(logp) if lockstep is not None else logp), entropy


def probe_score(logp: Tensor, probe_logp: Tensor, tolerance: float) -> Tensor:
    """S = log p - log p_probe, with |S| < tolerance set to exactly 0.

    When a probe leaves the input unchanged (a permutation of identical frames) S is 0 up to float
    rounding, and the rounding depends on how the passes were batched; without the tolerance the
    `>=` threshold would pick tokens by rounding noise, different on 1 and on N processes.
    """
    score = logp.detach() - probe_logp
    return score.masked_fill(score.abs() < tolerance, 0.0) if tolerance > 0 else score


def signal_scores(logp: Tensor, entropy: Tensor | None, probes: ProbeScores, signals: Sequence[str],
                  tolerance: float) -> dict[str, Tensor]:
    """The scores of the selection's signals: H, V = log p - log p_vis, T = log p - log p_tmp (0 off video rows)."""
    scores: dict[str, Tensor] = {}
    if "entropy" in signals:
        scores["entropy"] = entropy
    if "visual" in signals:
        scores["visual"] = probe_score(logp, probes.visual, tolerance)
    if "temporal" in signals:
        scores["temporal"] = torch.where(probes.temporal_rows[:, None], probe_score(logp, probes.temporal, tolerance),
                                         torch.zeros_like(logp))
    return scores


@dataclass(frozen=True)
class RandomControl:
    """The random-mask control: per prompt group, a random subset of the size KTR keeps there."""

    seed: int
    micro_step: int
    indices: list[int]  # dataset row of each prompt (seeds its stream)


def select_tokens(scores: dict[str, Tensor], valid: Tensor, probes: ProbeScores, spec: SelectionSpec, group_size: int,
                  *, gather: Callable[[Tensor], Tensor] | None = None,
                  random_control: RandomControl | None = None) -> dict[str, Tensor]:
    """Per-signal masks and their union under "key" (vanilla GRPO: every valid token is a key token)."""
    masks = signal_masks(scores, valid, group_size, spec, temporal_rows=probes.temporal_rows, gather=gather)
    # a skipped group (advantage 0, see groups_to_probe) has no probe scores: no visual / temporal picks
    for name in ("visual", "temporal"):
        if name in masks:
            masks[name] = masks[name] & probes.probed_rows[:, None]
    key = torch.stack(list(masks.values())).any(0) if masks else valid.clone()
    if random_control is not None:
        # the control: per prompt group, a uniformly random subset of its valid tokens of the size KTR keeps
        # in that group, from a stream seeded by (seed, data position, prompt): the same whatever the batch
        # size or process count
        G, rand = group_size, torch.zeros_like(valid)
        for p, idx in enumerate(random_control.indices):
            rows = slice(p * G, (p + 1) * G)
            fraction = float(key[rows].sum()) / max(1, int(valid[rows].sum()))
            g = torch.Generator().manual_seed(row_seed(random_control.seed, "random-mask", random_control.micro_step, idx))
            rand[rows] = random_mask_like(valid[rows].cpu(), fraction, g).to(valid.device)
        key = rand
    masks["key"] = key
    return masks


def token_weights(scores: dict[str, Tensor], valid: Tensor, probes: ProbeScores, spec: WeightingSpec,
                  selection: SelectionSpec, group_size: int) -> Tensor:
    """Soft key-token weighting (core.weighting): each valid token's policy-gradient weight, (B, T) float32.

    Ranked in the selection's pools (scope "group" or "batch"); the temporal pool holds the video rows.
    Groups whose probes were skipped (advantage 0) get weights from their scores too; their policy term
    is 0 whatever the weights.
    """
    return soft_token_weights(scores, valid, group_size, spec, scope=selection.scope, temporal_rows=probes.temporal_rows)


def micro_loss(logp: Tensor, ro: Rollout, key: Tensor, old_logp: Tensor | None, spec: LossSpec, *,
               global_sum: Callable[[float], float] | None = None,
               num_processes: int = 1, weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The KTR loss of one micro-batch (core.loss.grpo_loss) and its stats.

    weights: soft key-token weights (token_weights; ``key`` is then every valid token), None for hard.

    DAPO's token mean is over the tokens of every process: with several processes the local token mean
    is rescaled so that the average of the processes' gradients (DDP) is the gradient of the global mean
    (``global_sum`` adds a number over the processes).
    """
    valid = ro.completions.valid
    advantages = ro.advantages.to(logp.device)
    loss, stats = grpo_loss(logp, advantages, key, spec, ref_logp=ro.ref_logp, old_logp=old_logp, valid=valid,
                            weights=weights, return_stats=True)
    if spec.loss_type == "dapo" and num_processes > 1:
        denom_tokens = (key & valid) if spec.denominator_tokens == "mask" else valid
        local = float(denom_tokens.sum())
        loss = loss * (max(1.0, local) * num_processes / max(1.0, global_sum(local)))
    return loss, stats


def per_sequence_losses(logp: Tensor, ro: Rollout, key: Tensor, spec: LossSpec,
                        weights: Tensor | None = None) -> Tensor:
    """(N,) the per-sequence losses of the first pass (the loss-variance metric)."""
    return sequence_losses(logp.detach(), ro.advantages.to(logp.device), key, spec, ref_logp=ro.ref_logp,
                           valid=ro.completions.valid, weights=weights).float()
