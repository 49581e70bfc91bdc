"""`video-ktr demo` (`make demo`): the whole pipeline on the embedded default, on a CPU.

synthetic video tasks -> tiny Qwen2.5-VL -> SFT cold start -> evaluation -> GRPO with key-token
reinforcement -> evaluation -> ``OUTPUT_DIR/summary.md``, ``results.json`` and PNG plots.
``--arch qwen3_vl`` (or another family) builds that family's tiny model and draws the synthetic frames at
its frame factor (Qwen3-VL: 32-px cells, 64x64 frames; the rows are the same).

Every stage prints what it does and how long it took; a stage whose output exists with the same
settings is reused, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from video_ktr.analysis.demo_report import write_report
from video_ktr.data import synth
from video_ktr.data.media import FrameSettings
from video_ktr.evaluation.evaluate import evaluate_rows
from video_ktr.model import tiny
from video_ktr.model.adapters import DEFAULT_FAMILY, FAMILIES, adapter_for
from video_ktr.model.loading import load_model, load_processor
from video_ktr.training.grpo import KTRTrainer
from video_ktr.training.grpo_config import TrainConfig
from video_ktr.training.sft import SFTConfig, run_sft
from video_ktr.utils.config import field
from video_ktr.utils.logs import LogOptions, bars_disabled, setup_logging


@dataclass
class DemoConfig(LogOptions):
    """The main job on the embedded default: synth, SFT, eval, KTR, eval, report."""

    output_dir: str = field("runs/demo", help="Where everything goes (data, models, results, summary).")
    seed: int = field(0, help="Seed of every stage.")
    num_train: int = field(2000, help="Synthetic training questions.")
    num_test: int = field(300, help="Synthetic held-out questions.")
    kinds: list[str] | None = field(None, help="Question kinds of the synthetic set (default: synth's default kinds: color_first, color_last, color_present, after_event, which_first, count_color; the image kinds, direction and count have too few distinct contents at this size for a test split held out by content).")
    image_fraction: float = field(0.0, help="Fraction of synthetic rows that are image questions (needs an image kind in --kinds and, with --held_out redraw, room for unseen images: 2x2-cell images have one content per colour and cell).")
    frames: int = field(12, help="Frames per synthetic video (2 per visual token in time: 12 frames = 6 steps; 8 steps' worth of distinct videos per answer is what the held-out split by content needs beside 2,000 training rows).")
    held_out: str = field("redraw", choices=["redraw", "mark"], help="synth --held_out: 'redraw' makes every test row differ in content (question, options, answer, video) from every training row, so the held-out accuracy is on unseen rows only; 'mark' keeps repeats and marks them (the demo before 2026-12-05: 257 of 300 test rows repeated a training row).")
    num_colors: int = field(6, help="Palette size of the synthetic set (more colours: fewer test rows repeat a training row).")
    num_options: int = field(6, help="Options per colour question (= num_colors: every colour keeps one letter, so the tiny model learns the colours, not a lookup in the option list, within the SFT budget).")
    shuffle_options: bool = field(False, help="Shuffle the option order per synthetic row (harder: the tiny model then needs far more SFT).")
    cot_error_rate: float = field(0.7, help="Fraction of the SFT (chain-of-thought) rows whose reasoning and answer come from a flawed teacher (synth --cot_error_rate); RL and evaluation use the ground truth. Above 0.5 the teacher's wrong strategy is the majority of a kind's rows, so the SFT model's greedy answers often follow it and RL has mistakes to unlearn (measured: greedy rose in six of six runs at 0.7, +3.0 to +11.3 points; at 0.4 RL raised sampled but not greedy accuracy). 0: SFT on the correct rows.")
    vocab_size: int = field(1024, help="Size of the tiny model's BPE vocabulary, trained on the synthetic training text (shorter prompts: faster steps).")
    sft_steps: int = field(600, help="SFT cold-start steps.")
    sft_eval_steps: int = field(100, help="Greedy held-out accuracy per question kind every this many SFT steps (the SFT curves; 0: only at the end).")
    sft_learning_rate: float = field(1e-3, help="SFT learning rate.")
    sft_batch_size: int = field(16, help="SFT rows per step.")
    rl_steps: int = field(200, help="GRPO steps with key-token reinforcement (200 x 8 prompts: 0.8 epoch of the 2,000 questions; 100 steps gave half the gain or less).")
    rl_learning_rate: float = field(1e-4, help="GRPO learning rate (3e-4 lowered held-out accuracy here; 5e-5 moved it too little in 80 steps).")
    rl_prompts: int = field(8, help="Prompts per GRPO step.")
    num_generations: int = field(8, help="Completions per prompt.")
    token_selection: list[str] = field(["all"], help="Key-token signals for the RL stage (all = KTR).")
    max_completion_length: int = field(64, help="Most tokens per completion in RL and evaluation (the synthetic reasoning takes 15-40 tokens with the demo's tokenizer).")
    eval_samples: int = field(4, help="Sampled (temperature 1) evaluations per question, beside the greedy one; the summary reports their mean (one sample on 300 questions has a standard error of about 2.7 points).")
    quick: bool = field(False, help="A seconds-long smoke run (tiny numbers; for tests, not for results).")
    arch: str = field(DEFAULT_FAMILY, choices=list(FAMILIES), help="Model family of the tiny model; the synthetic frames follow its frame factor (28-px cells for Qwen2/2.5-VL, 32 for Qwen3-VL). The results reported in docs/ are Qwen2.5-VL's.")


def _stage(name: str):
    class _S:
        def __enter__(self):
            self.t0 = time.perf_counter()
            print(f"\n=== {name}", flush=True)
            return self

        def __exit__(self, *exc):
            if exc[0] is None:
                print(f"=== {name}: done in {time.perf_counter() - self.t0:.1f} s", flush=True)
            return False

    return _S()


def _frame_args(cell: int = 28, frames: int = 12) -> dict[str, Any]:
    """The synthetic videos' own size: ``frames`` frames of 2x2 cells of ``cell`` pixels (56x56 at the default 28:
    2x2 visual tokens per frame pair), every frame read."""
    side = 2 * cell
    return {"nframes": frames, "min_frames": 2, "max_frames": frames, "min_pixels": side * side, "max_pixels": side * side,
            "image_min_pixels": side * side, "image_max_pixels": side * side}


def _log_args(cfg: DemoConfig) -> dict[str, Any]:
    """--log_level, --log_level_replica and --disable_tqdm, passed on to the SFT and RL runs."""
    return {"log_level": cfg.log_level, "log_level_replica": cfg.log_level_replica, "disable_tqdm": cfg.disable_tqdm}


def _cell(cfg: DemoConfig) -> int:
    """Pixels per side of one visual token's cell: the family's frame factor (28 for Qwen2/2.5-VL, 32 for Qwen3-VL)."""
    return adapter_for(cfg.arch).frame_factor


def _check_reused(data_dir: Path, base: Path, arch: str, cell: int) -> None:
    """A demo folder is reused only for the family it was made for (its data's cell size, its model's type)."""
    marker = data_dir / "synth_config.json"
    made = json.loads(marker.read_text()).get("cell", 28) if marker.is_file() else cell
    if made != cell:
        raise ValueError(f"{data_dir} holds synthetic frames with {made}-px cells, not the {cell}-px cells "
                         f"--arch {arch} needs: use another --output_dir")
    if (base / "config.json").is_file() and adapter_for(json.loads((base / "config.json").read_text())).name != arch:
        raise ValueError(f"{base} holds a tiny model of another family than --arch {arch}: use another --output_dir")


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(cfg)  # --log_level; the stages' runs get the same options (_log_args)
    if cfg.quick:
        cfg.num_train, cfg.num_test, cfg.sft_steps, cfg.rl_steps = 48, 16, 20, 3
        cfg.rl_prompts, cfg.num_generations, cfg.max_completion_length = 2, 4, 24
        cfg.num_colors, cfg.vocab_size, cfg.sft_eval_steps, cfg.frames = 4, 512, 10, 8
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    cell = _cell(cfg)

    data_dir = out / "data"
    _check_reused(data_dir, out / "base", cfg.arch, cell)
    with _stage("1/6 synthetic video tasks") as st:
        marker = data_dir / "synth_config.json"
        if not marker.is_file():
            summary = synth.generate(data_dir, num_train=cfg.num_train, num_test=cfg.num_test, seed=cfg.seed,
                                     frames=cfg.frames, held_out=cfg.held_out,
                                     image_fraction=cfg.image_fraction, num_colors=cfg.num_colors,
                                     num_options=min(cfg.num_options, cfg.num_colors), shuffle_options=cfg.shuffle_options, cot_error_rate=cfg.cot_error_rate,
                                     size=2 * cell, cell=cell, kinds=list(cfg.kinds or synth.DEFAULT_KINDS))
            print(synth.format_summary(summary))
            (data_dir / "synth_summary.json").write_text(json.dumps(summary, indent=1))
        else:
            print(f"reusing {data_dir}")
        held_out = _held_out_summary(data_dir)
    timings["synth"] = time.perf_counter() - st.t0

    base = out / "base"
    with _stage(f"2/6 tiny {cfg.arch} model (random weights, local tokenizer)") as st:
        if not (base / "config.json").is_file():
            args = tiny.MakeTinyModelArgs(output_dir=str(base), arch=cfg.arch, seed=cfg.seed, corpus=str(data_dir / "train.json"),
                                          vocab_size=cfg.vocab_size)
            print(tiny.write_tiny_model(args).summary())
        else:
            print(f"reusing {base}")
    timings["model"] = time.perf_counter() - st.t0

    sft_dir = out / "sft"
    cot_file = data_dir / ("train_cot.json" if cfg.cot_error_rate > 0 else "train.json")
    with _stage(f"3/6 SFT cold start ({cfg.sft_steps} steps on {cot_file.name})") as st:
        if not (sft_dir / "config.json").is_file():
            run_sft(SFTConfig(model_name_or_path=str(base), dataset=str(cot_file), output_dir=str(sft_dir), overwrite_output_dir=True,
                              max_steps=cfg.sft_steps, learning_rate=cfg.sft_learning_rate,
                              per_device_train_batch_size=cfg.sft_batch_size, seed=cfg.seed, lr_scheduler_type="cosine",
                              warmup_ratio=0.02, logging_steps=100, eval_dataset=str(data_dir / "test.json"),
                              eval_steps=cfg.sft_eval_steps, eval_generate=True,
                              eval_max_new_tokens=cfg.max_completion_length, per_device_eval_batch_size=32,
                              **_frame_args(cell, cfg.frames), **_log_args(cfg)))
        else:
            print(f"reusing {sft_dir}")
    timings["sft"] = time.perf_counter() - st.t0

    test_file = data_dir / "test.json"
    with _stage("4/6 evaluate the SFT model on held-out questions") as st:
        before = _evaluate(sft_dir, test_file, cfg, out / "eval_sft")
    timings["eval_sft"] = time.perf_counter() - st.t0

    rl_dir = out / "ktr"
    with _stage(f"5/6 GRPO with key-token reinforcement ({cfg.rl_steps} steps, {cfg.rl_prompts} prompts x {cfg.num_generations})") as st:
        if not (rl_dir / "config.json").is_file():
            rl = rl_config(cfg, sft_dir, data_dir / "train.json", rl_dir)
            rl.overwrite_output_dir = True  # an unfinished stage starts over, as it always did
            KTRTrainer(rl).train()
        else:
            print(f"reusing {rl_dir}")
    timings["rl"] = time.perf_counter() - st.t0

    with _stage("6/6 evaluate the KTR model and write the report") as st:
        after = _evaluate(rl_dir, test_file, cfg, out / "eval_ktr")
        results = {"config": asdict(cfg), "held_out": held_out, "before": before, "after": after, "timings_seconds": timings,
                   "total_seconds": time.perf_counter() - t_start}
        (out / "results.json").write_text(json.dumps(results, indent=2))

        write_report(out, results)
    print(f"\nsummary: {out / 'summary.md'}")
    return results


def _held_out_summary(data_dir: Path) -> dict[str, Any]:
    """How the test split was kept apart from the training rows (synth's summary, written with the data)."""
    path = data_dir / "synth_summary.json"
    if not path.is_file():  # a data folder from before the summary was kept
        return {}
    summary = json.loads(path.read_text())
    return {k: summary.get(k) for k in ("held_out", "test_rows_identical_to_a_train_row", "test_redraws", "test_redraws_by_kind")}


def rl_config(cfg: DemoConfig, model: Path, dataset: Path, output_dir: Path):
    """The RL stage's TrainConfig (configs/demo-rl.yaml holds the same values as a YAML)."""

    return TrainConfig(**_log_args(cfg), model_name_or_path=str(model), dataset=str(dataset), output_dir=str(output_dir),
                       max_steps=cfg.rl_steps, learning_rate=cfg.rl_learning_rate, lr_scheduler_type="constant",
                       per_device_train_batch_size=cfg.rl_prompts, num_generations=cfg.num_generations,
                       max_completion_length=cfg.max_completion_length, temperature=1.0, top_p=1.0, beta=0.0,
                       seed=cfg.seed, token_selection=list(cfg.token_selection), logging_steps=10, **_frame_args(_cell(cfg), cfg.frames))


def _evaluate(model_dir: Path, test_file: Path, cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """Greedy and sampled accuracy on the held-out set, overall and per question kind."""

    rows = json.loads(test_file.read_text())
    model, processor = load_model(str(model_dir)), load_processor(str(model_dir))
    model.eval()
    settings = FrameSettings(**_frame_args(_cell(cfg), cfg.frames))
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    runs = [("greedy", True, 0.0, 0)] + [(f"sampled_{k}", False, 1.0, k) for k in range(cfg.eval_samples)]
    for name, greedy, temperature, k in runs:
        results, metrics = evaluate_rows(
            model, processor, rows, test_file.parent, settings, greedy=greedy, temperature=temperature, top_p=1.0,
            max_new_tokens=cfg.max_completion_length, batch_size=32, seed=cfg.seed + k, prompt_layout="train",
            progress=not bars_disabled(cfg), progress_desc=f"eval {out.name} {name}",
        )
        (out / f"{name}.json").write_text(json.dumps({"results": results, "metrics": metrics}, indent=1))
        report[name] = {"accuracy": metrics["overall"],
                        "by_kind": {k2: v["accuracy"] for k2, v in metrics.get("by_kind", {}).items()},
                        **_unseen_accuracy(results)}
        print(f"{name:10s} accuracy {metrics['overall']:.3f}  " + "  ".join(
            f"{k2} {v:.2f}" for k2, v in report[name]["by_kind"].items()), flush=True)
    if cfg.eval_samples:
        report["sampled"] = mean_of_samples([report[f"sampled_{k}"] for k in range(cfg.eval_samples)])
        print(f"{'sampled':10s} accuracy {report['sampled']['accuracy']:.3f}  (mean of {cfg.eval_samples} samples per question)",
              flush=True)
    return report


def mean_of_samples(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of several sampled evaluations of the same questions (overall, per kind, unseen rows)."""
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    kinds = sorted({k for r in reports for k in r["by_kind"]})
    return {"accuracy": mean([r["accuracy"] for r in reports]),
            "by_kind": {k: mean([r["by_kind"].get(k) for r in reports]) for k in kinds},
            "unseen_accuracy": mean([r.get("unseen_accuracy") for r in reports]),
            "unseen_rows": reports[0].get("unseen_rows", 0), "samples": len(reports)}


def _unseen_accuracy(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy on the test rows that do not repeat a training row (synth marks ``seen_in_train``)."""
    def seen(r: dict[str, Any]) -> bool | None:
        v = r.get("seen_in_train", (r.get("meta") or {}).get("seen_in_train"))
        return None if v is None else bool(v)

    scored = [r for r in results if r.get("score") is not None and seen(r) is False]
    if not scored:
        return {"unseen_accuracy": None, "unseen_rows": 0}
    return {"unseen_accuracy": sum(r["score"] for r in scored) / len(scored), "unseen_rows": len(scored)}
