"""The GRPO step's data: which prompts a micro-step takes, their decoded media and processor outputs.

The order is a seeded permutation per epoch, so the position (micro-steps done) is all a resumed run
needs, and every method run with one seed sees the same prompts in the same order. The next
micro-step's batch is prepared in a background thread while the current one computes
(``--dataloader_prefetch``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from video_ktr.data.media import FrameSettings, MediaError, load_image
from video_ktr.data.rows import DataError, Sample, SkipReport
from video_ktr.data.video import FrameCache
from video_ktr.model.inputs import Media, encode_prompts
from video_ktr.model.sampling import row_seed
from video_ktr.utils.prefetch import Prefetcher


def row_error(sample: Sample, field: str, message: str, reason: str) -> DataError:
    """A DataError naming the sample's file and row (its ``source`` is "file:row")."""
    file, _, row = sample.source.rpartition(":")
    return DataError(file, int(row) if row.isdigit() else None, field, message, reason)


def prompt_lengths(inputs: dict[str, Tensor]) -> tuple[list[int], list[int]]:
    """(tokens, tokens of its visual item) of each prompt of a processor batch (padding not counted).

    The visual item's tokens are the span from its first to its last placeholder: the placeholders, and for
    Qwen3-VL the markers and ``<t seconds>`` text between its frame groups, which the video brings along.
    """
    mask = inputs["attention_mask"].bool()
    placeholder = (inputs["mm_token_type_ids"] != 0) & mask
    positions = torch.arange(placeholder.shape[1]).expand_as(placeholder)
    first = torch.where(placeholder, positions, placeholder.shape[1]).min(1).values
    last = torch.where(placeholder, positions, -1).max(1).values
    return mask.sum(1).tolist(), (last - first + 1).clamp(min=0).tolist()


def prompt_length_error(sample: Sample, tokens: int, visual: int, limit: int) -> DataError | None:
    """The row's error if its prompt (``tokens``, ``visual`` of them its image's or video's) is over --max_prompt_length.

    The field named is 'problem' when the text alone is over the limit, else 'path': its media's visual
    tokens push the prompt over (which no text check before tokenising can see).
    """
    if tokens <= limit:
        return None
    return row_error(
        sample, "problem" if tokens - visual > limit else "path",
        f"the prompt is {tokens} tokens ({visual} of them for its video or image), over --max_prompt_length {limit}. Visual tokens "
        "cannot be truncated away: lower the frames or pixels (--max_frames, --max_pixels), shorten the text, or "
        "raise --max_prompt_length", "prompt_too_long")


def prompt_length_check(processor: Any, frames: FrameSettings, max_prompt_length: int, *, prompt_layout: str = "train",
                        system_prompt: str | None = None) -> Any:
    """What ``video-ktr data check --model_name_or_path M --max_prompt_length N`` runs on each good row: the
    row's prompt made and tokenised as GRPO training makes it (same messages, media decoding, processor and
    rule: :func:`prompt_length_error`), so a row training would refuse for its length is named first.

    Returns ``check(sample) -> DataError | None`` (unreadable media: a ``media_unreadable`` error).
    """
    cache = FrameCache(capacity=8)

    def check(sample: Sample) -> DataError | None:
        try:
            media = (Media(video=cache.get_or_load(sample.media_path, frames)) if sample.data_type == "video"
                     else Media(image=load_image(sample.media_path, frames)))
        except MediaError as err:
            return row_error(sample, "path", f"media could not be read: {err}", "media_unreadable")
        inputs = encode_prompts(processor, [sample.messages(prompt_layout, system_prompt)], [media])
        (tokens,), (visual,) = prompt_lengths(inputs)
        return prompt_length_error(sample, tokens, visual, max_prompt_length)

    return check


@dataclass
class PreparedBatch:
    """One micro-step's data, made on the CPU (in the prefetch thread or the step itself)."""

    picked: list[tuple[int, Sample]]  # (dataset row, sample) of each prompt, unreadable rows replaced
    media: list[Media]
    prompt_inputs: dict[str, Tensor]  # processor outputs, on the CPU
    unreadable: dict[int, DataError]  # rows found unreadable while preparing it (counted when the step takes it)

    @property
    def samples(self) -> list[Sample]:
        return [s for _, s in self.picked]


