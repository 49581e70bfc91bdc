"""The options of ``video-ktr eval`` (:class:`EvalConfig`), the evaluation's errors and its fixed settings
(scoring rule text, engines, protocol keys that may differ between the runs of one resumable evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from video_ktr.data.options import MediaArgs
from video_ktr.data.prompts import OPTION_LAYOUTS
from video_ktr.evaluation.tasks.registry import get_benchmark
from video_ktr.utils.config import field
from video_ktr.utils.logs import LogOptions

__all__ = ["EvalConfig", "EvalError", "ProtocolMismatchError"]


SCORING = (
    "video_r1: prediction = first <answer>...</answer> (stripped), else the whole output; multiple choice: "
    "exact match; numerical: Video-R1 rule (round 2); regression: MRA over 0.50..0.95 (strict <); "
    "OCR: 1-WER; free-form: mean ROUGE-1/2/L"
)
# protocol keys that may differ between the runs of one resumable evaluation
PROTOCOL_IGNORED = ("date", "command", "media_root", "runtime")
BAD_SAMPLE_CHOICES = ("skip", "error")
ENGINES = ("hf", "vllm")

ROW_KEYS = ("problem_id", "problem", "data_type", "problem_type", "options", "solution", "path", "data_source")
SCHEMA_KEYS = {*ROW_KEYS, "process", "meta", "uid"}


class EvalError(RuntimeError):
    """An evaluation that cannot go on (a bad sample under ``--on_bad_sample error``, a bad file)."""


class ProtocolMismatchError(EvalError):
    """An existing results file was written with another protocol."""


# --------------------------------------------------------------------------------------------------
# options


PROTOCOL_VIDEO_MIN_PIXELS = 128 * 28 * 28  # Video-R1 / Video-KTR eval_bench.py: min_pixels of every video frame


@dataclass
class EvalConfig(MediaArgs, LogOptions):
    """Evaluate a model on a video reasoning benchmark (official or Video-R1-eval file) and write OUT/<benchmark>.json."""

    # the evaluation defaults of Video-R1 / Video-KTR (eval_bench.py): 16 frames of 128x28x28 to 256x28x28 pixels
    min_pixels: int | None = field(None, help="Fewest pixels per video frame after resizing; default 128x28x28 as the Video-R1 / Video-KTR evaluation code (capped at --max_pixels when that is smaller).")
    max_frames: int = field(16, help="Most frames sampled from a video (Video-R1/KTR evaluate with 16, 32 or 64).")
    max_pixels: int = field(256 * 28 * 28, help="Most pixels per video frame after resizing (evaluation: 256x28x28).")

    model_name_or_path: str = field("", help="Model to evaluate: a local directory or a hub id. [required]")
    benchmark: str = field("", help="Benchmark name (videoholmes, videomme, videommmu, mmvu, mvbench, tempcompass, vsibench, video_r1 for any Video-R1-schema file). [required]")
    data_file: str = field("", help="The benchmark's annotation file (official format or a Video-R1-eval eval_*.json), or folder for VideoMMMU/MVBench. [required]")
    media_root: str | None = field(None, help="Folder the rows' media paths are relative to (the benchmark's unpacked video folder); default: the data file's folder.")
    allow_outside_media_root: bool = field(False, help="Accept media paths that are absolute or lead outside --media_root (refused by default, as in train).")
    special_tokens: str = field("refuse", choices=["refuse", "escape"], help="Control tokens such as <|im_start|> or <|video_pad|> in a row's text: 'refuse' records the row as failed; 'escape' keeps it as plain text.")
    output_dir: str = field("", help="Where <benchmark>.json is written. [required]")

    temperature: float = field(0.1, help="Sampling temperature (Video-R1/KTR evaluation: 0.1).")
    top_p: float = field(0.001, help="Nucleus sampling mass (Video-R1/KTR evaluation: 0.001, i.e. nearly greedy).")
    greedy: bool = field(False, help="Greedy decoding (temperature 0); overrides --temperature and --top_p.")
    max_new_tokens: int = field(1024, help="Most tokens generated per answer.")
    batch_size: int = field(8, help="Prompts generated together (results do not depend on it).")
    seed: int = field(42, help="Seed of the per-row sampling streams (row seed = hash(seed, 'eval', uid)).")
    limit: int | None = field(None, help="Evaluate only the first N rows of the benchmark.")
    prompt_layout: str = field("eval", choices=list(OPTION_LAYOUTS), help="Multiple-choice layout: 'eval' (Video-R1 eval_bench.py: options joined by newlines) or 'train'.")
    system_prompt: str | None = field(None, help="A system turn to add; by default the chat template's default system turn is used.")

    engine: str = field("hf", choices=list(ENGINES), help="Generation engine: 'hf' (transformers, default) or 'vllm' (vLLM offline LLM; written against vLLM >= 0.10 but NOT exercised in this package's tests).")
    on_bad_sample: str = field("skip", choices=list(BAD_SAMPLE_CHOICES), help="A row whose media cannot be found or decoded: 'skip' records it as failed with the reason and counts it (never scored as a wrong answer); 'error' stops.")
    overwrite: bool = field(False, help="Replace an existing OUT/<benchmark>.json even if its protocol differs (default: resume it if the protocol matches, else refuse).")
    retry_failed: bool = field(False, help="When resuming, evaluate again the rows recorded as failed.")
    dtype: str = field("auto", choices=["auto", "float32", "bfloat16", "float16"], help="Model weights dtype ('auto': the checkpoint's).")
    device: str = field("auto", help="Device for the hf engine ('auto': cuda if available, else cpu).")
    attn_implementation: str | None = field("sdpa", help="Attention implementation for the hf engine (sdpa, eager, flash_attention_2).")
    trust_remote_code: bool = field(False, help="Allow custom model code from the hub.")
    tensor_parallel_size: int = field(1, help="vLLM only: GPUs to shard the model over.")
    gpu_memory_utilization: float = field(0.9, help="vLLM only: fraction of GPU memory vLLM may use.")
    max_model_len: int | None = field(None, help="vLLM only: context length to reserve (default: the model's).")
    progress: bool = field(True, help="Show a progress bar on stderr.")
    dataloader_prefetch: bool = field(True, help="Decode the next batch's media (and, with the hf engine, run the processor) in a background thread while this batch generates (same results).")

    def __post_init__(self) -> None:
        if self.min_pixels is None:  # the published protocol's 128x28x28, unless the frames are capped below it
            self.min_pixels = min(PROTOCOL_VIDEO_MIN_PIXELS, self.max_pixels)

    def validate(self) -> None:
        for name in ("model_name_or_path", "benchmark", "data_file", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        get_benchmark(self.benchmark)
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {self.limit}")
        self.frame_settings()

    @property
    def decoding(self) -> dict[str, Any]:
        return decoding_settings(self.temperature, self.top_p, self.max_new_tokens, self.greedy, self.seed)


def decoding_settings(temperature: float, top_p: float, max_new_tokens: int, greedy: bool, seed: int) -> dict[str, Any]:
    """The effective decoding (greedy: temperature 0, top_p not used)."""
    return {
        "temperature": 0.0 if greedy else float(temperature),
        "top_p": None if greedy else float(top_p),
        "max_new_tokens": int(max_new_tokens),
        "greedy": bool(greedy),
        "seed": int(seed),
    }
