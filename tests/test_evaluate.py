"""`video-ktr eval` / `video-ktr score` (video_ktr.evaluation.evaluate) and the vLLM request building (video_ktr.model.vllm_engine).

A tiny random Qwen2.5-VL (VK_TEST_ARCH: tests/family.py) and an 8-row synthetic test set; a fake engine (answers chosen per row) where
the scores must be non-trivial; a fake vLLM ``LLM`` object (vLLM is not installed here).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.family import SIDE, TEST_ARCH, F, px
from tests.paths import BENCHMARK_FIXTURES
from video_ktr.commands.eval import main
from video_ktr.commands.score import main as score_main
from video_ktr.core.rewards import eval_extract, eval_score
from video_ktr.data import synth
from video_ktr.data.media import FrameSettings
from video_ktr.data.prompts import build_messages, template_hash
from video_ktr.data.video import write_video
from video_ktr.evaluation import evaluate as ev
from video_ktr.evaluation.engine import HFEngine, load_media, prepare_rows
from video_ktr.evaluation.eval_config import EvalConfig, EvalError
from video_ktr.evaluation.evaluate import evaluate, evaluate_rows
from video_ktr.model import tiny
from video_ktr.model.inputs import Media
from video_ktr.model.sampling import row_seed
from video_ktr.model.vllm_engine import VLLMEngine, VLLMUnavailableError, build_request

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
             vision_depth=1, vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=2)
HOLMES = BENCHMARK_FIXTURES / "video_holmes" / "test_Video-Holmes.json"
# small frame settings and few new tokens keep every run well under a second
FAST = ["--max_new_tokens", "6", "--max_frames", "4", "--max_pixels", str(px(4)), "--progress", "false"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", arch=TEST_ARCH, **SMALL)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    synth.generate(out, num_train=0, num_test=8, seed=0, cell=F, size=SIDE)
    return out


def _args(tiny_dir, data_file, out_dir, *extra, benchmark="video_r1"):
    return ["--model_name_or_path", str(tiny_dir), "--benchmark", benchmark, "--data_file", str(data_file),
            "--output_dir", str(out_dir), *FAST, *extra]


def _run_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def first_run(tiny_dir, synth_dir, tmp_path_factory):
    """The real tiny model on the 8 synthetic rows, batch size 3."""
    out = tmp_path_factory.mktemp("eval1")
    rc, stdout, stderr = _run_main(_args(tiny_dir, synth_dir / "test.json", out, "--batch_size", "3"))
    assert rc == 0, stderr
    return out, json.loads((out / "video_r1.json").read_text()), stdout


class FakeEngine:
    """Answers from a table keyed by uid (found through the row seed); counts generated rows."""

    name = "fake"

    def __init__(self, outputs_by_uid: dict[str, str], seed: int = 42):
        self.by_seed = {row_seed(seed, "eval", uid): text for uid, text in outputs_by_uid.items()}
        self.calls: list[int] = []

    def generate(self, messages, media, seeds, *, max_new_tokens, temperature, top_p):
        assert len(messages) == len(media) == len(seeds)
        self.calls.append(len(seeds))
        return [self.by_seed[s] for s in seeds]


def _answer(row: dict) -> str:
    return row["solution"][len("<answer>"):-len("</answer>")]


def _mixed_outputs(rows: list[dict]) -> dict[str, str]:
    """Right answers (with reasoning) for even rows, a wrong letter or number for odd rows."""
    out = {}
    for i, r in enumerate(rows):
        uid = f"video_r1:{r['problem_id']}"
        if i % 2 == 0:
            out[uid] = f"<think>let me think</think> <answer> {_answer(r)} </answer>"
        else:
            out[uid] = "<answer>Z</answer>" if r["problem_type"] == "multiple choice" else "no tags, 99"
    return out


def _record_threads(monkeypatch, owner, name: str) -> list[str]:
    """Wrap ``owner.name`` so that each call records the name of the thread it ran in (the returned list)."""
    import threading

    threads: list[str] = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **kw: threads.append(threading.current_thread().name) or real(*a, **kw))
    return threads


def _hand_metrics(results: list[dict]) -> dict:
    scored = [r for r in results if r["score"] is not None]
    overall = sum(r["score"] for r in scored) / len(scored)
    by_kind: dict[str, list] = {}
    for r in results:
        e = by_kind.setdefault(r["meta"]["kind"], [[], 0])
        if r["score"] is None:
            e[1] += 1
        else:
            e[0].append(r["score"])
    return {"overall": overall, "by_kind": {k: {"accuracy": (sum(s) / len(s)) if s else None, "n": len(s), "n_failed": f}
                                            for k, (s, f) in by_kind.items()}}


# --------------------------------------------------------------------------------------------------
# the file written by `video-ktr eval`


def test_eval_writes_results_metrics_and_protocol(first_run, tiny_dir, synth_dir):
    out, payload, stdout = first_run
    assert set(payload) == {"results", "metrics", "protocol"}
    rows = json.loads((synth_dir / "test.json").read_text())
    results = payload["results"]
    assert [r["uid"] for r in results] == [f"video_r1:{r['problem_id']}" for r in rows]
    for r, row in zip(results, rows):
        assert r["problem"] == row["problem"] and r["solution"] == row["solution"]
        assert r["meta"]["kind"] == row["kind"]
        assert r["failed"] is None and isinstance(r["output"], str)
        assert r["prediction"] == eval_extract(r["output"])
        assert r["score"] == eval_score(r["output"], r["solution"], r["problem_type"])
        assert Path(r["media_path"]) == (synth_dir / row["path"]).resolve()

    m = payload["metrics"]
    hand = _hand_metrics(results)
    assert m["overall"] == hand["overall"] and m["num_samples"] == 8 and m["num_failed"] == 0
    assert m["by_kind"] == hand["by_kind"]

    p = payload["protocol"]
    assert p["model"] == str(Path(tiny_dir).resolve()) and p["benchmark"] == "video_r1"
    assert p["data_file"] == str((synth_dir / "test.json").resolve()) and p["num_rows"] == 8
    assert p["frames"]["max_frames"] == 4 and p["frames"]["max_pixels"] == px(4) and p["frames"]["fps"] == 2.0
    assert p["prompt"] == {"layout": "eval", "template_hash": template_hash("eval"), "system_prompt": None}
    assert p["decoding"] == {"temperature": 0.1, "top_p": 0.001, "max_new_tokens": 6, "greedy": False, "seed": 42}
    assert p["engine"] == "hf" and set(p["versions"]) >= {"torch", "transformers", "video_ktr"}
    assert p["date"] and p["command"].startswith("video-ktr eval --model_name_or_path")
    assert "overall (accuracy)" in stdout and "by_kind" in stdout


def test_eval_defaults_follow_video_r1_decoding():
    cfg = EvalConfig(model_name_or_path="m", benchmark="video_r1", data_file="f", output_dir="o")
    assert (cfg.max_frames, cfg.max_pixels, cfg.temperature, cfg.top_p) == (16, 256 * 28 * 28, 0.1, 0.001)
    assert (cfg.max_new_tokens, cfg.batch_size, cfg.prompt_layout, cfg.engine) == (1024, 8, "eval", "hf")
    cfg.greedy = True
    assert cfg.decoding["temperature"] == 0.0


def test_metrics_exact_with_known_answers(synth_dir, tmp_path):
    rows = json.loads((synth_dir / "test.json").read_text())
    fake = FakeEngine(_mixed_outputs(rows))
    cfg = EvalConfig(model_name_or_path="fake-model", benchmark="video_r1", data_file=str(synth_dir / "test.json"),
                     output_dir=str(tmp_path), max_frames=4, max_pixels=px(4), batch_size=8, progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = evaluate(cfg, engine=fake)
    payload = json.loads((tmp_path / "video_r1.json").read_text())
    results = payload["results"]
    assert [r["score"] for r in results] == [1.0 if i % 2 == 0 else 0.0 for i in range(8)]
    assert results[0]["prediction"] == _answer(rows[0])
    hand = _hand_metrics(results)
    assert metrics["overall"] == pytest.approx(0.5, abs=0) and metrics["overall"] == hand["overall"]
    assert metrics["by_kind"] == hand["by_kind"] == payload["metrics"]["by_kind"]
    types = {t: [r["score"] for r in results if r["problem_type"] == t] for t in {r["problem_type"] for r in results}}
    for t, scores in types.items():
        assert metrics["by_problem_type"][t]["accuracy"] == sum(scores) / len(scores)


# --------------------------------------------------------------------------------------------------
# resume, protocol, failures


def test_resume_skips_rows_already_done(first_run, tiny_dir, synth_dir, tmp_path, monkeypatch):
    out1, full, _ = first_run
    partial = dict(full)
    partial["results"] = full["results"][:3]
    (tmp_path / "video_r1.json").write_text(json.dumps(partial))

    generated: list[str] = []
    real_generate = HFEngine.generate

    def counting(self, messages, media, seeds, **kw):
        generated.extend(str(s) for s in seeds)
        return real_generate(self, messages, media, seeds, **kw)

    monkeypatch.setattr(HFEngine, "generate", counting)
    rc, _, stderr = _run_main(_args(tiny_dir, synth_dir / "test.json", tmp_path, "--batch_size", "2"))
    assert rc == 0, stderr
    assert "resuming" in stderr
    done_seeds = {str(row_seed(42, "eval", r["uid"])) for r in partial["results"]}
    assert len(generated) == 5 and not done_seeds & set(generated)
    final = json.loads((tmp_path / "video_r1.json").read_text())
    assert [r["uid"] for r in final["results"]] == [r["uid"] for r in full["results"]]
    assert final["results"][:3] == partial["results"]
    # one random stream per row: batch size 2 gives the answers batch size 3 gave
    assert [r["output"] for r in final["results"]] == [r["output"] for r in full["results"]]
    assert final["metrics"] == full["metrics"]


def test_different_protocol_is_refused(first_run, tiny_dir, synth_dir, tmp_path, monkeypatch):
    out1, _, _ = first_run
    shutil.copy(out1 / "video_r1.json", tmp_path / "video_r1.json")

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded when the protocol differs")

    monkeypatch.setattr("video_ktr.evaluation.evaluate.load_model", no_model)
    rc, _, stderr = _run_main(_args(tiny_dir, synth_dir / "test.json", tmp_path, "--temperature", "0.5"))
    assert rc == 2
    assert "different protocol" in stderr and "decoding.temperature: 0.1 (file) vs 0.5 (now)" in stderr
    assert "--overwrite" in stderr


def test_overwrite_replaces_a_different_protocol(first_run, tiny_dir, synth_dir, tmp_path):
    out1, _, _ = first_run
    shutil.copy(out1 / "video_r1.json", tmp_path / "video_r1.json")
    rc, _, stderr = _run_main(_args(tiny_dir, synth_dir / "test.json", tmp_path, "--greedy", "--overwrite", "true",
                                    "--limit", "2"))
    assert rc == 0, stderr
    payload = json.loads((tmp_path / "video_r1.json").read_text())
    assert len(payload["results"]) == 2 and payload["protocol"]["decoding"]["greedy"] is True
    assert payload["protocol"]["decoding"]["temperature"] == 0.0


@pytest.fixture
def broken_data(synth_dir, tmp_path):
    """The synthetic set with row 0's video corrupt and row 1's video missing."""
    data = tmp_path / "broken"
    shutil.copytree(synth_dir, data)
    rows = json.loads((data / "test.json").read_text())
    (data / rows[0]["path"]).write_bytes(b"\x00\x00\x00\x18ftypisom" + b"garbage" * 50)
    (data / rows[1]["path"]).unlink()
    return data, rows


def test_unreadable_media_is_counted_as_failed_not_scored(broken_data, tmp_path):
    data, rows = broken_data
    fake = FakeEngine(_mixed_outputs(rows))
    cfg = EvalConfig(model_name_or_path="fake-model", benchmark="video_r1", data_file=str(data / "test.json"),
                     output_dir=str(tmp_path / "out"), max_frames=4, max_pixels=px(4), batch_size=4,
                     progress=False)
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        metrics = evaluate(cfg, engine=fake)
    assert sum(fake.calls) == 6  # the two bad rows never reach the model
    results = json.loads((tmp_path / "out" / "video_r1.json").read_text())["results"]
    bad = results[:2]
    for r in bad:
        assert r["score"] is None and r["output"] is None and r["prediction"] is None
    assert "corrupt" in bad[0]["failed"] or "cannot open" in bad[0]["failed"]
    assert "not found" in bad[1]["failed"]
    assert all(r["failed"] is None and r["score"] is not None for r in results[2:])
    assert metrics["num_failed"] == 2 and metrics["num_scored"] == 6
    assert [f["uid"] for f in metrics["failures"]] == ["video_r1:0", "video_r1:1"]
    scores = [r["score"] for r in results[2:]]
    assert metrics["overall"] == sum(scores) / 6
    assert metrics["overall_all_rows"] == sum(scores) / 8
    assert sum(e["n_failed"] for e in metrics["by_kind"].values()) == 2
    assert "2 failed" in stdout.getvalue()


def test_on_bad_sample_error_stops(broken_data, tmp_path):
    data, rows = broken_data
    cfg = EvalConfig(model_name_or_path="fake-model", benchmark="video_r1", data_file=str(data / "test.json"),
                     output_dir=str(tmp_path / "out"), max_frames=4, max_pixels=px(4), on_bad_sample="error",
                     progress=False)
    with pytest.raises(EvalError, match="video_r1:0"):
        evaluate(cfg, engine=FakeEngine(_mixed_outputs(rows)))



def test_media_prefetch_gives_the_same_results_and_failures(broken_data, monkeypatch):
    """The next batch's media decode in a thread while this batch generates: the same results, failures
    and engine calls as loading in the loop, a bad file raised at its own batch, and the thread stopped."""
    import threading

    data, rows = broken_data
    rows = rows[2:] + rows[:2]  # the bad rows land in the last batch, which is prefetched
    settings = FrameSettings(max_frames=4, max_pixels=px(4), factor=F)
    threads = _record_threads(monkeypatch, ev, "load_batch")
    runs = {}
    for prefetch in (False, True):
        threads.clear()
        fake = FakeEngine(_mixed_outputs(rows))
        results, metrics = evaluate_rows(None, None, rows, data, settings, engine=fake, batch_size=3, prefetch=prefetch)
        runs[prefetch] = (results, metrics, fake.calls, list(threads))
    (plain, plain_metrics, plain_calls, plain_threads), (fetched, fetched_metrics, fetched_calls, fetched_threads) = (
        runs[False], runs[True])
    assert fetched == plain and fetched_metrics == plain_metrics and fetched_calls == plain_calls == [3, 3]
    assert [r["uid"] for r in fetched if r["failed"]] == ["video_r1:0", "video_r1:1"]
    assert all(name == threading.current_thread().name for name in plain_threads)
    assert len(fetched_threads) == 3 and all(name.startswith("video-ktr-eval-media") for name in fetched_threads[1:])
    assert not [t for t in threading.enumerate() if t.name.startswith("video-ktr-eval-media")]
    # with --on_bad_sample error the prefetched bad batch stops the run at that batch, naming the row
    fake = FakeEngine(_mixed_outputs(rows))
    with pytest.raises(EvalError, match="row video_r1:0"):
        evaluate_rows(None, None, rows, data, settings, engine=fake, batch_size=3, on_bad_sample="error")
    assert fake.calls == [3, 3]  # the two good batches were answered first
    assert not [t for t in threading.enumerate() if t.name.startswith("video-ktr-eval-media")]


# --------------------------------------------------------------------------------------------------
# video-ktr score


def test_score_reproduces_eval_metrics(first_run, broken_data, tmp_path):
    # the real tiny model's file
    out1, full, _ = first_run
    f1 = tmp_path / "real.json"
    shutil.copy(out1 / "video_r1.json", f1)
    with contextlib.redirect_stdout(io.StringIO()):
        assert score_main([str(f1)]) == 0
    assert json.loads(f1.read_text())["metrics"] == full["metrics"]

    # a file with right, wrong and failed rows, its predictions, scores and metrics wiped
    data, rows = broken_data
    cfg = EvalConfig(model_name_or_path="fake-model", benchmark="video_r1", data_file=str(data / "test.json"),
                     output_dir=str(tmp_path / "out"), max_frames=4, max_pixels=px(4), progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = evaluate(cfg, engine=FakeEngine(_mixed_outputs(rows)))
    f2 = tmp_path / "out" / "video_r1.json"
    original = json.loads(f2.read_text())
    tampered = json.loads(f2.read_text())
    for r in tampered["results"]:
        r["prediction"], r["score"] = "X", (None if r["failed"] else 0.0)
    tampered["metrics"] = {}
    f2.write_text(json.dumps(tampered))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert score_main([str(f2)]) == 0
    rescored = json.loads(f2.read_text())
    assert rescored["metrics"] == metrics == original["metrics"]
    assert rescored["results"] == original["results"]
    assert [r["failed"] is not None for r in rescored["results"]] == [True, True] + [False] * 6
    assert "overall (accuracy)" in out.getvalue()


def test_score_rejects_a_missing_file(tmp_path, capsys):
    assert score_main([str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# official files, in-process use


def test_official_video_holmes_file_through_eval(tiny_dir, tmp_path):
    media = tmp_path / "holmes"
    frames = np.zeros((8, 56, 56, 3), dtype=np.uint8)
    frames[:, :28] = (255, 0, 0)
    write_video(media / "videos" / "zzFAKEhol01.mp4", frames, 4.0)  # zzFAKEhol02's video is absent
    out = tmp_path / "out"
    rc, stdout, stderr = _run_main(_args(tiny_dir, HOLMES, out, "--media_root", str(media), benchmark="Video-Holmes"))
    assert rc == 0, stderr
    payload = json.loads((out / "videoholmes.json").read_text())
    results = payload["results"]
    assert [r["uid"] for r in results] == ["videoholmes:zzFAKEhol01:1", "videoholmes:zzFAKEhol01:2",
                                           "videoholmes:zzFAKEhol02:3", "videoholmes:zzFAKEhol02:4"]
    assert [r["failed"] is None for r in results] == [True, True, False, False]
    assert all("not found" in r["failed"] for r in results[2:])
    assert results[0]["options"][0].startswith("A. ") and results[0]["solution"] == "<answer>C</answer>"
    m = payload["metrics"]
    assert m["num_failed"] == 2 and m["num_scored"] == 2
    assert m["by_question_type"]["SR"]["n"] == 1 and m["by_question_type"]["PAR"]["n_failed"] == 1
    assert "by_kind" not in m
    assert "by_question_type" in stdout


def test_evaluate_rows_in_process_on_raw_rows(first_run, tiny_dir, synth_dir):
    from video_ktr.model.loading import load_model, load_processor

    _, full, _ = first_run
    rows = json.loads((synth_dir / "test.json").read_text())  # raw rows: "kind" at the top level
    model, processor = load_model(str(tiny_dir)), load_processor(str(tiny_dir))
    settings = FrameSettings(max_frames=4, max_pixels=px(4), factor=F)
    results, metrics = evaluate_rows(model, processor, rows, synth_dir, settings, max_new_tokens=6, batch_size=8)
    assert [r["uid"] for r in results] == [r["uid"] for r in full["results"]]
    assert [r["meta"]["kind"] for r in results] == [r["kind"] for r in rows]
    # same seeds, settings and uids as the CLI run with batch size 3: same answers
    assert [r["output"] for r in results] == [r["output"] for r in full["results"]]
    assert metrics["by_kind"] == full["metrics"]["by_kind"]


def test_hf_engine_prepares_the_next_batch_in_the_prefetch_thread(first_run, tiny_dir, synth_dir, monkeypatch):
    """With prefetch the hf engine's processor call runs in the prefetch thread, on its own processor copy:
    the same answers as without prefetch (and as the CLI run), and a processor error names the batch's rows."""
    import threading

    from video_ktr.model.loading import load_model, load_processor

    _, full, _ = first_run
    rows = json.loads((synth_dir / "test.json").read_text())
    model, processor = load_model(str(tiny_dir)), load_processor(str(tiny_dir))
    settings = FrameSettings(max_frames=4, max_pixels=px(4), factor=F)
    engine = HFEngine(model, processor)
    assert engine.decoder == "hf"  # on a CPU the transformers path, as 'auto' chose before (a kept static decoder on CUDA)
    threads = _record_threads(monkeypatch, engine, "prepare")
    outputs = {}
    for prefetch in (True, False):
        threads.clear()
        results, _ = evaluate_rows(model, processor, rows, synth_dir, settings, max_new_tokens=6, batch_size=3,
                                   engine=engine, prefetch=prefetch)
        outputs[prefetch] = [r["output"] for r in results]
        if prefetch:
            assert len(threads) == 3 and all(t.startswith("video-ktr-eval-media") for t in threads[1:])
        else:
            assert threads == [threading.current_thread().name] * 3
    assert outputs[True] == outputs[False] == [r["output"] for r in full["results"]]
    assert engine._prepare_processor is not None and engine._prepare_processor is not processor

    def broken(*a):
        raise ValueError("processor exploded")

    monkeypatch.setattr(engine, "prepare", broken)
    with pytest.raises(EvalError, match=r"generation failed for rows video_r1:0, video_r1:1, video_r1:2: ValueError"):
        evaluate_rows(model, processor, rows, synth_dir, settings, max_new_tokens=6, batch_size=3, engine=engine,
                      on_bad_sample="error")  # under skip the batch is retried row by row (test_user_mistakes)


