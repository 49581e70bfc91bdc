"""Video-MME with subtitles (evaluation/tasks/subtitles.py): the subtitles of the sampled frames in the prompt."""

from __future__ import annotations

import shutil

import pytest

from tests.paths import BENCHMARK_FIXTURES, REAL_VIDEO
from video_ktr.data.media import FrameSettings, MediaError
from video_ktr.data.video import FrameCache
from video_ktr.evaluation.engine import load_batch
from video_ktr.evaluation.tasks.registry import get_benchmark, load_benchmark
from video_ktr.evaluation.tasks.subtitles import NO_SUBTITLES, SUBTITLE_HEADER, Cue, cues_at_frames, parse_srt

VIDEOMME = BENCHMARK_FIXTURES / "videomme" / "videomme" / "test-00000-of-00001.parquet.rows.json"
SRT = BENCHMARK_FIXTURES / "videomme" / "subtitle" / "zzFAKEmme03.srt"


def test_srt_cues_without_markup_and_errors_naming_the_cue(tmp_path):
    assert parse_srt(SRT) == [Cue(1, 1.0, 3.5, "Welcome back to the market tour."),
                              Cue(2, 4.0, 6.2, "Today we try the soup stall.")]
    multi = tmp_path / "m.srt"
    multi.write_text("\ufeff1\r\n00:00:00,500 --> 00:00:01,000\r\n<i>two</i>\r\nlines\r\n\r\n2\r\n00:01:00.25 --> 00:01:02\r\nx\r\n")
    assert parse_srt(multi) == [Cue(1, 0.5, 1.0, "two lines"), Cue(2, 60.25, 62.0, "x")]
    bad = tmp_path / "bad.srt"
    bad.write_text("1\n00:00:01,000 --> 00:00:02,000\nok\n\n2\n00:00:03 -> 00:00:04\nno arrow\n")
    with pytest.raises(MediaError, match="subtitle cue 2: no 'start --> end' line"):
        parse_srt(bad)
    bad.write_text("1\n00:00:xx,000 --> 00:00:02,000\nbad time\n")
    with pytest.raises(MediaError, match="subtitle cue 1: bad time line"):
        parse_srt(bad)


def test_a_cue_belongs_to_the_frames_inside_its_frame_span():
    cues = parse_srt(SRT)  # at 10 fps: frames [10, 35) and [40, 62)
    assert cues_at_frames(cues, [5, 45], 10.0) == [cues[1]]
    assert cues_at_frames(cues, [34, 35, 61, 62], 10.0) == cues  # start inclusive, end exclusive
    assert cues_at_frames(cues, [9, 35, 62], 10.0) == []


def test_videomme_sub_is_a_benchmark_of_its_own():
    assert get_benchmark("Video-MME (w/ subs)").name == get_benchmark("videomme_w_subtitle").name == "videomme_sub"
    rows = load_benchmark("videomme_sub", VIDEOMME)
    plain = load_benchmark("videomme", VIDEOMME)
    assert [r["uid"] for r in rows] == [r["uid"].replace("videomme:", "videomme_sub:") for r in plain]
    assert all(r["meta"]["with_subtitles"] for r in rows) and not any("with_subtitles" in r["meta"] for r in plain)


def test_the_prompt_carries_the_subtitles_of_the_sampled_frames(tmp_path):
    root = tmp_path / "videomme"
    (root / "data").mkdir(parents=True)
    (root / "subtitle").mkdir()
    for vid in ("zzFAKEmme01", "zzFAKEmme03"):
        shutil.copy(REAL_VIDEO, root / "data" / f"{vid}.mp4")  # 491 frames at 22.29 fps
    shutil.copy(SRT, root / "subtitle" / "zzFAKEmme03.srt")
    rows = {r["meta"]["videoID"]: r for r in load_benchmark("videomme_sub", VIDEOMME)}
    # 16 frames, 32.7 source frames apart: frames 33 and 65 fall in cue 1 (frames 22-77), 98 and 131 in cue 2 (89-137)
    ready, failures = load_batch([rows["zzFAKEmme03"], rows["zzFAKEmme01"]], root, FrameSettings(), FrameCache(4))
    assert not failures
    (with_srt, _, _), (without, _, _) = ready
    question = rows["zzFAKEmme03"]["problem"]
    assert with_srt["problem"] == (f"{SUBTITLE_HEADER}\nWelcome back to the market tour.\nToday we try the soup stall.\n"
                                   f"{question}")
    assert with_srt["meta"]["subtitles"]["cues"] == [1, 2] and with_srt["meta"]["subtitles"]["question"] == question
    assert without["problem"] == f"{SUBTITLE_HEADER}\n{NO_SUBTITLES}\n{rows['zzFAKEmme01']['problem']}"
    # 4 frames (0, 163, 327, 490: 0 s, 7.3 s, ...): no cue is on screen at any of them
    ready, _ = load_batch([rows["zzFAKEmme03"]], root, FrameSettings(nframes=4), FrameCache(4))
    assert ready[0][0]["problem"] == f"{SUBTITLE_HEADER}\n\n{question}" and ready[0][0]["meta"]["subtitles"]["cues"] == []
    (root / "subtitle" / "zzFAKEmme03.srt").write_text("1\nnot a time --> either\nx\n")
    _, failures = load_batch([rows["zzFAKEmme03"]], root, FrameSettings(nframes=4), FrameCache(4))
    assert "subtitle cue 1: bad time line" in failures[0][1]  # the row fails with the file and cue named
