"""Rollout throughput: our batch-invariant sampler vs a bare `model.generate(do_sample=True)`.

    .venv/bin/python benchmarks/rollout_vs_generate.py [--prompts 8 --generations 8 --tokens 64 --repeats 4]

Same tiny model, same batch of prompts (synthetic videos, repeated G times), the same number of new
tokens on every side (min_new_tokens = max_new_tokens, so none stops early). Alternates bare generate,
generate with our sampler on the same repeated rows, and the trainer's rollout (`rollout.generate` with
the P prompts and group_size G: each prompt prefilled once, its cache repeated), and prints the median
tokens per second of each and their ratios to bare generate.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    from video_ktr.data import synth
    from video_ktr.data.media import FrameSettings
    from video_ktr.data.rows import load_dataset
    from video_ktr.data.video import load_video
    from video_ktr.model import tiny
    from video_ktr.model.inputs import Media, encode_prompts, select_prompts
    from video_ktr.model.loading import load_model, load_processor, special_tokens
    from video_ktr.model.rollout import generate as rollout_generate
    from video_ktr.model.sampling import GumbelSampler, row_seed

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny.build_tiny_model(root / "model", seed=0)
        synth.generate(root / "data", num_train=args.prompts, num_test=0, seed=0, kinds=["color_first", "direction"])
        model, processor = load_model(str(root / "model")).eval(), load_processor(str(root / "model"))
        special = special_tokens(model.config, processor.tokenizer)
        samples = load_dataset(root / "data" / "train.json")[: args.prompts]
        settings = FrameSettings(nframes=8, max_frames=8, min_pixels=3136, max_pixels=3136)
        media = [Media(video=load_video(s.media_path, settings)) for s in samples]
        prompts = encode_prompts(processor, [s.messages() for s in samples], media)
        batch = select_prompts(prompts, list(range(len(samples))), args.generations)
        rows = batch["input_ids"].shape[0]
        base = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, eos_token_id=list(special.eos_ids),
                    pad_token_id=special.pad_id, use_cache=True, num_beams=1)

        def bare() -> float:
            cfg = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, **base)
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(**batch, generation_config=cfg)
            return time.perf_counter() - t0

        def ours(rep: int) -> float:
            sampler = GumbelSampler([row_seed(0, rep, i) for i in range(rows)], temperature=1.0, top_p=1.0,
                                    suppress_ids=list(special.vision_ids))
            cfg = GenerationConfig(do_sample=False, **base)
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(**batch, generation_config=cfg, logits_processor=LogitsProcessorList([sampler]))
            return time.perf_counter() - t0

        def rollout(rep: int) -> float:
            t0 = time.perf_counter()
            comps = rollout_generate(model, processor.tokenizer, prompts, seeds=[row_seed(0, rep, i) for i in range(rows)],
                                     max_new_tokens=args.tokens, min_new_tokens=args.tokens, temperature=1.0, top_p=1.0,
                                     eos_ids=special.eos_ids, pad_id=special.pad_id, suppress_ids=special.vision_ids,
                                     group_size=args.generations)
            seconds = time.perf_counter() - t0
            if comps.ids.shape != (rows, args.tokens):
                raise RuntimeError(f"the rollout gave {tuple(comps.ids.shape)} tokens, not {(rows, args.tokens)}")
            return seconds

        bare()  # warm-up
        rollout(0)
        times_bare, times_ours, times_rollout = [], [], []
        for rep in range(args.repeats):
            times_bare.append(bare())
            times_ours.append(ours(rep))
            times_rollout.append(rollout(rep))
    tokens = rows * args.tokens
    tb, to, tr = statistics.median(times_bare), statistics.median(times_ours), statistics.median(times_rollout)
    print(f"{rows} rows x {args.tokens} new tokens, {args.repeats} alternating repeats, median seconds")
    print(f"bare generate(do_sample=True): {tb:.3f} s  ({tokens / tb:.0f} tokens/s)")
    print(f"ours (Gumbel sampler, vision ids suppressed), same rows: {to:.3f} s  ({tokens / to:.0f} tokens/s)")
    print(f"the trainer's rollout (prompts prefilled once, caches repeated): {tr:.3f} s  ({tokens / tr:.0f} tokens/s)")
    print(f"throughput ours / bare = {tb / to:.3f}; rollout / bare = {tb / tr:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
