"""Shared fixtures: one tiny random model (Qwen2.5-VL, or VK_TEST_ARCH's family: tests/family.py) and one
small synthetic data set per test session.

Building them takes about 4 s; every trainer / probe / sampling test reuses them (read-only: a test
that trains writes only into its own tmp_path).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process (subprocesses inherit it): the tiny models gain nothing from a
# second thread, and on 2 shared cores a busy neighbour makes 2-thread runs about 5x slower
# (measured: 4 two-step trainer runs 14 s with 1 thread, 70 s with 2). Override with VK_TEST_THREADS.
_THREADS = os.environ.get("VK_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", _THREADS)

import torch  # noqa: E402

torch.set_num_threads(int(_THREADS))

# VK_TEST_ARCH=qwen2_vl (or another adapter's name) runs the suite on that family's tiny model; the synthetic
# frames and the media settings below follow its frame factor F (28 for Qwen2/2.5-VL, 32 for Qwen3-VL)
from tests.family import SIDE, SMALL_MEDIA, TEST_ARCH, F, frame_settings  # noqa: E402,F401


@dataclass(frozen=True)
class TinySetup:
    model_dir: Path
    data_dir: Path

    @property
    def train_json(self) -> Path:
        return self.data_dir / "train.json"

    @property
    def test_json(self) -> Path:
        return self.data_dir / "test.json"

    def frame_settings(self, **overrides):
        return frame_settings(**overrides)

    def samples(self, split: str = "train"):
        from video_ktr.data.rows import load_dataset

        return load_dataset(self.data_dir / f"{split}.json")

    def media(self, sample, **frame_overrides):
        """The decoded visual item of a sample (a model_inputs.Media)."""
        from video_ktr.data.media import load_image
        from video_ktr.data.video import load_video
        from video_ktr.model.inputs import Media

        settings = self.frame_settings(**frame_overrides)
        if sample.data_type == "video":
            return Media(video=load_video(sample.media_path, settings))
        return Media(image=load_image(sample.media_path, settings))

    def train_args(self, output_dir: str | Path, *extra: str) -> list[str]:
        """`video-ktr train` arguments for a small run on the session model and data (extra args win)."""
        return [
            "--model_name_or_path", str(self.model_dir), "--dataset", str(self.train_json),
            "--output_dir", str(output_dir), *SMALL_MEDIA,
            "--num_generations", "4", "--per_device_train_batch_size", "2", "--max_completion_length", "16",
            "--logging_steps", "0", *extra,
        ]


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory) -> TinySetup:
    """ONE tiny model (seed 0) and ONE synthetic data set (24 train / 8 test rows, a quarter images)."""
    from video_ktr.data import synth
    from video_ktr.model.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-setup")
    model_dir = build_tiny_model(root / "model", seed=0, arch=TEST_ARCH)
    synth.generate(root / "data", num_train=24, num_test=8, image_fraction=0.25, seed=0, cell=F, size=SIDE)
    return TinySetup(model_dir=Path(model_dir), data_dir=root / "data")


@pytest.fixture(scope="session")
def tiny_model(tiny_setup):
    """(model, processor) of the session checkpoint, in eval mode. Do not train it in place."""
    from video_ktr.model.loading import load_model, load_processor

    model = load_model(str(tiny_setup.model_dir), dtype="float32", attn_implementation="sdpa")
    model.eval()
    processor = load_processor(str(tiny_setup.model_dir))
    return model, processor
