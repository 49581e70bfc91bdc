"""Batch-invariant sampling: every completion draws from its own random stream.

``model.generate(do_sample=True)`` draws all rows from one global stream, so the tokens a prompt gets
depend on which other prompts share its batch and on how many processes split the batch. Here each
row has its own ``torch.Generator`` seeded from (run seed, step, prompt id, sample index); the sampler
adds Gumbel noise from that stream to the filtered logits and greedy decoding takes the arg-max, which
is an exact draw from ``softmax(logits / temperature)`` restricted to the top-p nucleus. One process or
several, batch of one prompt or eight: the same prompt at the same step gets the same completions.

Two noise sources give those per-row streams. ``"generator"`` (the default, and the only one on the
transformers ``generate`` path) draws from a ``torch.Generator`` per row. ``"counter"`` computes the noise
as a hash of (row seed, decoding step, vocabulary index) on the device (``counter_uniform``): no generator
call per row, no host work, a fixed set of kernels per step that a CUDA graph can capture. Both are
batch-invariant; they are different streams, so they sample different (equally distributed) tokens.
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


MASK32 = 0xFFFFFFFF
# odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so int64 arithmetic never overflows
_MIX1, _MIX2, _STEP = 0x7FEB352D, 0x5BD1E995, 0x61C88647


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xor-shift / multiply rounds) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MIX1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX2) & MASK32
    return x ^ (x >> 16)


def seed_keys(seeds: list[int], device: torch.device | str = "cpu") -> Tensor:
    """(rows, 2) int64: the low and high 32 bits of each row's seed (the counter noise's key)."""
    keys = [[int(s) & MASK32, (int(s) >> 32) & MASK32] for s in seeds]
    return torch.tensor(keys, dtype=torch.int64, device=device).reshape(len(seeds), 2)


def counter_uniform(keys: Tensor, step: Tensor | int, vocab: int, vocab_hash: Tensor | None = None) -> Tensor:
    """(rows, vocab) float32 uniform noise in (0, 1): a hash of (row key, ``step``, vocabulary index).

    ``keys``: (rows, 2) from ``seed_keys``; ``step``: the decoding step (an int or a 0-d / 1-element
    int64 tensor on the keys' device, so a captured graph can advance it in place). A row's noise
    depends on its key and the step only (never on the other rows), and is the same on every run of
    the same device. 24 bits per draw: u = (h + 0.5) / 2**24.
    """
    step = torch.as_tensor(step, dtype=torch.int64, device=keys.device).reshape(())
    row = _mix32(keys[:, 0] ^ _mix32(keys[:, 1] ^ _mix32((step * _STEP) & MASK32)))  # (rows,)
    if vocab_hash is None:
        vocab_hash = vocab_hashes(vocab, keys.device)
    h = _mix32(row[:, None] ^ vocab_hash[None, :])
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def vocab_hashes(vocab: int, device: torch.device | str = "cpu") -> Tensor:
    """(vocab,) int64: each vocabulary index hashed once (counter_uniform mixes it with the row's step hash)."""
    return _mix32((torch.arange(vocab, dtype=torch.int64, device=device) * _MIX2 + _STEP) & MASK32)


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

    With ``noise="counter"`` the noise is ``counter_uniform`` of the row's seed and a step counter kept
    on the device (``step``, advanced in place by every call): the work per call is a fixed set of
    tensor operations with no host synchronisation, which decode.py captures in a CUDA graph.
    """

    def __init__(self, seeds: list[int], temperature: float = 1.0, top_p: float = 1.0,
                 suppress_ids: list[int] | None = None, device: torch.device | str = "cpu",
                 noise: str = "generator"):
        if noise not in ("generator", "counter"):
            raise ValueError(f"noise must be 'generator' or 'counter', got {noise!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.suppress_ids = sorted(set(suppress_ids or []))
        self.noise = noise
        self.rows = len(seeds)
        self._suppress: dict[tuple[str, int], Tensor] = {}  # device index tensors, built once (no copy per step)
        self.generators = []
        if noise == "counter":
            self.keys = seed_keys(seeds, device)
            self.step = torch.zeros((), dtype=torch.int64, device=device)
            self._vocab_hash: Tensor | None = None
            seeds = []
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

    def _counter_uniform(self, vocab: int) -> Tensor:
        """This call's counter noise; advances the device step counter in place."""
        if self._vocab_hash is None or self._vocab_hash.shape[0] != vocab:
            self._vocab_hash = vocab_hashes(vocab, self.keys.device)
        noise = counter_uniform(self.keys, self.step, vocab, self._vocab_hash)
        self.step.add_(1)
        return noise

    def _suppress_index(self, vocab: int, device: torch.device) -> Tensor | None:
        key = (str(device), vocab)
        if key not in self._suppress:
            ids = [i for i in self.suppress_ids if i < vocab]
            self._suppress[key] = torch.tensor(ids, dtype=torch.int64, device=device) if ids else None
        return self._suppress[key]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        scores = scores.to(torch.float32, copy=True)  # never write into the caller's tensor
        if self.suppress_ids:
            index = self._suppress_index(scores.shape[-1], scores.device)
            if index is not None:
                scores.index_fill_(-1, index, float("-inf"))
        if self.temperature == 0:
            return scores
        if scores.shape[0] != self.rows:
            raise RuntimeError(f"sampler built for {self.rows} rows, got {scores.shape[0]}")
        scores = top_p_filter(scores / self.temperature, self.top_p)
        if self.noise == "counter":
            noise = self._counter_uniform(scores.shape[-1])
        else:
            noise = self._uniform(tuple(scores.shape), scores.device)
        gumbel = -torch.log(-torch.log(noise.clamp(1e-10, 1.0 - 1e-7)))
        return scores + gumbel
