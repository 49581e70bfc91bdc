"""Benchmark loaders (official formats + Video-R1-eval files) and metrics, on the fixtures in tests/fixtures.

Every expected number below is computed by hand in the comments. Missing fixtures fail (no skips).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.paths import BENCHMARK_FIXTURES
from video_ktr.evaluation.tasks.base import MISSING, BenchmarkDataError, detect_format
from video_ktr.evaluation.tasks.metrics import compute_metrics, format_table
from video_ktr.evaluation.tasks.registry import (
    BENCHMARKS,
    get_benchmark,
    load_benchmark,
    media_candidates,
    resolve_media,
)
from video_ktr.evaluation.tasks.video_r1 import join_official_meta

FIX = BENCHMARK_FIXTURES
R1 = FIX / "video_r1_eval"
HOLMES = FIX / "video_holmes" / "test_Video-Holmes.json"
VIDEOMME = FIX / "videomme" / "videomme" / "test-00000-of-00001.parquet.rows.json"
MMMU = FIX / "videommmu"
MMVU = FIX / "mmvu" / "validation.json"
MVB = FIX / "mvbench" / "json"
TC = FIX / "tempcompass"
VSI = FIX / "vsibench"


def _scored(rows: list[dict], scores: list[float | None], errors: dict[int, str] | None = None) -> list[dict]:
    out = []
    for i, (row, s) in enumerate(zip(rows, scores, strict=True)):
        r = dict(row, score=s)
        if errors and i in errors:
            r["error"] = errors[i]
        out.append(r)
    return out


def _res(qtype: str, ptype: str, score: float | None) -> dict:
    return {"problem_type": ptype, "meta": {"question_type": qtype}, "score": score}


def _write(tmp_path: Path, name: str, data: object) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data), encoding="utf-8")
    return p


def _load_json(p: Path) -> object:
    return json.loads(p.read_text(encoding="utf-8"))


def test_fixture_directory_is_present():
    assert FIX.is_dir(), f"benchmark fixtures missing: {FIX}"
    assert (FIX / "README.md").is_file()


# ------------------------------------------------------------------ registry


def test_benchmark_names_and_aliases_resolve_case_insensitively():
    assert set(BENCHMARKS) == {
        "videoholmes",
        "videomme",
        "videomme_sub",
        "videommmu",
        "mmvu",
        "mvbench",
        "tempcompass",
        "vsibench",
        "video_r1",
    }
    for alias, name in [
        ("video-holmes", "videoholmes"),
        ("Video_Holmes", "videoholmes"),
        ("VideoMME", "videomme"),
        ("Video-MME", "videomme"),
        ("Video-MME w/ subtitle", "videomme_sub"),
        ("VSI-Bench", "vsibench"),
        ("Video-MMMU", "videommmu"),
        ("MVBench", "mvbench"),
        ("TempCompass", "tempcompass"),
        ("MMVU", "mmvu"),
        ("video_r1", "video_r1"),
        ("Video-R1", "video_r1"),
    ]:
        assert get_benchmark(alias).name == name


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: videoholmes, videomme, videomme_sub, videommmu, mmvu"):
        get_benchmark("egoschema")


def test_detect_format_on_each_fixture():
    for p in [
        HOLMES,
        VIDEOMME,
        MMVU,
        MVB / "action_sequence.json",
        TC / "questions" / "multi-choice.json",
        TC / "lmms_multi-choice.rows.json",
        VSI / "test.jsonl",
        MMMU / "data" / "perception_video.json",
    ]:
        assert detect_format(p) == "official", p
    assert detect_format(MMMU) == "official"
    for p in sorted(R1.glob("eval_*.json")):
        assert detect_format(p) == "video_r1", p
    assert len(sorted(R1.glob("eval_*.json"))) == 7


# ------------------------------------------------------------------ Video-Holmes


def test_holmes_official_rows():
    rows = load_benchmark("video-holmes", HOLMES)
    assert len(rows) == 4
    r = rows[0]
    assert r["problem"].startswith("What is the relationship")
    assert r["problem_type"] == "multiple choice" and r["data_type"] == "video"
    assert r["options"] == [
        "A. Landlord and tenant",
        "B. Former classmates",
        "C. Mother and son",
        "D. Rival detectives",
        "E. Strangers",
        "F. Doctor and patient",
    ]
    assert r["solution"] == "<answer>C</answer>"
    assert r["path"] == "./videos/zzFAKEhol01.mp4"
    assert r["meta"]["question_type"] == "SR"
    assert r["meta"]["path_candidates"] == ["./videos_cropped/zzFAKEhol01.mp4"]
    assert r["uid"] == "videoholmes:zzFAKEhol01:1"
    assert [x["solution"] for x in rows] == [f"<answer>{c}</answer>" for c in "CDBB"]
    assert [x["meta"]["question_type"] for x in rows] == ["SR", "TA", "PAR", "CTI"]
    assert [x["problem_id"] for x in rows] == [1, 2, 3, 4]
    assert "\n1. The lantern" in rows[1]["problem"]  # TA event list kept verbatim


def test_holmes_video_r1_file_matches_official_conversion():
    rows = load_benchmark("videoholmes", R1 / "eval_videoholmes.json")
    official = load_benchmark("videoholmes", HOLMES)
    assert len(rows) == 4
    for a, b in zip(rows, official, strict=True):
        assert (a["problem"], a["options"], a["solution"]) == (b["problem"], b["options"], b["solution"])
        assert a["meta"]["question_type"] == b["meta"]["question_type"]
    assert rows[0]["uid"] == "videoholmes:1"
    assert rows[0]["meta"]["original_question_type"] == "SR"
    assert rows[0]["meta"]["video_id"] == "zzFAKEhol01"
    assert "process" not in rows[0] and "process" not in rows[0]["meta"]


# ------------------------------------------------------------------ Video-MME


def test_videomme_official_rows():
    rows = load_benchmark("VideoMME", VIDEOMME)
    assert len(rows) == 4
    r = rows[0]
    assert r["options"] == ["A. 2.", "B. 3.", "C. 4.", "D. 5."]
    assert r["solution"] == "<answer>B</answer>"
    assert r["path"] == "./data/zzFAKEmme01.mp4"
    assert r["uid"] == "videomme:901-1"
    assert {k: r["meta"][k] for k in ("duration", "domain", "sub_category", "task_type")} == {
        "duration": "short",
        "domain": "Knowledge",
        "sub_category": "Astronomy",
        "task_type": "Counting Problem",
    }
    assert [x["meta"]["duration"] for x in rows] == ["short", "short", "medium", "long"]
    assert [x["solution"][8] for x in rows] == list("BACD")


def test_videomme_video_r1_file_keeps_raw_columns_in_meta():
    rows = load_benchmark("videomme", R1 / "eval_videomme.json")
    assert len(rows) == 4
    m = rows[3]["meta"]
    assert (m["duration"], m["domain"], m["sub_category"], m["task_type"]) == (
        "long",
        "Life Record",
        "Food",
        "OCR Problems",
    )
    assert m["original_question_type"] == "OCR Problems" and m["subtitle"] == ""
    assert rows[3]["data_source"] == "Video-MME"  # absent in the file
    assert rows[3]["solution"] == "<answer>D</answer>"
    assert rows[3]["path"] == "./Evaluation/VideoMME/data/zzFAKEmme03.mp4"


def test_videomme_results_template_is_refused_with_a_hint():
    with pytest.raises(BenchmarkDataError, match=r"row 0, field 'questions'.*results template"):
        load_benchmark("videomme", FIX / "videomme" / "output_test_template.json")


# ------------------------------------------------------------------ VideoMMMU


def test_videommmu_hf_track_file_takes_track_from_folder():
    rows = load_benchmark("videommmu", MMMU / "Perception" / "test-00000-of-00001.parquet.rows.json")
    assert len(rows) == 2
    r = rows[0]
    assert r["options"] == ["A. 1 kg", "B. 2 kg", "C. 3 kg", "D. 4 kg", "E. 5 kg"]
    assert r["solution"] == "<answer>B</answer>"
    assert r["meta"]["track"] == "Perception"
    assert (r["meta"]["subject"], r["meta"]["discipline"]) == ("Physics", "Science")
    assert r["path"] == "./Science/validation_Physics_901.mp4"
    assert r["uid"] == "videommmu:Perception:validation_Physics_901"
    assert r["data_source"] == "https://www.youtube.com/watch?v=zzFAKEmmu01"
    assert (rows[1]["meta"]["subject"], rows[1]["meta"]["discipline"]) == ("Finance", "Business")
    assert rows[1]["path"] == "./Business/new_Finance_902.mp4"


def test_videommmu_adaptation_removes_image_placeholder_and_open_is_numerical():
    rows = load_benchmark("videommmu", MMMU / "Adaptation" / "test-00000-of-00001.parquet.rows.json")
    r1 = load_benchmark("videommmu", R1 / "eval_videommmu.json")
    assert (
        rows[0]["problem"]
        == r1[0]["problem"]
        == ("A block slides down the ramp shown. Which quantity stays constant if friction is ignored?")
    )
    assert rows[1]["problem"] == r1[1]["problem"]  # "... on the loan in ?" exactly as Video-R1-eval
    assert len(rows[0]["options"]) == 10 and rows[0]["options"][9] == "J. None of these"
    assert rows[1]["problem_type"] == "numerical"
    assert rows[1]["options"] is None
    assert rows[1]["solution"] == "<answer>240</answer>"
    assert rows[0]["meta"]["question_only_path"] == "./question_only/validation_Physics_901_image.mp4"


def test_videommmu_directory_loads_all_tracks_with_track_in_uid():
    rows = load_benchmark("videommmu", MMMU)
    assert len(rows) == 5  # HF folders only; data/ is the same content and is not loaded twice
    assert [r["meta"]["track"] for r in rows] == [
        "Adaptation",
        "Adaptation",
        "Comprehension",
        "Perception",
        "Perception",
    ]
    assert [r["problem_id"] for r in rows] == [1, 2, 3, 4, 5]
    ids = [r["meta"]["id"] for r in rows]
    assert ids.count("validation_Physics_901") == 3
    assert len({r["uid"] for r in rows}) == 5


def test_videommmu_github_json_matches_hf_rows(tmp_path):
    github = load_benchmark("videommmu", MMMU / "data" / "perception_video.json")
    hf = load_benchmark("videommmu", MMMU / "Perception" / "test-00000-of-00001.parquet.rows.json")
    for a, b in zip(github, hf, strict=True):
        assert (a["problem"], a["options"], a["solution"], a["uid"]) == (
            b["problem"],
            b["options"],
            b["solution"],
            b["uid"],
        )
    assert github[0]["meta"]["question_type_inferred"] is True  # no question_type on GitHub
    ada = load_benchmark("videommmu", MMMU / "data" / "adaptation_video.json")
    assert [r["problem_type"] for r in ada] == ["multiple choice", "numerical"]
    # the GitHub data/ folder alone also loads as a directory
    assert len(load_benchmark("videommmu", MMMU / "data")) == 5


def test_videommmu_video_r1_file_infers_track_from_problem_id():
    rows = load_benchmark("videommmu", R1 / "eval_videommmu.json")
    assert [r["problem_id"] for r in rows] == [1, 2, 301, 601]
    assert [r["meta"]["track"] for r in rows] == ["Adaptation", "Adaptation", "Comprehension", "Perception"]
    assert all(r["meta"]["track_inferred"] for r in rows)
    assert [r["meta"]["subject"] for r in rows] == ["Physics", "Finance", "Physics", "Physics"]
    assert [r["meta"]["discipline"] for r in rows] == ["Science", "Business", "Science", "Science"]
    assert rows[0]["meta"]["question_only"] is True and "question_only" not in rows[2]["meta"]
    assert rows[1]["problem_type"] == "numerical" and rows[1]["options"] is None


def test_join_official_meta_replaces_inferred_track():
    r1 = load_benchmark("videommmu", R1 / "eval_videommmu.json")
    joined = join_official_meta(r1, load_benchmark("videommmu", MMMU))
    assert [r["meta"]["official_uid"] for r in joined] == [
        "videommmu:Adaptation:validation_Physics_901",
        "videommmu:Adaptation:new_Finance_902",
        "videommmu:Comprehension:validation_Physics_901",
        "videommmu:Perception:validation_Physics_901",
    ]
    assert all("track_inferred" not in r["meta"] for r in joined)
    assert r1[0]["meta"]["track_inferred"] is True  # input not mutated


# ------------------------------------------------------------------ MMVU


def test_mmvu_official_rows():
    rows = load_benchmark("mmvu", MMVU)
    assert len(rows) == 3
    assert rows[0]["options"] == [
        "A. Litmus",
        "B. Phenolphthalein",
        "C. Methyl orange",
        "D. Bromothymol blue",
        "E. Starch",
    ]
    assert rows[0]["solution"] == "<answer>B</answer>"
    assert rows[0]["path"] == "./videos/Chemistry/9001.mp4"
    assert rows[0]["uid"] == "mmvu:validation_9001"
    assert rows[1]["problem_type"] == "free-form" and rows[1]["options"] is None
    assert rows[1]["solution"] == "<answer>Selection sort</answer>"
    assert [r["meta"]["subject"] for r in rows] == ["Chemistry", "Computer_Science", "Clinical_Medicine"]
    assert [r["meta"]["discipline"] for r in rows] == ["Science", "Engineering", "Healthcare"]
    assert [r["meta"]["question_type"] for r in rows] == ["multiple-choice", "open-ended", "multiple-choice"]
    assert rows[2]["path"] == "./videos/Clinical_Medicine/9003.mp4"


def test_mmvu_numeric_open_answer_is_numerical(tmp_path):
    data = _load_json(MMVU)
    data[1]["answer"] = "3.5"
    rows = load_benchmark("mmvu", _write(tmp_path, "validation.json", data))
    assert rows[1]["problem_type"] == "numerical"


def test_mmvu_video_r1_file_takes_subject_from_path_folder():
    rows = load_benchmark("mmvu", R1 / "eval_mmvu.json")
    assert [r["meta"]["subject"] for r in rows] == ["Chemistry", "Clinical_Medicine"]
    assert [r["meta"]["discipline"] for r in rows] == ["Science", "Healthcare"]
    assert rows[1]["meta"]["question_type"] == "multiple-choice"


# ------------------------------------------------------------------ MVBench


def test_mvbench_task_file_letters_candidates_and_keeps_clip_bounds():
    rows = load_benchmark("mvbench", MVB / "action_sequence.json")
    assert len(rows) == 2
    r = rows[0]
    assert r["options"] == [
        "A. Opened the window.",
        "B. Picked up the book.",
        "C. Closed the door.",
        "D. Sat on the bed.",
    ]
    assert r["solution"] == "<answer>B</answer>"  # the answer text is candidate 2
    assert (r["meta"]["task"], r["meta"]["start"], r["meta"]["end"]) == ("action_sequence", 4.2, 17.9)
    assert r["path"] == "./star/Charades_v1_480/FAKE01.mp4"
    assert r["uid"] == "mvbench:action_sequence:0"
    assert rows[1]["solution"] == "<answer>B</answer>"
    ant = load_benchmark("mvbench", MVB / "action_antonym.json")
    assert [x["solution"] for x in ant] == ["<answer>B</answer>", "<answer>A</answer>"]
    assert "start" not in ant[0]["meta"]
    assert ant[0]["path"] == "./ssv2_video/90001.webm"


def test_mvbench_folder_and_video_r1_file():
    rows = load_benchmark("mvbench", MVB)
    assert [r["meta"]["task"] for r in rows] == ["action_antonym"] * 2 + ["action_sequence"] * 2
    r1 = load_benchmark("mvbench", R1 / "eval_mvbench.json")
    assert [r["meta"]["task"] for r in r1] == ["action_sequence"] * 2 + ["action_antonym"] * 2
    by_key = {(r["problem"], r["solution"], tuple(r["options"])) for r in rows}
    assert {(r["problem"], r["solution"], tuple(r["options"])) for r in r1} == by_key


def test_resolve_media_serves_official_and_video_r1_paths_from_one_root(tmp_path):
    (tmp_path / "star" / "Charades_v1_480").mkdir(parents=True)
    (tmp_path / "ssv2_video").mkdir()
    seq = tmp_path / "star" / "Charades_v1_480" / "FAKE01.mp4"
    ant = tmp_path / "ssv2_video" / "90001.mp4"  # converted to .mp4 as Video-R1 did
    seq.write_bytes(b"x")
    ant.write_bytes(b"x")
    official = load_benchmark("mvbench", MVB)
    r1 = load_benchmark("mvbench", R1 / "eval_mvbench.json")
    assert resolve_media(official[2], tmp_path) == seq
    assert resolve_media(r1[0], tmp_path) == seq  # ./Evaluation/MVBench/ stripped
    assert resolve_media(official[0], tmp_path) == ant  # .webm in the JSON, .mp4 on disk
    with pytest.raises(FileNotFoundError, match="90002"):
        resolve_media(official[1], tmp_path)


def test_resolve_media_tries_holmes_videos_cropped_and_other_extensions(tmp_path):
    row = load_benchmark("videoholmes", HOLMES)[0]
    cands = media_candidates(row, tmp_path)
    assert cands[0] == tmp_path / "videos" / "zzFAKEhol01.mp4"
    (tmp_path / "videos_cropped").mkdir()
    target = tmp_path / "videos_cropped" / "zzFAKEhol01.mkv"
    target.write_bytes(b"x")
    assert resolve_media(row, tmp_path) == target


# ------------------------------------------------------------------ TempCompass


def test_tempcompass_multi_choice_splits_options_from_question():
    rows = load_benchmark("tempcompass", TC / "questions" / "multi-choice.json")
    assert len(rows) == 4
    assert rows[0]["problem"] == "How fast is the kite rising?"
    assert rows[0]["options"] == ["A. very slowly", "B. at a steady pace", "C. very quickly"]
    assert [r["solution"][8] for r in rows] == list("CBCA")
    assert [r["meta"]["dim"] for r in rows] == ["speed", "direction", "order", "attribute_change"]
    assert rows[0]["path"] == "./videos/9000000001.mp4"
    assert rows[0]["uid"] == "tempcompass:multi-choice:9000000001:speed:0"


def test_tempcompass_yes_no_becomes_two_option_multiple_choice():
    rows = load_benchmark("tempcompass", TC / "questions" / "yes_no.json")
    assert [(r["options"], r["solution"]) for r in rows] == [
        (["A. yes", "B. no"], "<answer>A</answer>"),
        (["A. yes", "B. no"], "<answer>B</answer>"),
    ]
    assert all(r["meta"]["task_type"] == "yes_no" and r["problem_type"] == "multiple choice" for r in rows)


def test_tempcompass_lmms_rows_and_video_r1_file():
    flat = load_benchmark("tempcompass", TC / "lmms_multi-choice.rows.json")
    assert [(r["meta"]["dim"], r["solution"]) for r in flat] == [
        ("speed", "<answer>C</answer>"),
        ("order", "<answer>C</answer>"),
    ]
    r1 = load_benchmark("tempcompass", R1 / "eval_tempcompass.json")
    official = load_benchmark("tempcompass", TC / "questions" / "multi-choice.json")
    assert [r["meta"]["dim"] for r in r1] == ["speed", "direction", "order", "attribute_change"]
    for a, b in zip(r1, official, strict=True):
        assert (a["problem"], a["options"], a["solution"]) == (b["problem"], b["options"], b["solution"])


# ------------------------------------------------------------------ VSI-Bench


def test_vsibench_rows_json_and_jsonl_agree():
    rows = load_benchmark("vsibench", VSI / "test-00000-of-00001.parquet.rows.json")
    assert rows == load_benchmark("VSI-Bench", VSI / "test.jsonl")
    assert [r["problem_type"] for r in rows] == [
        "regression",
        "regression",
        "multiple choice",
        "multiple choice",
        "regression",
    ]
    assert [r["solution"] for r in rows] == [f"<answer>{x}</answer>" for x in ("3", "2.4", "B", "D", "18.5")]
    assert rows[0]["path"] == "./scannet/scene0999_00.mp4"
    assert rows[0]["options"] is None and rows[2]["options"] == ["A. left", "B. right", "C. back"]
    assert rows[2]["meta"]["question_type"] == "object_rel_direction_medium"
    assert rows[0]["uid"] == "vsibench:90001"


def test_vsibench_video_r1_file_needs_the_official_join_for_question_type():
    r1 = load_benchmark("vsibench", R1 / "eval_vsibench.json")
    assert "question_type" not in r1[0]["meta"]
    assert r1[1]["meta"]["dataset"] == "arkitscenes"
    joined = join_official_meta(r1, load_benchmark("vsibench", VSI / "test.jsonl"))
    assert [r["meta"]["question_type"] for r in joined] == [
        "object_counting",
        "object_abs_distance",
        "object_rel_direction_medium",
        "obj_appearance_order",
        "room_size_estimation",
    ]


# ------------------------------------------------------------------ generic Video-R1 files


def test_generic_video_r1_loader_and_official_file_refused():
    rows = load_benchmark("video_r1", R1 / "eval_mvbench.json")
    assert [r["uid"] for r in rows] == ["video_r1:1", "video_r1:2", "video_r1:3", "video_r1:4"]
    m = compute_metrics("video_r1", _scored(rows, [1, 0, 1, 1]))
    assert m["by_data_source"] == {
        "action_antonym": {"accuracy": 1.0, "n": 2, "n_failed": 0},
        "action_sequence": {"accuracy": 0.5, "n": 2, "n_failed": 0},
    }
    with pytest.raises(BenchmarkDataError, match="not a Video-R1-schema file"):
        load_benchmark("video_r1", HOLMES)


# ------------------------------------------------------------------ errors name file, row, field


def _holmes_copy(tmp_path: Path, edit) -> Path:
    data = _load_json(HOLMES)
    edit(data)
    return _write(tmp_path, "test_Video-Holmes.json", data)


def test_error_unknown_answer_letter_names_file_row_field(tmp_path):
    p = _holmes_copy(tmp_path, lambda d: d[1].__setitem__("Answer", "G"))
    with pytest.raises(
        BenchmarkDataError, match=r"test_Video-Holmes\.json, row 1, field 'Answer': answer 'G'"
    ) as e:
        load_benchmark("videoholmes", p)
    assert (e.value.file, e.value.row, e.value.field) == (str(p), 1, "Answer")


def test_error_missing_and_wrongly_typed_fields(tmp_path):
    p = _holmes_copy(tmp_path, lambda d: d[2].pop("Question Type"))
    with pytest.raises(BenchmarkDataError, match=r"row 2, field 'Question Type': missing"):
        load_benchmark("videoholmes", p)
    p = _holmes_copy(tmp_path, lambda d: d[0].__setitem__("Options", ["x", "y"]))
    with pytest.raises(BenchmarkDataError, match=r"row 0, field 'Options': expected dict, got list"):
        load_benchmark("videoholmes", p)
    p = _holmes_copy(tmp_path, lambda d: d[3].__setitem__("Question Type", "XYZ"))
    with pytest.raises(BenchmarkDataError, match=r"row 3, field 'Question Type'"):
        load_benchmark("videoholmes", p)
    p = _holmes_copy(tmp_path, lambda d: d.append(dict(d[0])))
    with pytest.raises(BenchmarkDataError, match=r"row 4: duplicate key 'videoholmes:zzFAKEhol01:1'"):
        load_benchmark("videoholmes", p)


def test_error_per_benchmark_schema_problems(tmp_path):
    mme = _load_json(VIDEOMME)
    mme[2]["options"][1] = "B) A teammate picks it up."
    with pytest.raises(BenchmarkDataError, match=r"rows\.json, row 2, field 'options'"):
        load_benchmark("videomme", _write(tmp_path, "mme.rows.json", mme))

    mvb = _load_json(MVB / "action_sequence.json")
    mvb[1]["answer"] = "Jumped."
    with pytest.raises(BenchmarkDataError, match=r"action_sequence\.json, row 1, field 'answer'"):
        load_benchmark("mvbench", _write(tmp_path, "action_sequence.json", mvb))

    vsi = _load_json(VSI / "test-00000-of-00001.parquet.rows.json")
    vsi[4]["ground_truth"] = "about 18"
    with pytest.raises(BenchmarkDataError, match=r"row 4, field 'ground_truth'.*not a number"):
        load_benchmark("vsibench", _write(tmp_path, "vsi.rows.json", vsi))

    tc = _load_json(TC / "questions" / "multi-choice.json")
    tc["9000000002"]["order"][0]["answer"] = "E. the cat sleeps"
    with pytest.raises(BenchmarkDataError, match=r"row 9000000002/order/0, field 'answer'.*\(A-C\)"):
        load_benchmark("tempcompass", _write(tmp_path, "multi-choice.json", tc))

    mmvu = _load_json(MMVU)
    mmvu[0]["video"] = "https://x/videos/Alchemy/9001.mp4"
    with pytest.raises(BenchmarkDataError, match=r"row 0, field 'video'.*Alchemy"):
        load_benchmark("mmvu", _write(tmp_path, "validation.json", mmvu))

    mmmu = _load_json(MMMU / "Perception" / "test-00000-of-00001.parquet.rows.json")
    mmmu[1]["answer"] = "F"  # 4 options
    with pytest.raises(BenchmarkDataError, match=r"row 1, field 'answer'.*\(A-D\)"):
        load_benchmark(
            "videommmu", _write(tmp_path, "Perception/test-00000-of-00001.parquet.rows.json", mmmu)
        )
    with pytest.raises(BenchmarkDataError, match="cannot tell the VideoMMMU track"):
        load_benchmark("videommmu", _write(tmp_path, "somewhere/rows.json", mmmu))


def test_error_video_r1_rows(tmp_path):
    data = _load_json(R1 / "eval_vsibench.json")
    data[2]["solution"] = "B"
    with pytest.raises(BenchmarkDataError, match=r"eval_vsibench\.json, row 2, field 'solution'"):
        load_benchmark("vsibench", _write(tmp_path, "eval_vsibench.json", data))
    data = _load_json(R1 / "eval_vsibench.json")
    data[3]["solution"] = "<answer>E</answer>"
    with pytest.raises(BenchmarkDataError, match=r"row 3, field 'solution': answer 'E'"):
        load_benchmark("vsibench", _write(tmp_path, "eval_vsibench.json", data))
    data = _load_json(R1 / "eval_vsibench.json")
    data[1]["problem_type"] = 7
    with pytest.raises(BenchmarkDataError, match=r"row 1, field 'problem_type': expected str, got int"):
        load_benchmark("vsibench", _write(tmp_path, "eval_vsibench.json", data))
    data = _load_json(R1 / "eval_vsibench.json")
    data[0].pop("path")
    with pytest.raises(BenchmarkDataError, match=r"row 0, field 'path': missing"):
        load_benchmark("vsibench", _write(tmp_path, "eval_vsibench.json", data))


def test_error_bad_json_and_missing_files(tmp_path):
    bad = tmp_path / "test_Video-Holmes.json"
    bad.write_text('[{"video ID": "x",\n  oops}]', encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match=r"test_Video-Holmes\.json: not valid JSON at line 2"):
        load_benchmark("videoholmes", bad)
    jl = tmp_path / "test.jsonl"
    jl.write_text((VSI / "test.jsonl").read_text().splitlines()[0] + "\n{broken\n", encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match=r"test\.jsonl, row 2: line 2 is not valid JSON"):
        load_benchmark("vsibench", jl)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_benchmark("videoholmes", tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="no VideoMMMU track files"):
        load_benchmark("videommmu", tmp_path)
    with pytest.raises(ValueError, match="expects a file"):
        load_benchmark("videoholmes", tmp_path)


def test_parquet_without_pyarrow_says_to_install_it(tmp_path, monkeypatch):
    p = tmp_path / "test-00000-of-00001.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_benchmark("vsibench", p)


# ------------------------------------------------------------------ metrics


def test_holmes_metrics_with_a_failed_sample():
    rows = load_benchmark("videoholmes", HOLMES)  # types SR, TA, PAR, CTI
    m = compute_metrics("Video-Holmes", _scored(rows, [1.0, 0.0, 1.0, None], {3: "CUDA out of memory"}))
    assert m["overall"] == pytest.approx(2 / 3)  # 2 correct of 3 scored
    assert m["overall_pct"] == pytest.approx(200 / 3)
    assert m["overall_all_rows"] == 0.5  # the failure counted as 0: 2 / 4
    assert (m["num_samples"], m["num_scored"], m["num_failed"]) == (4, 3, 1)
    assert m["failures"] == [{"uid": "videoholmes:zzFAKEhol02:4", "reason": "CUDA out of memory"}]
    assert m["mean_mra"] is None
    assert m["by_question_type"] == {
        "SR": {"accuracy": 1.0, "n": 1, "n_failed": 0},
        "TA": {"accuracy": 0.0, "n": 1, "n_failed": 0},
        "PAR": {"accuracy": 1.0, "n": 1, "n_failed": 0},
        "CTI": {"accuracy": None, "n": 0, "n_failed": 1},
    }
    assert list(m["by_question_type"]) == ["SR", "TA", "PAR", "CTI"]  # the official column order
    assert m["by_problem_type"] == {
        "multiple choice": {"accuracy": pytest.approx(2 / 3), "n": 3, "n_failed": 1}
    }
    assert m["denominator"].startswith("all scored rows")


def test_failed_sample_without_reason_and_invalid_scores():
    rows = load_benchmark("videoholmes", HOLMES)[:2]
    m = compute_metrics("videoholmes", _scored(rows, [None, 1]))
    assert m["failures"] == [{"uid": "videoholmes:zzFAKEhol01:1", "reason": "no reason given"}]
    assert (m["overall"], m["overall_all_rows"]) == (1.0, 0.5)
    for bad in (1.5, -0.1, float("nan"), "1"):
        with pytest.raises(ValueError, match=r"results\[1\].*'score'"):
            compute_metrics("videoholmes", _scored(rows, [1, bad]))
    with pytest.raises(ValueError, match="'score' missing"):
        compute_metrics("videoholmes", rows)
    m = compute_metrics("videoholmes", [])
    assert (m["overall"], m["num_samples"]) == (None, 0)


def test_videomme_metrics_breakdowns():
    rows = load_benchmark("videomme", VIDEOMME)  # short, short, medium, long
    m = compute_metrics("videomme", _scored(rows, [1, 0, 1, 1]))
    assert m["overall"] == 0.75 and m["num_failed"] == 0 and m["overall_all_rows"] == 0.75
    assert m["by_duration"] == {
        "short": {"accuracy": 0.5, "n": 2, "n_failed": 0},
        "medium": {"accuracy": 1.0, "n": 1, "n_failed": 0},
        "long": {"accuracy": 1.0, "n": 1, "n_failed": 0},
    }
    assert {k: v["accuracy"] for k, v in m["by_domain"].items()} == {
        "Knowledge": 0.5,
        "Life Record": 1.0,
        "Sports Competition": 1.0,
    }
    assert {k: v["accuracy"] for k, v in m["by_task_type"].items()} == {
        "Counting Problem": 1.0,
        "Information Synopsis": 0.0,
        "OCR Problems": 1.0,
        "Temporal Reasoning": 1.0,
    }
    assert {k: (v["accuracy"], v["n"]) for k, v in m["by_sub_category"].items()} == {
        "Astronomy": (0.5, 2),
        "Athletics": (1.0, 1),
        "Food": (1.0, 1),
    }


def test_videommmu_metrics_by_track_and_discipline():
    rows = load_benchmark("videommmu", MMMU)
    # A/Physics MC, A/Finance numerical, C/Physics MC, P/Physics MC, P/Finance MC
    m = compute_metrics("videommmu", _scored(rows, [1, 0, 1, 0, 1]))
    assert m["overall"] == 0.6  # 3 / 5 (numerical rows are not regression: they count in the accuracy)
    assert m["by_track"] == {
        "Perception": {"accuracy": 0.5, "n": 2, "n_failed": 0},
        "Comprehension": {"accuracy": 1.0, "n": 1, "n_failed": 0},
        "Adaptation": {"accuracy": 0.5, "n": 2, "n_failed": 0},
    }
    assert m["by_discipline"] == {
        "Business": {"accuracy": 0.5, "n": 2, "n_failed": 0},
        "Science": {"accuracy": pytest.approx(2 / 3), "n": 3, "n_failed": 0},
    }
    assert m["by_subject"]["Physics"]["n"] == 3
    assert m["by_problem_type"] == {
        "multiple choice": {"accuracy": 0.75, "n": 4, "n_failed": 0},
        "numerical": {"accuracy": 0.0, "n": 1, "n_failed": 0},
    }


def test_mmvu_metrics_by_discipline_subject_and_question_type():
    rows = load_benchmark("mmvu", MMVU)
    m = compute_metrics("mmvu", _scored(rows, [1, 0, 0]))
    assert {k: (v["accuracy"], v["n"]) for k, v in m["by_discipline"].items()} == {
        "Engineering": (0.0, 1),
        "Healthcare": (0.0, 1),
        "Science": (1.0, 1),
    }
    assert {k: (v["accuracy"], v["n"]) for k, v in m["by_question_type"].items()} == {
        "multiple-choice": (0.5, 2),
        "open-ended": (0.0, 1),
    }
    assert set(m["by_subject"]) == {"Chemistry", "Computer_Science", "Clinical_Medicine"}


def test_mvbench_task_mean_differs_from_pooled_accuracy_on_unequal_tasks():
    res = [
        {"problem_type": "multiple choice", "meta": {"task": "action_antonym"}, "score": s} for s in (0, 0, 1)
    ]
    res.append({"problem_type": "multiple choice", "meta": {"task": "action_sequence"}, "score": 1})
    m = compute_metrics("mvbench", res)
    assert m["overall"] == 0.5  # 2 / 4
    assert m["task_mean"] == pytest.approx(2 / 3)  # (1/3 + 1) / 2
    assert m["by_task"]["action_antonym"] == {"accuracy": pytest.approx(1 / 3), "n": 3, "n_failed": 0}


def test_tempcompass_metrics_by_dim_and_task_type():
    rows = load_benchmark("tempcompass", TC / "questions" / "multi-choice.json")
    rows += load_benchmark("tempcompass", TC / "questions" / "yes_no.json")
    # MC: speed 1, direction 0, order 1, attribute_change 1; yes/no (both speed): 0, 1
    m = compute_metrics("tempcompass", _scored(rows, [1, 0, 1, 1, 0, 1]))
    assert m["overall"] == pytest.approx(4 / 6)
    assert {k: (v["accuracy"], v["n"]) for k, v in m["by_dim"].items()} == {
        "speed": (pytest.approx(2 / 3), 3),
        "direction": (0.0, 1),
        "order": (1.0, 1),
        "attribute_change": (1.0, 1),
    }
    assert list(m["by_dim"]) == ["speed", "direction", "order", "attribute_change"]
    assert {k: (v["accuracy"], v["n"]) for k, v in m["by_task_type"].items()} == {
        "multi-choice": (0.75, 4),
        "yes_no": (0.5, 2),
    }


def test_vsibench_official_overall_vs_video_r1_headline():
    mc, na = "multiple choice", "regression"
    res = (
        [_res("object_rel_direction_easy", mc, s) for s in (1, 1)]  # 1.0
        + [_res("object_rel_direction_medium", mc, 0)]  # 0.0
        + [_res("object_rel_direction_hard", mc, s) for s in (1, 0)]  # 0.5 -> rel_direction = 1.5/3 = 0.5
        + [_res("obj_appearance_order", mc, s) for s in (1, 0, 0, 1)]  # 0.5
        + [_res("object_rel_distance", mc, 1)]  # 1.0
        + [_res("route_planning", mc, s) for s in (0, 0)]  # 0.0
        + [_res("object_counting", na, s) for s in (0.9, 0.5)]  # 0.7
        + [_res("object_abs_distance", na, 0.3)]
        + [_res("object_size_estimation", na, 0.6)]
        + [_res("room_size_estimation", na, 0.2)]
    )
    m = compute_metrics("vsibench", res)
    # official: (0.5 + 0.5 + 1.0 + 0.0 + 0.7 + 0.3 + 0.6 + 0.2) / 8 = 3.8 / 8
    assert m["overall_official"] == pytest.approx(0.475)
    assert m["official_tasks_missing"] == []
    assert m["by_official_task"]["object_rel_direction"] == {"accuracy": 0.5, "n": 5, "n_failed": 0}
    assert len(m["by_official_task"]) == 8
    # Video-R1: MC rows 6 / 12 = 0.5; MRA rows (0.9+0.5+0.3+0.6+0.2)/5 = 0.5; headline (0.5+0.5)/2
    assert m["overall"] == 0.5
    assert m["mean_mra"] == pytest.approx(0.5)
    assert m["video_r1_headline"] == pytest.approx(0.5)
    assert m["by_question_type"]["object_counting"] == {"accuracy": pytest.approx(0.7), "n": 2, "n_failed": 0}
    assert m["by_problem_type"]["regression"]["n"] == 5


def test_vsibench_metrics_on_fixture_rows_with_a_failed_regression_row():
    rows = load_benchmark("vsibench", VSI / "test.jsonl")
    # counting 0.8, abs_distance failed, rel_direction_medium 1, appearance 0, room_size 0.4
    m = compute_metrics("vsibench", _scored(rows, [0.8, None, 1, 0, 0.4], {1: "decode error"}))
    assert m["overall"] == 0.5 and m["overall_all_rows"] == 0.5  # the failure is a regression row
    assert m["mean_mra"] == pytest.approx(0.6)  # (0.8 + 0.4) / 2
    assert m["mean_mra_all_rows"] == pytest.approx(0.4)  # (0.8 + 0 + 0.4) / 3
    assert m["video_r1_headline"] == pytest.approx(0.55)
    # official over the 4 tasks present: (0.8 + 1 + 0 + 0.4) / 4
    assert m["overall_official"] == pytest.approx(0.55)
    assert m["official_tasks_missing"] == [
        "object_abs_distance",
        "object_rel_distance",
        "object_size_estimation",
        "route_planning",
    ]
    assert m["by_question_type"]["object_abs_distance"] == {"accuracy": None, "n": 0, "n_failed": 1}


def test_rows_without_breakdown_field_are_counted_as_missing():
    rows = load_benchmark("vsibench", R1 / "eval_vsibench.json")  # no question_type in Video-R1-eval
    m = compute_metrics("vsibench", _scored(rows, [1, 1, 1, 1, 1]))
    assert m["by_question_type"] == {MISSING: {"accuracy": 1.0, "n": 5, "n_failed": 0}}
    assert m["overall_official"] is None and len(m["official_tasks_missing"]) == 8
    assert m["video_r1_headline"] == 1.0


def test_format_table_shows_headline_breakdowns_and_failures():
    rows = load_benchmark("videoholmes", HOLMES)
    text = format_table(compute_metrics("videoholmes", _scored(rows, [1, 0, 1, None], {3: "timeout"})))
    assert "videoholmes: 4 samples, 3 scored, 1 failed" in text
    assert " 66.67" in text and " 50.00" in text  # over scored rows / failures as 0
    assert "by_question_type" in text and "CTI" in text and "(1 failed)" in text
    assert "videoholmes:zzFAKEhol02:4: timeout" in text
    res = [_res("object_counting", "regression", 0.5), _res("route_planning", "multiple choice", 1)]
    vsi = format_table(compute_metrics("vsibench", res))
    assert "official overall (2 of 8 tasks)" in vsi and "Video-R1 headline" in vsi and "mean MRA" in vsi
    assert "official tasks missing:" in vsi