def test_prepare_rows_rejects_duplicates_and_bad_types():
    row = {"problem_id": 1, "problem": "q", "problem_type": "multiple-choice", "options": ["A. x"],
           "solution": "<answer>A</answer>", "path": "./v.mp4", "kind": "k"}
    (r,) = prepare_rows([row])
    assert r["problem_type"] == "multiple choice" and r["meta"] == {"kind": "k"} and r["uid"] == "video_r1:1"
    with pytest.raises(ValueError, match="duplicate uid"):
        prepare_rows([row, dict(row)])
    with pytest.raises(ValueError, match="problem_type"):
        prepare_rows([{**row, "problem_type": "essay"}])


# --------------------------------------------------------------------------------------------------
# vLLM engine (request building only: vLLM is not installed here)


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


class FakeLLM:
    def __init__(self):
        self.requests, self.params = [], []

    def generate(self, requests, sampling_params=None, use_tqdm=True):
        self.requests.extend(requests)
        self.params.extend(sampling_params)

        class Out:
            def __init__(self, text):
                self.outputs = [type("Completion", (), {"text": text})()]

        return [Out(f"<answer>{chr(65 + i)}</answer>") for i in range(len(requests))]


def test_vllm_requests_built_from_our_frames(tiny_dir, synth_dir):
    from video_ktr.model.loading import load_processor

    processor = load_processor(str(tiny_dir))
    rows = prepare_rows(json.loads((synth_dir / "test.json").read_text()))
    settings = FrameSettings(max_frames=4, max_pixels=px(4), factor=F)
    video = load_media(synth_dir / rows[1]["path"], "video", settings)
    image = Media(image=Image.new("RGB", (SIDE, SIDE), (0, 255, 0)))
    messages = [build_messages(r["problem"], r["problem_type"], r["options"], dt, layout="eval")
                for r, dt in ((rows[1], "video"), (rows[2], "image"))]
    llm = FakeLLM()
    engine = VLLMEngine(llm, processor, stop_token_ids=(7, 9), sampling_params_cls=FakeSamplingParams)
    texts = engine.generate(messages, [video, image], [5, 2**64 + 3], max_new_tokens=9, temperature=0.1, top_p=0.001)
    assert texts == ["<answer>A</answer>", "<answer>B</answer>"]

    vreq, ireq = llm.requests
    assert vreq["prompt"].count("<|vision_start|><|video_pad|><|vision_end|>") == 1
    assert rows[1]["problem"] in vreq["prompt"] and vreq["prompt"].endswith("<|im_start|>assistant\n")
    ((frames, meta),) = vreq["multi_modal_data"]["video"]
    assert frames.dtype == np.uint8 and frames.shape == (4, SIDE, SIDE, 3)
    np.testing.assert_array_equal(frames, video.video.frames.permute(0, 2, 3, 1).numpy())
    assert meta["frames_indices"] == video.video.frame_indices and meta["fps"] == video.video.source_fps
    assert meta["total_num_frames"] == video.video.total_frames and meta["do_sample_frames"] is False
    assert vreq["mm_processor_kwargs"] == {"fps": video.video.sampled_fps, "do_sample_frames": False}
    assert ireq["multi_modal_data"] == {"image": image.image} and "<|image_pad|>" in ireq["prompt"]

    p0, p1 = (p.kw for p in llm.params)
    assert p0 == {"temperature": 0.1, "top_p": 0.001, "max_tokens": 9, "seed": 5, "stop_token_ids": [7, 9]}
    assert p1["seed"] == 3  # folded into vLLM's 63-bit range
    greedy = engine.sampling_params([1], max_new_tokens=4, temperature=0.0, top_p=0.001)[0].kw
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0
    assert build_request("text only", None) == {"prompt": "text only"}


