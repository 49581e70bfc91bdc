"""Answer one question about a video or an image (``video-ktr infer``).

::

    video-ktr infer --model_name_or_path M --video clip.mp4 --question "What happens first?" \\
        --problem_type "multiple choice" --options "A. a cat jumps" "B. a dog barks"

prints the reasoning (the ``<think>`` block) and the answer (the ``<answer>`` block, or the whole output
when there is none, as evaluation scores it) separately; ``--raw true`` also prints the raw output.
The prompt is the one evaluation uses (Video-R1 template, ``--prompt_layout eval``), and frames are
sampled with the same settings as ``video-ktr eval`` (16 frames of at most 256x28x28 pixels by
default, sides multiples of the model family's factor: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL).
``--options`` takes several values or one comma-separated list; options without letters ("red,
green") are lettered A., B., ... Without ``--problem_type`` a question with options is multiple
choice, else free-form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from video_ktr.core.rewards import PROBLEM_TYPES, eval_extract, normalize_problem_type
from video_ktr.data.media import MediaError
from video_ktr.data.options import MediaArgs
from video_ktr.data.prompts import OPTION_LAYOUTS, build_messages
from video_ktr.evaluation.engine import HFEngine, load_media, pick_device
from video_ktr.model.adapters import frames_for
from video_ktr.model.loading import load_model, load_processor
from video_ktr.model.sampling import row_seed
from video_ktr.model.vllm_engine import VLLMEngine
from video_ktr.utils.config import build_parser, field, from_dict, load_yaml

__all__ = ["InferConfig", "InferError", "normalize_options", "parse_infer_args", "run", "split_output"]

PROG = "video-ktr infer"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LETTERED = re.compile(r"^\s*([A-Z])\s*[.):]\s*(.*)$", re.DOTALL)
_LETTERED_SPLIT = re.compile(r",\s*(?=[A-Z]\s*[.):]\s)")


class InferError(ValueError):
    """A problem with the request (missing file, bad options) that stops ``video-ktr infer``."""


@dataclass
class InferConfig(MediaArgs):
    """Answer one question about a video or an image and print the reasoning and the answer separately."""

    max_frames: int = field(16, help="Most frames sampled from a video (as `video-ktr eval`).")
    max_pixels: int = field(256 * 28 * 28, help="Most pixels per video frame after resizing (as `video-ktr eval`).")

    model_name_or_path: str = field("", help="Model: a local directory or a hub id. [required]")
    video: str | None = field(None, help="The video file to ask about (give --video or --image).")
    image: str | None = field(None, help="The image file to ask about (give --video or --image).")
    question: str = field("", help="The question. [required]")
    problem_type: str | None = field(None, help=f"One of: {', '.join(PROBLEM_TYPES)} (default: multiple choice with --options, else free-form).")
    options: list[str] | None = field(None, help='Answer options: several values (--options "A. x" "B. y") or one comma-separated list; unlettered options are lettered A., B., ...')
    max_new_tokens: int = field(1024, help="Most tokens generated.")
    greedy: bool = field(False, help="Greedy decoding (temperature 0).")
    temperature: float = field(0.1, help="Sampling temperature (Video-R1/KTR evaluation: 0.1).")
    top_p: float = field(0.001, help="Nucleus sampling mass (Video-R1/KTR evaluation: 0.001).")
    seed: int = field(0, help="Sampling seed.")
    prompt_layout: str = field("eval", choices=list(OPTION_LAYOUTS), help="Multiple-choice layout of the prompt ('eval' as Video-R1 evaluation, or 'train').")
    system_prompt: str | None = field(None, help="A system turn to add; by default the chat template's default system turn is used.")
    raw: bool = field(False, help="Also print the raw model output.")
    engine: str = field("hf", choices=["hf", "vllm"], help="'hf' (transformers) or 'vllm' (NOT exercised in this package's tests).")
    dtype: str = field("auto", choices=["auto", "float32", "bfloat16", "float16"], help="Model weights dtype ('auto': the checkpoint's).")
    device: str = field("auto", help="Device ('auto': cuda if available, else cpu).")
    attn_implementation: str | None = field("sdpa", help="Attention implementation for the hf engine.")
    trust_remote_code: bool = field(False, help="Allow custom model code from the hub.")

    def validate(self) -> None:
        if not self.model_name_or_path:
            raise ValueError("--model_name_or_path is required")
        if not self.question.strip():
            raise ValueError("--question is required")
        if (self.video is None) == (self.image is None):
            raise ValueError("give exactly one of --video FILE or --image FILE")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("--temperature must be >= 0 and --top_p in (0, 1]")
        self.frame_settings()


def normalize_options(options: list[str] | None) -> list[str] | None:
    """Options as ``["A. text", "B. text", ...]``.

    One value is split on commas (between lettered options only when it is lettered, so "A. red, green,
    B. blue" keeps its commas); "A) x", "A: x" and "A.x" become "A. x"; unlettered options get letters.
    Raises InferError for letters out of order or a mix of lettered and unlettered options.
    """
    if not options:
        return None
    items = [o for o in options if o.strip()]
    if len(items) == 1:
        one = items[0].strip()
        parts = _LETTERED_SPLIT.split(one) if _LETTERED.match(one) else one.split(",")
        items = [p.strip() for p in parts if p.strip()]
    matches = [_LETTERED.match(o) for o in items]
    if all(m is None for m in matches):
        return [f"{_LETTERS[i]}. {o.strip()}" for i, o in enumerate(items)]
    if any(m is None for m in matches):
        raise InferError(f"--options mixes lettered and unlettered options: {items}")
    out = []
    for i, m in enumerate(matches):
        if m.group(1) != _LETTERS[i]:
            raise InferError(f"--options: option {i + 1} is lettered {m.group(1)!r}, expected {_LETTERS[i]!r}: {items}")
        out.append(f"{m.group(1)}. {m.group(2).strip()}")
    return out


def split_output(text: str) -> tuple[str | None, str]:
    """(reasoning, answer): the first ``<think>...</think>`` content (None if absent) and
    :func:`video_ktr.core.rewards.eval_extract` of the output."""
    reasoning = None
    start = text.find("<think>")
    if start >= 0:
        end = text.find("</think>", start + len("<think>"))
        reasoning = text[start + len("<think>"): end if end >= 0 else len(text)].strip()
    return reasoning, eval_extract(text)


def parse_infer_args(argv: list[str]) -> InferConfig:
    """Parse the command line; ``--options`` takes one or more values (up to the next ``--flag``)."""
    parser = build_parser(InferConfig, prog=PROG)
    rest: list[str] = []
    options: list[str] | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--options" or arg.startswith("--options="):
            options = [] if options is None else options
            if arg.startswith("--options="):
                options.append(arg.split("=", 1)[1])
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                options.append(argv[i])
                i += 1
            continue
        rest.append(arg)
        i += 1
    ns = vars(parser.parse_args(rest))
    config_path = ns.pop("config", None)
    values: dict[str, Any] = load_yaml(config_path) if config_path else {}
    values.update(ns)
    if options is not None:
        if not options:
            parser.error("--options needs at least one value")
        values["options"] = options
    try:
        return from_dict(InferConfig, values, source="arguments")
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable


def _question(cfg: InferConfig) -> tuple[str, list[str] | None]:
    options = normalize_options(cfg.options)
    if cfg.problem_type is None:
        ptype = "multiple choice" if options else "free-form"
    else:
        try:
            ptype = normalize_problem_type(cfg.problem_type)
        except ValueError as exc:
            raise InferError(str(exc)) from None
    if ptype == "multiple choice" and not options:
        raise InferError("a multiple choice question needs --options")
    return ptype, options


def run(cfg: InferConfig, *, model: Any = None, processor: Any = None, engine: Any = None) -> dict[str, Any]:
    """Answer the question; returns ``{"output", "reasoning", "answer", "problem_type", "options"}``.

    Raises InferError for a missing or unreadable media file (checked before the model is loaded; the
    processor is loaded first, as its family sets the frame-side factor).
    """

    cfg.validate()
    ptype, options = _question(cfg)
    data_type = "video" if cfg.video is not None else "image"
    path = Path(cfg.video if cfg.video is not None else cfg.image)
    if not path.exists():
        raise InferError(f"{data_type} file not found: {path}")
    if not path.is_file():
        raise InferError(f"{data_type} path is not a file: {path}")
    if processor is None:
        processor = (getattr(engine, "processor", None) if engine is not None
                     else load_processor(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code))
    settings = frames_for(processor, cfg.frame_settings())  # the family's side factor, as eval and train
    try:
        media = load_media(path, data_type, settings)
    except MediaError as exc:
        raise InferError(str(exc)) from exc

    if engine is None:
        if cfg.engine == "vllm":

            engine = VLLMEngine.from_pretrained(cfg.model_name_or_path, processor=processor, dtype=cfg.dtype,
                                                seed=cfg.seed, trust_remote_code=cfg.trust_remote_code)
        else:
            if model is None:

                model = load_model(cfg.model_name_or_path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                                   trust_remote_code=cfg.trust_remote_code, device=pick_device(cfg.device))
                model.eval()
            engine = HFEngine(model, processor)

    messages = build_messages(cfg.question, ptype, options, data_type, layout=cfg.prompt_layout,
                              system_prompt=cfg.system_prompt)
    (text,) = engine.generate(
        [messages], [media], [row_seed(cfg.seed, "infer")], max_new_tokens=cfg.max_new_tokens,
        temperature=0.0 if cfg.greedy else cfg.temperature, top_p=1.0 if cfg.greedy else cfg.top_p,
    )
    reasoning, answer = split_output(text)
    return {"output": text, "reasoning": reasoning, "answer": answer, "problem_type": ptype, "options": options}
