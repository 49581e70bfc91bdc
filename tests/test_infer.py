"""`video-ktr infer` (video_ktr.evaluation.inference): one question about a real video or an image, with a tiny model."""

from __future__ import annotations

import pytest
from PIL import Image

from video_ktr.commands.infer import main
from video_ktr.evaluation import inference as infer
from video_ktr.evaluation.engine import HFEngine
from video_ktr.evaluation.inference import InferError, normalize_options, parse_infer_args, split_output
from video_ktr.model import tiny

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
             vision_depth=1, vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=2)
from tests.family import TEST_ARCH, px  # noqa: E402
from tests.paths import REAL_VIDEO  # noqa: E402

SMALL_FRAMES = ["--max_frames", "4", "--min_frames", "4", "--max_pixels", str(px(4))]  # the family's cells


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", arch=TEST_ARCH, **SMALL)


def test_infer_on_a_real_video(tiny_dir, capsys):
    rc = main(["--model_name_or_path", str(tiny_dir), "--video", str(REAL_VIDEO), "--question", "What happens in the video?",
               "--problem_type", "multiple choice", "--options", "A. a car passes", "B. nothing moves",
               "--max_new_tokens", "16", *SMALL_FRAMES])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "Reasoning:"
    assert any(line.startswith("Answer:") for line in lines)
    assert "Raw output:" not in out


def test_infer_image_prints_reasoning_answer_and_raw(tiny_dir, tmp_path, capsys, monkeypatch):
    image = tmp_path / "square.png"
    Image.new("RGB", (56, 56), (255, 0, 0)).save(image)
    seen = {}

    def fixed(self, messages, media, seeds, **kw):
        seen.update(messages=messages, media=media, kw=kw)
        return ["<think>the square is red</think> <answer>A</answer>"]

    monkeypatch.setattr(HFEngine, "generate", fixed)
    rc = main(["--model_name_or_path", str(tiny_dir), "--image", str(image), "--question", "What colour is the square?",
               "--options", "red, green, blue", "--greedy", "--raw", "true"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Reasoning:\nthe square is red\n" in out
    assert "\nAnswer: A\n" in out
    assert "Raw output:\n<think>the square is red</think> <answer>A</answer>" in out
    (msgs,) = seen["messages"]
    text = msgs[-1]["content"][-1]["text"]
    assert msgs[-1]["content"][0] == {"type": "image"}
    assert text.startswith("What colour is the square?Options:\nA. red\nB. green\nC. blue\nPlease think")
    assert text.endswith("Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.")
    assert seen["media"][0].kind == "image" and seen["kw"]["temperature"] == 0.0


def test_missing_file_is_a_clear_error_before_loading_the_model(tiny_dir, tmp_path, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded for a missing file")

    monkeypatch.setattr("video_ktr.evaluation.inference.load_model", no_model)
    rc = main(["--model_name_or_path", str(tiny_dir), "--video", str(tmp_path / "nope.mp4"), "--question", "Why?"])
    err = capsys.readouterr().err
    assert rc == 2 and "video file not found" in err and "nope.mp4" in err

    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video at all" * 20)
    rc = main(["--model_name_or_path", str(tiny_dir), "--video", str(corrupt), "--question", "Why?"])
    assert rc == 2 and "corrupt.mp4" in capsys.readouterr().err


def test_infer_cuts_frames_at_the_family_factor_on_qwen3_vl(tmp_path, monkeypatch):
    """Qwen3-VL's frame sides must be multiples of 32: infer asks the adapter (frames_for) as eval and train do
    (it decoded at 28 before, which the Qwen3-VL processor would resize again)."""
    qwen3 = tiny.build_tiny_model(tmp_path / "qwen3", arch="qwen3_vl", seed=0)
    seen = []
    real_generate = HFEngine.generate

    def recording(self, messages, media, seeds, **kw):
        seen.extend(media)
        return real_generate(self, messages, media, seeds, **kw)

    monkeypatch.setattr(HFEngine, "generate", recording)
    image = tmp_path / "wide.png"
    Image.new("RGB", (100, 60), (0, 90, 200)).save(image)
    for media_flag, path in (("--video", str(REAL_VIDEO)), ("--image", str(image))):
        cfg = parse_infer_args(["--model_name_or_path", str(qwen3), media_flag, path, "--question", "What is shown?",
                                "--max_new_tokens", "4", "--max_frames", "4", "--min_frames", "4",
                                "--max_pixels", str(4 * 32 * 32), "--image_max_pixels", str(6 * 32 * 32)])
        result = infer.run(cfg)
        assert isinstance(result["output"], str)
    video, picture = seen
    height, width = video.video.frames.shape[-2:]
    assert video.video.frames.shape[0] == 4 and height % 32 == 0 and width % 32 == 0, (height, width)
    assert picture.image.size[0] % 32 == 0 and picture.image.size[1] % 32 == 0, picture.image.size
    # the Qwen2.5-VL default is unchanged: multiples of 28
    seen.clear()
    cfg = parse_infer_args(["--model_name_or_path", str(tiny.build_tiny_model(tmp_path / "q25", **SMALL)), "--image",
                            str(image), "--question", "What is shown?", "--max_new_tokens", "2",
                            "--image_max_pixels", str(6 * 28 * 28)])
    infer.run(cfg)
    assert seen[0].image.size[0] % 28 == 0 and seen[0].image.size[1] % 28 == 0 and seen[0].image.size[0] % 32 != 0


def test_bad_requests_are_refused(tiny_dir, tmp_path, capsys):
    base = ["--model_name_or_path", str(tiny_dir), "--question", "Why?"]
    with pytest.raises(SystemExit) as exc:
        main(base)  # neither --video nor --image
    assert exc.value.code == 2 and "exactly one of --video" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--video", "a.mp4", "--image", "b.png"])
    image = tmp_path / "x.png"
    Image.new("RGB", (28, 28)).save(image)
    assert main([*base, "--image", str(image), "--problem_type", "multiple choice"]) == 2
    assert "needs --options" in capsys.readouterr().err


def test_options_parsing():
    cfg = parse_infer_args(["--model_name_or_path", "m", "--video", "v.mp4", "--question", "q",
                            "--options", "A. red, dark", "B. blue", "--max_new_tokens", "3"])
    assert cfg.options == ["A. red, dark", "B. blue"] and cfg.max_new_tokens == 3
    cfg = parse_infer_args(["--model_name_or_path", "m", "--video", "v.mp4", "--question", "q",
                            "--options=A. red, dark, B. blue"])
    assert normalize_options(cfg.options) == ["A. red, dark", "B. blue"]
    assert normalize_options(["red, green"]) == ["A. red", "B. green"]
    assert normalize_options(["A) x", "B: y", "C.z"]) == ["A. x", "B. y", "C. z"]
    assert normalize_options(None) is None
    with pytest.raises(InferError, match="expected 'B'"):
        normalize_options(["A. x", "C. y"])
    with pytest.raises(InferError, match="mixes"):
        normalize_options(["A. x", "y"])


def test_split_output():
    assert split_output("<think> hmm </think>\n<answer> B </answer>") == ("hmm", "B")
    assert split_output("just 42") == (None, "just 42")
    assert split_output("<think>unfinished") == ("unfinished", "<think>unfinished")
    assert infer._question(infer.InferConfig(model_name_or_path="m", video="v", question="q"))[0] == "free-form"
