"""The official annotation files of the seven benchmarks -> common-schema rows (each loader: (data, file) -> rows)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from video_ktr.evaluation.tasks.base import (
    HOLMES_TYPES,
    IMAGE_PLACEHOLDER_RE,
    LETTERS,
    MMVU_DISCIPLINES,
    MVBENCH_FOLDERS,
    MVBENCH_LMMS_FOLDERS,
    VIDEOMME_DURATIONS,
    VIDEOMMMU_DISCIPLINES,
    VIDEOMMMU_FOLDERS,
    VIDEOMMMU_TRACKS,
    Ctx,
    as_list,
    build_row,
    check_letter,
    check_unique_uids,
    each_row,
    is_number,
    letter_options,
    option_letters,
    read_file,
)


def load_holmes(data: Any, file: Path) -> list[dict]:
    rows = []
    for i, c, r in each_row(file, data, "test_Video-Holmes.json"):
        vid = c.get(r, "video ID", str, nonempty=True)
        qid = c.get(r, "Question ID", (int, str))
        qtype = c.get(r, "Question Type", str)
        if qtype not in HOLMES_TYPES:
            raise c.fail("Question Type", f"{qtype!r} is not one of {', '.join(HOLMES_TYPES)}")
        question = c.get(r, "Question", str, nonempty=True)
        opts = c.get(r, "Options", dict)
        if not opts:
            raise c.fail("Options", "is empty")
        for k, v in opts.items():
            if not (isinstance(k, str) and len(k) == 1 and k in LETTERS) or not isinstance(v, str):
                raise c.fail("Options", f"entry {k!r}: {v!r} should map a letter to a text")
        keys = sorted(opts)
        answer = check_letter(c, "Answer", c.get(r, "Answer", str).strip(), keys)
        meta = {
            "question_type": qtype,
            "video_id": vid,
            "question_id": qid,
            "path_candidates": [f"./videos_cropped/{vid}.mp4"],
        }
        if isinstance(r.get("Explanation"), str):
            meta["explanation"] = r["Explanation"]
        rows.append(
            build_row(
                problem_id=i + 1,
                problem=question,
                problem_type="multiple choice",
                options=[f"{k}. {opts[k]}" for k in keys],
                answer=answer,
                path=f"./videos/{vid}.mp4",
                data_source="Video-Holmes",
                meta=meta,
                uid=f"videoholmes:{vid}:{qid}",
            )
        )
    return check_unique_uids(file, rows)


def load_videomme(data: Any, file: Path) -> list[dict]:
    rows = []
    for i, c, r in each_row(file, data, "Video-MME test parquet rows"):
        if "questions" in r and "videoID" not in r:
            raise c.fail(
                "questions",
                "this is the Video-MME results template (per-video rows with a 'questions' "
                "list and no 'videoID'); load videomme/test-00000-of-00001.parquet instead",
            )
        video_file = c.get(r, "videoID", str, nonempty=True)
        qid = c.get(r, "question_id", str, nonempty=True)
        meta: dict[str, Any] = {}
        for key in ("duration", "domain", "sub_category", "task_type"):
            meta[key] = c.get(r, key, str, nonempty=True)
        if meta["duration"] not in VIDEOMME_DURATIONS:
            raise c.fail("duration", f"{meta['duration']!r} is not one of {VIDEOMME_DURATIONS}")
        question = c.get(r, "question", str, nonempty=True)
        options = c.str_list(r, "options")
        letters = option_letters(c, options)
        answer = check_letter(c, "answer", c.get(r, "answer", str).strip(), letters)
        meta.update(
            video_id=r.get("video_id"),
            question_id=qid,
            videoID=video_file,
            url=r.get("url"),
            path_candidates=[f"./videos/{video_file}.mp4", f"./{video_file}.mp4"],
        )
        rows.append(
            build_row(
                problem_id=i + 1,
                problem=question,
                problem_type="multiple choice",
                options=list(options),
                answer=answer,
                path=f"./data/{video_file}.mp4",
                data_source="Video-MME",
                meta=meta,
                uid=f"videomme:{qid}",
            )
        )
    return check_unique_uids(file, rows)


def videommmu_subject(vid: str) -> str:
    return "_".join(vid.split("_")[1:-1])


def videommmu_discipline(subject: str) -> str | None:
    for discipline, subjects in VIDEOMMMU_DISCIPLINES.items():
        if subject in subjects:
            return discipline
    return None


def _videommmu_track_of(file: Path) -> str | None:
    for name in (file.parent.name, file.name.split(".")[0], file.name.split("_")[0]):
        for track in VIDEOMMMU_TRACKS:
            if name.lower() == track.lower():
                return track
    return None


def _videommmu_records(data: Any, file: Path) -> list[tuple[str, int | str, Any]]:
    """(track, row locator, raw row) from an HF track file (list) or a GitHub ``{"Track": {"0": row}}`` file."""
    ctx = Ctx(file)
    if isinstance(data, dict):
        out = []
        for track, table in data.items():
            if track not in VIDEOMMMU_TRACKS:
                raise ctx.fail(
                    None, f"top-level key {track!r} is not a track ({', '.join(VIDEOMMMU_TRACKS)})"
                )
            if not isinstance(table, dict):
                raise ctx.fail(None, f"{track!r} should map row numbers to rows, got {type(table).__name__}")
            keys = sorted(table, key=lambda k: (0, int(k)) if str(k).isdigit() else (1, str(k)))
            out.extend((track, f"{track}/{k}", table[k]) for k in keys)
        if not out:
            raise ctx.fail(None, "the file holds no rows")
        return out
    track = _videommmu_track_of(file)
    if track is None:
        raise ctx.fail(
            None,
            "cannot tell the VideoMMMU track: keep the HF layout <Track>/test-00000-of-00001.parquet "
            f"(Track one of {', '.join(VIDEOMMMU_TRACKS)}) or pass the folder holding all three",
        )
    return [(track, i, r) for i, r in enumerate(as_list(ctx, data, "VideoMMMU track rows"))]


def _convert_videommmu(
    records: list[tuple[str, int | str, Any]], file: Path, start_id: int = 1
) -> list[dict]:
    ctx = Ctx(file)
    rows = []
    for n, (track, loc, raw) in enumerate(records):
        c = ctx.at(loc)
        r = c.row_dict(raw)
        vid = c.get(r, "id", str, nonempty=True)
        subject = videommmu_subject(vid)
        discipline = videommmu_discipline(subject)
        if discipline is None:
            raise c.fail(
                "id", f"subject {subject!r} (from id {vid!r}) is not in the VideoMMMU discipline map"
            )
        question = IMAGE_PLACEHOLDER_RE.sub("", c.get(r, "question", str, nonempty=True)).strip()
        options = c.str_list(r, "options") if "options" in r else []
        answer = c.get(r, "answer", str).strip()
        qtype = r.get("question_type")
        if qtype is not None and qtype not in ("multiple-choice", "open"):
            raise c.fail("question_type", f"{qtype!r} should be 'multiple-choice', 'open' or null")
        meta: dict[str, Any] = {
            "track": track,
            "subject": subject,
            "discipline": discipline,
            "id": vid,
            "original_question_type": qtype,
        }
        if qtype is None:  # GitHub Perception/Comprehension rows and one Adaptation row carry none
            qtype = "multiple-choice" if options else "open"
            meta["question_type_inferred"] = True
        if qtype == "multiple-choice":
            if not options:
                raise c.fail("options", "a multiple-choice question has no options")
            check_letter(c, "answer", answer, LETTERS[: len(options)])
            problem_type, lettered = "multiple choice", letter_options(options)
        else:
            if not answer:
                raise c.fail("answer", "is empty")
            problem_type, lettered = ("numerical" if is_number(answer) else "free-form"), None
        folder = VIDEOMMMU_FOLDERS[discipline]
        meta["path_candidates"] = [f"./videos/{vid}.mp4", f"./{vid}.mp4"]
        if track == "Adaptation":
            meta["question_only_path"] = f"./question_only/{vid}_image.mp4"
        link = r.get("link_selected")
        rows.append(
            build_row(
                problem_id=start_id + n,
                problem=question,
                problem_type=problem_type,
                options=lettered,
                answer=answer,
                path=f"./{folder}/{vid}.mp4",
                data_source=link if isinstance(link, str) and link else "VideoMMMU",
                meta=meta,
                uid=f"videommmu:{track}:{vid}",
            )
        )
    return rows


def load_videommmu(data: Any, file: Path) -> list[dict]:
    return check_unique_uids(file, _convert_videommmu(_videommmu_records(data, file), file))


def load_videommmu_dir(folder: Path) -> list[dict]:
    """All tracks under an HF snapshot (<Track>/test-*.parquet[.rows.json]) or a GitHub ``data/`` folder."""
    records: list[tuple[str, int | str, Any, Path]] = []
    for track in ("Adaptation", "Comprehension", "Perception"):  # Video-R1-eval order
        hits = sorted((folder / track).glob("test-*.parquet.rows.json")) or sorted(
            (folder / track).glob("test-*.parquet")
        )
        if not hits:
            for cand in (
                folder / f"{track.lower()}_video.json",
                folder / "data" / f"{track.lower()}_video.json",
            ):
                if cand.is_file():
                    hits = [cand]
                    break
        for f in hits:
            records.extend((t, loc, r, f) for t, loc, r in _videommmu_records(read_file(f), f))
    if not records:
        raise FileNotFoundError(
            f"{folder}: no VideoMMMU track files found (expected <Track>/test-00000-of-00001.parquet[.rows.json] "
            "or {adaptation,comprehension,perception}_video.json, optionally under data/)"
        )
    rows = []
    for t, loc, r, f in records:
        rows.extend(_convert_videommmu([(t, loc, r)], f, start_id=len(rows) + 1))
    return check_unique_uids(folder, rows)


def mmvu_discipline(subject: str) -> str | None:
    for discipline, subjects in MMVU_DISCIPLINES.items():
        if subject in subjects:
            return discipline
    return None


def load_mmvu(data: Any, file: Path) -> list[dict]:
    rows = []
    for i, c, r in each_row(file, data, "MMVU validation.json"):
        rid = c.get(r, "id", str, nonempty=True)
        video_key = "video" if "video" in r else "video_path"  # lmms-eval's HF copy has a relative video_path
        video = c.get(r, video_key, str, nonempty=True)
        parts = video.rstrip("/").split("/")
        if len(parts) < 2 or not parts[-1]:
            raise c.fail(video_key, f"{video!r} should end in <Subject>/<n>.mp4")
        subject, fname = parts[-2], parts[-1]
        discipline = mmvu_discipline(subject)
        if discipline is None:
            raise c.fail(video_key, f"subject folder {subject!r} is not in the MMVU discipline map")
        qtype = c.get(r, "question_type", str)
        question = c.get(r, "question", str, nonempty=True)
        choices = c.get(r, "choices", dict)
        answer = c.get(r, "answer", str).strip()
        meta_in = r.get("metadata") if isinstance(r.get("metadata"), dict) else {}
        if qtype == "multiple-choice":
            keys = sorted(k for k, v in choices.items() if isinstance(v, str) and v.strip())
            if not keys:
                raise c.fail("choices", "a multiple-choice question has no non-empty choice")
            if any(k not in LETTERS for k in keys):
                raise c.fail("choices", f"keys {keys} should be letters")
            check_letter(c, "answer", answer, keys)
            problem_type, options = "multiple choice", [f"{k}. {choices[k]}" for k in keys]
        elif qtype == "open-ended":
            if not answer:
                raise c.fail("answer", "is empty")
            problem_type, options = ("numerical" if is_number(answer) else "free-form"), None
        else:
            raise c.fail("question_type", f"{qtype!r} should be 'multiple-choice' or 'open-ended'")
        meta = {
            "subject": subject,
            "discipline": discipline,
            "question_type": qtype,
            "id": rid,
            "subject_name": meta_in.get("subject"),
            "path_candidates": [f"./{subject}/{fname}"],
        }
        rows.append(
            build_row(
                problem_id=i + 1,
                problem=question,
                problem_type=problem_type,
                options=options,
                answer=answer,
                path=f"./videos/{subject}/{fname}",
                data_source=r.get("youtube_url") or "MMVU",
                meta=meta,
                uid=f"mmvu:{rid}",
            )
        )
    return check_unique_uids(file, rows)


def _mvbench_paths(task: str, video: str) -> tuple[str, list[str]]:
    folder = MVBENCH_FOLDERS.get(task)
    if folder is None:
        return f"./{task}/{video}", []
    cands = [f"./{task}/{video}"]
    if folder in MVBENCH_LMMS_FOLDERS:
        cands.append(f"./{MVBENCH_LMMS_FOLDERS[folder]}/{video}")
    return f"./{folder}/{video}", cands


def _load_mvbench(data: Any, file: Path, start_id: int = 1) -> list[dict]:
    ctx = Ctx(file)
    task = file.name.split(".")[0]
    rows = []
    for i, raw in enumerate(as_list(ctx, data, "MVBench json/<task>.json")):
        c = ctx.at(i)
        r = c.row_dict(raw)
        video = c.get(r, "video", str, nonempty=True)
        question = c.get(r, "question", str, nonempty=True)
        candidates = c.str_list(r, "candidates")
        if not 2 <= len(candidates) <= len(LETTERS):
            raise c.fail("candidates", f"expected at least 2 candidates, got {len(candidates)}")
        answer_text = c.get(r, "answer", str)
        if answer_text not in candidates:
            raise c.fail("answer", f"{answer_text!r} is not one of the candidates {candidates}")
        letter = LETTERS[candidates.index(answer_text)]
        meta: dict[str, Any] = {"task": task, "video": video}
        if ("start" in r) != ("end" in r):
            raise c.fail("end" if "start" in r else "start", "clip bounds need both 'start' and 'end'")
        if "start" in r:
            start, end = c.get(r, "start", (int, float)), c.get(r, "end", (int, float))
            if end < start:
                raise c.fail("end", f"end {end} is before start {start}")
            meta.update(start=float(start), end=float(end))
        path, cands = _mvbench_paths(task, video)
        meta["path_candidates"] = cands
        rows.append(
            build_row(
                problem_id=start_id + i,
                problem=question,
                problem_type="multiple choice",
                options=letter_options(candidates),
                answer=letter,
                path=path,
                data_source=task,
                meta=meta,
                uid=f"mvbench:{task}:{i}",
            )
        )
    return rows


def load_mvbench_file(data: Any, file: Path) -> list[dict]:
    return check_unique_uids(file, _load_mvbench(data, file))


def load_mvbench_dir(folder: Path) -> list[dict]:
    base = folder / "json" if (folder / "json").is_dir() else folder
    files = sorted(base.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"{folder}: no MVBench json/<task>.json files found")
    rows: list[dict] = []
    for f in files:
        rows.extend(_load_mvbench(read_file(f), f, start_id=len(rows) + 1))
    return check_unique_uids(folder, rows)


def _tempcompass_mc(c: Ctx, question: str, answer: str) -> tuple[str, list[str], str]:
    """Split "stem\\nA. x\\nB. y" into (stem, ["A. x", "B. y"]) and read the letter of "C. text"."""
    lines = question.split("\n")
    first = next((k for k, line in enumerate(lines) if line.startswith("A. ") or line == "A."), None)
    if first is None:
        raise c.fail("question", "no option lines ('A. ...') found in the question")
    stem = "\n".join(lines[:first]).strip()
    options = [line.strip() for line in lines[first:] if line.strip()]
    letters = option_letters(c, options, field="question")
    m = re.match(r"^\(?([A-Z])(?:[.):]|$)", answer.strip())
    if not m:
        raise c.fail("answer", f"{answer!r} should start with an option letter ('C. text')")
    return stem, options, check_letter(c, "answer", m.group(1), letters)


def _tempcompass_row(c: Ctx, r: dict, video_id: str, dim: str, uid: str, problem_id: int) -> dict:
    question = c.get(r, "question", str, nonempty=True)
    answer = c.get(r, "answer", str, nonempty=True)
    if answer.strip().lower() in ("yes", "no"):
        task_type, stem, options = "yes_no", question.strip(), ["A. yes", "B. no"]
        letter = "A" if answer.strip().lower() == "yes" else "B"
    else:
        task_type = "multi-choice"
        stem, options, letter = _tempcompass_mc(c, question, answer)
    meta = {
        "dim": dim,
        "task_type": task_type,
        "video_id": video_id,
        "path_candidates": [f"./{video_id}.mp4"],
    }
    return build_row(
        problem_id=problem_id,
        problem=stem,
        problem_type="multiple choice",
        options=options,
        answer=letter,
        path=f"./videos/{video_id}.mp4",
        data_source=dim,
        meta=meta,
        uid=f"tempcompass:{task_type}:{uid}",
    )


def load_tempcompass(data: Any, file: Path) -> list[dict]:
    ctx = Ctx(file)
    rows: list[dict] = []
    if isinstance(data, dict):  # questions/<task>.json: {video_id: {dim: [{question, answer}]}}
        for video_id, dims in data.items():
            if not isinstance(dims, dict):
                raise ctx.at(video_id).fail(None, f"expected {{dim: [questions]}}, got {type(dims).__name__}")
            for dim, items in dims.items():
                if not isinstance(items, list):
                    raise ctx.at(f"{video_id}/{dim}").fail(
                        None, f"expected a list of questions, got {type(items).__name__}"
                    )
                for k, raw in enumerate(items):
                    c = ctx.at(f"{video_id}/{dim}/{k}")
                    rows.append(
                        _tempcompass_row(
                            c, c.row_dict(raw), video_id, dim, f"{video_id}:{dim}:{k}", len(rows) + 1
                        )
                    )
        if not rows:
            raise ctx.fail(None, "the file holds no questions")
    else:  # lmms-lab/TempCompass flat rows
        for i, raw in enumerate(as_list(ctx, data, "TempCompass rows")):
            c = ctx.at(i)
            r = c.row_dict(raw)
            video_id = str(c.get(r, "video_id", (str, int)))
            dim = c.get(r, "dim", str, nonempty=True)
            rows.append(_tempcompass_row(c, r, video_id, dim, f"{video_id}:{dim}:{i}", i + 1))
    return check_unique_uids(file, rows)


def load_vsibench(data: Any, file: Path) -> list[dict]:
    rows = []
    for i, c, r in each_row(file, data, "VSI-Bench rows"):
        rid = c.get(r, "id", (int, str))
        dataset = c.get(r, "dataset", str, nonempty=True)
        scene = c.get(r, "scene_name", str, nonempty=True)
        qtype = c.get(r, "question_type", str, nonempty=True)
        question = c.get(r, "question", str, nonempty=True)
        gt = str(c.get(r, "ground_truth", (str, int, float))).strip()
        options = r.get("options")
        if options is not None:
            options = c.str_list(r, "options")
        if options:
            check_letter(c, "ground_truth", gt, option_letters(c, options))
            problem_type = "multiple choice"
        else:
            if not is_number(gt):
                raise c.fail(
                    "ground_truth", f"{gt!r} is not a number (a question without options is numeric)"
                )
            problem_type, options = "regression", None
        meta = {"question_type": qtype, "dataset": dataset, "scene_name": scene, "id": rid}
        rows.append(
            build_row(
                problem_id=i + 1,
                problem=question,
                problem_type=problem_type,
                options=options,
                answer=gt,
                path=f"./{dataset}/{scene}.mp4",
                data_source="VSI-Bench",
                meta=meta,
                uid=f"vsibench:{rid}",
            )
        )
    return check_unique_uids(file, rows)