class GRPOData:
    """This process's prompts per micro-step, their media (decoded, cached) and processor outputs.

    State: the rows found unreadable (``bad_rows``, with --on_bad_sample skip), the skip report, the
    frame cache and the prefetch thread.
    """

    def __init__(self, samples: list[Sample], *, cfg: Any, frames: FrameSettings, processor: Any, rank: int,
                 world: int, skips: SkipReport) -> None:
        self.samples, self.cfg, self.frames, self.processor = samples, cfg, frames, processor
        self.rank, self.world, self.skips = rank, world, skips
        self.cache = FrameCache(capacity=max(8, 4 * cfg.per_device_train_batch_size))
        self.bad_rows: set[int] = set()  # dataset rows that cannot be used: unreadable media, prompt too long (skip)
        self.prefetcher = Prefetcher("video-ktr-data")  # the next micro-step's batch (--dataloader_prefetch)
        self._loader_processor: Any = None
        # micro-steps of the run (the trainer sets it from --max_steps / --num_train_epochs): none prefetched past it
        self.total_micro_steps = cfg.max_steps * cfg.gradient_accumulation_steps

    def samples_at(self, micro_step: int) -> list[tuple[int, Sample]]:
        """This process's prompts of micro-step ``micro_step``: a slice of the global micro-batch."""
        P, n = self.cfg.per_device_train_batch_size, len(self.samples)
        start = micro_step * P * self.world + self.rank * P
        picked = []
        for k in range(start, start + P):
            epoch, pos = divmod(k, n)
            g = torch.Generator().manual_seed(row_seed(self.cfg.seed, "order", epoch))
            perm = torch.randperm(n, generator=g)
            picked.append(int(perm[pos]))
        return [(i, self.samples[i]) for i in picked]

    def _load_media(self, sample: Sample) -> Media:
        if sample.data_type == "video":
            return Media(video=self.cache.get_or_load(sample.media_path, self.frames))
        return Media(image=load_image(sample.media_path, self.frames))

    def _decode_one(self, index: int, sample: Sample, unreadable: dict[int, DataError]) -> tuple[int, Sample, Media]:
        """Decode one prompt's media; a failure stops the run, or (skip) the row is replaced by another.

        A row known to be unusable (``bad_rows``, or found so while preparing this batch: ``unreadable``)
        is replaced without being decoded or counted again.
        """
        tries, err = 0, None
        while True:
            if index not in self.bad_rows and index not in unreadable:
                try:
                    return index, sample, self._load_media(sample)
                except MediaError as e:
                    err = e
                    derr = row_error(sample, "path", f"media could not be read: {e}", "media_unreadable")
                    if self.cfg.on_bad_sample == "error":
                        raise derr from e
                    unreadable[index] = derr
            tries += 1
            if tries > 100:
                raise RuntimeError("more than 100 unusable rows in a row (unreadable media or prompts over "
                                   "--max_prompt_length); check --media_root and the limits") from err
            index = (index + 7919 * tries) % len(self.samples)
            sample = self.samples[index]

    def _decode_media(self, picked: list[tuple[int, Sample]], unreadable: dict[int, DataError]):
        """Decode each prompt's media (_decode_one); returns the prompts (unreadable rows replaced) and media.

        Safe in the prefetch thread: it reads ``bad_rows`` (written only by the main thread, which does not
        write it while a prefetch runs) and records new unusable rows in ``unreadable``, which the caller
        counts (_count_unreadable), so a skip is reported with the step that uses its batch.
        """
        out, media = [], []
        for index, sample in picked:
            index, sample, m = self._decode_one(index, sample, unreadable)
            out.append((index, sample))
            media.append(m)
        return out, media

    def _too_long(self, inputs: dict[str, Tensor], samples: list[Sample]) -> dict[int, DataError]:
        """{batch position: DataError} of the prompts over --max_prompt_length (visual tokens included)."""
        limit = self.cfg.max_prompt_length
        if limit is None:
            return {}
        found = {}
        for i, (n, v) in enumerate(zip(*prompt_lengths(inputs), strict=True)):
            err = prompt_length_error(samples[i], n, v, limit)
            if err is not None:
                found[i] = err
        return found

    def _count_unreadable(self, unreadable: dict[int, DataError]) -> None:
        for index, err in unreadable.items():
            if index not in self.bad_rows:
                self.bad_rows.add(index)
                self.skips.add(err)

    def prepare(self, micro_step: int, processor: Any) -> PreparedBatch:
        """Micro-step ``micro_step``'s data on the CPU: its prompts, decoded media and processor outputs.

        A prompt over --max_prompt_length stops the run naming its file, row and field, or (skip) its row is
        replaced by another and counted (reason ``prompt_too_long``), like a row with unreadable media.
        """
        cfg = self.cfg
        unreadable: dict[int, DataError] = {}
        picked, media = self._decode_media(self.samples_at(micro_step), unreadable)
        while True:
            samples = [s for _, s in picked]
            messages = [s.messages(cfg.prompt_layout, cfg.system_prompt) for s in samples]
            prompt_inputs = encode_prompts(processor, messages, media)
            too_long = self._too_long(prompt_inputs, samples)
            if not too_long:
                return PreparedBatch(picked, media, prompt_inputs, unreadable)
            if cfg.on_bad_sample == "error":
                raise next(iter(too_long.values()))
            for i, err in too_long.items():
                unreadable[picked[i][0]] = err
                index, sample, media[i] = self._decode_one(*picked[i], unreadable)
                picked[i] = (index, sample)

    def batch_for(self, micro_step: int) -> PreparedBatch:
        """Micro-step ``micro_step``'s data: the batch prefetched while the previous step computed, or made now.

        A prefetched batch raises here what preparing it raised (a bad file or a prompt over
        --max_prompt_length with --on_bad_sample error), so an error stops the step that needs the batch, never an
        earlier one; a prefetch of another micro-step is awaited and dropped (prefetch.Prefetcher.take).
        Then the next micro-step's batch starts preparing in the background (--dataloader_prefetch).
        """
        batch = self.prefetcher.take(micro_step, self.prepare, micro_step, self.processor)
        self._count_unreadable(batch.unreadable)
        self.prefetch(micro_step + 1)
        return batch

    def prefetch(self, micro_step: int) -> None:
        """Start preparing micro-step ``micro_step``'s data in the background (--dataloader_prefetch)."""
        cfg = self.cfg
        if not cfg.dataloader_prefetch or micro_step >= self.total_micro_steps:
            return
        if self._loader_processor is None:
            # a processor of its own: a fast tokenizer refuses calls from two threads at once ("Already borrowed")
            self._loader_processor = copy.deepcopy(self.processor)
        self.prefetcher.start(micro_step, self.prepare, micro_step, self._loader_processor)

    def close(self) -> None:
        """Stop the prefetch thread (after the batch it is preparing)."""
        self.prefetcher.close()