def test_vllm_engine_drives_evaluate_rows(tiny_dir, synth_dir):
    from video_ktr.model.loading import load_processor

    rows = json.loads((synth_dir / "test.json").read_text())[:3]
    llm = FakeLLM()
    engine = VLLMEngine(llm, load_processor(str(tiny_dir)), stop_token_ids=(1,), sampling_params_cls=FakeSamplingParams)
    settings = FrameSettings(max_frames=4, max_pixels=px(4), factor=F)
    results, metrics = evaluate_rows(None, None, rows, synth_dir, settings, engine=engine, batch_size=2, seed=3)
    assert len(llm.requests) == 3 and [p.kw["seed"] for p in llm.params] == [
        row_seed(3, "eval", f"video_r1:{r['problem_id']}") for r in rows]
    assert [r["output"] for r in results] == ["<answer>A</answer>", "<answer>B</answer>", "<answer>A</answer>"]
    assert metrics["num_samples"] == 3


def test_vllm_missing_gives_a_clear_error(tiny_dir, synth_dir, tmp_path):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover
        pytest.skip("vLLM is installed")
    with pytest.raises(VLLMUnavailableError, match="pip install"):
        VLLMEngine(FakeLLM(), None)
    rc, _, stderr = _run_main(_args(tiny_dir, synth_dir / "test.json", tmp_path, "--engine", "vllm"))
    assert rc == 2 and "needs vLLM" in stderr
