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
        self.bad_rows: set[int] = set()  # dataset rows whose media could not be read (skip mode)
        self.prefetcher = Prefetcher("video-ktr-data")  # the next micro-step's batch (--dataloader_prefetch)
        self._loader_processor: Any = None

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

    def _decode_media(self, picked: list[tuple[int, Sample]]):
        """Decode each prompt's media; a failure stops the run, or (skip) is replaced by another row.

        Returns the prompts, their media and the rows newly found unreadable, which the caller counts
        (_count_unreadable). Safe in the prefetch thread: it reads ``bad_rows`` (written only by the main
        thread, which does not write it while a prefetch runs), so a skip is reported with the step that
        uses its batch.
        """
        out, media, unreadable = [], [], {}
        for index, sample in picked:
            tries = 0
            while True:
                try:
                    if index in self.bad_rows or index in unreadable:  # known unreadable: not decoded nor counted again
                        raise MediaError(sample.media_path, "was unreadable before")
                    media.append(self._load_media(sample))
                    out.append((index, sample))
                    break
                except MediaError as err:
                    if self.cfg.on_bad_sample == "error":
                        raise DataError(sample.source.rsplit(":", 1)[0], int(sample.source.rsplit(":", 1)[1]), "path",
                                        f"media could not be read: {err}", "media_unreadable") from err
                    if index not in self.bad_rows and index not in unreadable:
                        unreadable[index] = DataError(sample.source, None, "path", str(err), "media_unreadable")
                    tries += 1
                    if tries > 100:
                        raise RuntimeError("more than 100 unreadable media files in a row; check --media_root") from err
                    index = (index + 7919 * tries) % len(self.samples)
                    sample = self.samples[index]
        return out, media, unreadable

    def _count_unreadable(self, unreadable: dict[int, DataError]) -> None:
        for index, err in unreadable.items():
            if index not in self.bad_rows:
                self.bad_rows.add(index)
                self.skips.add(err)

    def prepare(self, micro_step: int, processor: Any) -> PreparedBatch:
        """Micro-step ``micro_step``'s data on the CPU: its prompts, decoded media and processor outputs."""
        cfg = self.cfg
        picked, media, unreadable = self._decode_media(self.samples_at(micro_step))
        samples = [s for _, s in picked]
        messages = [s.messages(cfg.prompt_layout, cfg.system_prompt) for s in samples]
        prompt_inputs = encode_prompts(processor, messages, media, max_prompt_length=cfg.max_prompt_length,
                                       source=[s.source for s in samples])
        return PreparedBatch(picked, media, prompt_inputs, unreadable)

    def batch_for(self, micro_step: int) -> PreparedBatch:
        """Micro-step ``micro_step``'s data: the batch prefetched while the previous step computed, or made now.

        A prefetched batch raises here what preparing it raised (a bad file with --on_bad_sample error,
        a prompt over --max_prompt_length), so an error stops the step that needs the batch, never an
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
        if not cfg.dataloader_prefetch or micro_step >= cfg.max_steps * cfg.gradient_accumulation_steps:
            return
        if self._loader_processor is None:
            # a processor of its own: a fast tokenizer refuses calls from two threads at once ("Already borrowed")
            self._loader_processor = copy.deepcopy(self.processor)
        self.prefetcher.start(micro_step, self.prepare, micro_step, self._loader_processor)

    def close(self) -> None:
        """Stop the prefetch thread (after the batch it is preparing)."""
        self.prefetcher.close()
