"""Batch-invariant sampling: every completion draws from its own random stream.

``model.generate(do_sample=True)`` draws all rows from one global stream, so the tokens a prompt gets
depend on which other prompts share its batch and on how many processes split the batch. Here each
row has its own ``torch.Generator`` seeded from (run seed, step, prompt id, sample index); the sampler
adds Gumbel noise from that stream to the filtered logits and greedy decoding takes the arg-max, which
is an exact draw from ``softmax(logits / temperature)`` restricted to the top-p nucleus. One process or
several, batch of one prompt or eight: the same prompt at the same step gets the same completions.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def row_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and Python runs)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Set to -inf every token outside the smallest set whose probability reaches ``top_p`` (keeps >= 1)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # a token is kept if the mass strictly before it is below top_p (so the first token is always kept)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


NOISE_BLOCK_ELEMENTS = 1 << 18  # uniform draws per row per block (1 MiB of float32: a real vocabulary draws per step)
NOISE_BLOCK_STEPS = 32


def noise_block_steps(vocab_size: int) -> int:
    """Decoding steps whose noise one row draws at once: a function of the vocabulary size only."""
    return max(1, min(NOISE_BLOCK_STEPS, NOISE_BLOCK_ELEMENTS // max(1, vocab_size)))


class GumbelSampler:
    """A logits processor for ``generate(do_sample=False)`` that turns greedy decoding into sampling.

    ``seeds`` holds one seed per row of the generation batch. ``temperature`` 0 means greedy.
    ``suppress_ids`` are never produced (vision placeholders: a random model can sample them).

    Each row draws the uniform noise of several decoding steps at once (``noise_block_steps``, which
    depends on the vocabulary size only, so a row's tokens still depend on its own seed only): one
    generator call per row per block instead of one per row per step. On CPU a block is the same
    stream as the steps drawn one by one (tests pin it), so the tokens are those of a draw per step.
    """

    def __init__(self, seeds: list[int], temperature: float = 1.0, top_p: float = 1.0,
                 suppress_ids: list[int] | None = None, device: torch.device | str = "cpu"):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.suppress_ids = sorted(set(suppress_ids or []))
        self.generators = []
        for s in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(int(s))
            self.generators.append(g)
        self._noise: Tensor | None = None  # (rows, block, vocab) uniform draws
        self._next = 0  # the block's next unused step

    def _uniform(self, shape: tuple[int, int], device: torch.device) -> Tensor:
        """(rows, vocab) uniform noise of this step, each row from its own stream."""
        rows, vocab = shape
        block = self._noise
        if block is None or self._next >= block.shape[1] or block.shape[2] != vocab or block.device != device:
            steps = noise_block_steps(vocab)
            block = torch.stack([torch.rand(steps, vocab, generator=g, device=device) for g in self.generators])
            self._noise, self._next = block, 0
        self._next += 1
        return block[:, self._next - 1]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        scores = scores.to(torch.float32, copy=True)  # never write into the caller's tensor
        if self.suppress_ids:
            ids = [i for i in self.suppress_ids if i < scores.shape[-1]]
            scores[:, ids] = float("-inf")
        if self.temperature == 0:
            return scores
        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"sampler built for {len(self.generators)} rows, got {scores.shape[0]}")
        scores = top_p_filter(scores / self.temperature, self.top_p)
        noise = self._uniform(tuple(scores.shape), scores.device)
        gumbel = -torch.log(-torch.log(noise.clamp(1e-10, 1.0 - 1e-7)))
        return scores + gumbel
