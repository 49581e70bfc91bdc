"""`video-ktr data unpack` (safe, idempotent extraction) and `video-ktr data check` (rows + media)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from video_ktr import cli
from video_ktr.commands.data import main
from video_ktr.data import check as data_check
from video_ktr.data import unpack as data_unpack
from video_ktr.data.check import check_dataset
from video_ktr.data.unpack import ArchiveError, marker_path, unpack, unpack_archive
from video_ktr.data.video import write_video

# ------------------------------------------------------------------------------------------------ unpack


def _zip(path: Path, members: dict[str, bytes | None], *, symlinks: dict[str, str] | None = None) -> Path:
    """A zip at ``path``: name -> content (None: a directory entry); symlinks: name -> target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members.items():
            if content is None:
                zf.writestr(zipfile.ZipInfo(name if name.endswith("/") else name + "/"), b"")
            else:
                zf.writestr(zipfile.ZipInfo(name), content)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


@pytest.fixture
def download(tmp_path: Path) -> Path:
    """A Video-R1-data-like folder: JSON at the top, one archive per source folder."""
    root = tmp_path / "Video-R1-data"
    root.mkdir()
    (root / "Video-R1-260k.json").write_text("[]")
    _zip(root / "CLEVRER" / "CLEVRER.zip", {
        "video_validation/": None,
        "video_validation/video_10000.mp4": b"clevrer-video",
        "video_validation/video_10001.mp4": b"clevrer-video-2",
    })
    _zip(root / "Knowledge" / "ArxivQA.zip", {"ArxivQA/images/2109.07509_0.jpg": b"jpg"})
    return root


def test_unpack_extracts_next_to_the_archive(download: Path, capsys) -> None:
    assert main(["unpack", str(download)]) == 0
    out = capsys.readouterr().out
    assert (download / "CLEVRER" / "video_validation" / "video_10000.mp4").read_bytes() == b"clevrer-video"
    assert (download / "Knowledge" / "ArxivQA" / "images" / "2109.07509_0.jpg").read_bytes() == b"jpg"
    for archive in ("CLEVRER/CLEVRER.zip", "Knowledge/ArxivQA.zip"):
        marker = marker_path(download / archive)
        assert marker.name == "." + Path(archive).name + ".unpacked" and marker.is_file()
        assert json.loads(marker.read_text())["size"] == (download / archive).stat().st_size
    assert "[1/2] CLEVRER/CLEVRER.zip: extracting 3 member(s)" in out
    assert "done: 2 extracted, 0 already extracted, 0 refused" in out


def test_unpack_is_idempotent_and_re_extracts_a_changed_archive(download: Path, capsys) -> None:
    assert main(["unpack", str(download)]) == 0
    video = download / "CLEVRER" / "video_validation" / "video_10000.mp4"
    video.unlink()  # if the archive were extracted again, the file would come back
    capsys.readouterr()
    assert main(["unpack", str(download)]) == 0
    out = capsys.readouterr().out
    assert not video.exists()
    assert out.count("already extracted (marker") == 2 and "done: 0 extracted, 2 already extracted" in out
    # a re-downloaded archive (other size / mtime) is extracted again
    archive = download / "CLEVRER" / "CLEVRER.zip"
    _zip(archive, {"video_validation/video_10000.mp4": b"new"})
    assert main(["unpack", str(download)]) == 0
    assert "changed since it was last extracted" in capsys.readouterr().out
    assert video.read_bytes() == b"new"


def test_unpack_crash_mid_extraction_extracts_again(download: Path, monkeypatch, capsys) -> None:
    calls = {"n": 0}
    real_copy = shutil.copyfileobj

    def crash_on_second(src, dst, length=0):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process is killed mid-archive
        return real_copy(src, dst, length)

    archive = download / "CLEVRER" / "CLEVRER.zip"
    monkeypatch.setattr(data_unpack.shutil, "copyfileobj", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        unpack_archive(archive, progress=False)
    assert not marker_path(archive).exists()
    monkeypatch.setattr(data_unpack.shutil, "copyfileobj", real_copy)
    assert main(["unpack", str(download)]) == 0
    assert "done: 2 extracted" in capsys.readouterr().out
    assert (download / "CLEVRER" / "video_validation" / "video_10001.mp4").read_bytes() == b"clevrer-video-2"
    assert marker_path(archive).is_file()


def test_unpack_dry_run_writes_nothing(download: Path, capsys) -> None:
    before = sorted(p.relative_to(download) for p in download.rglob("*"))
    assert main(["unpack", "--dry_run", str(download)]) == 0  # the flag may precede the folder
    out = capsys.readouterr().out
    assert sorted(p.relative_to(download) for p in download.rglob("*")) == before
    assert "would extract 3 member(s)" in out and "dry run: 2 to extract" in out


@pytest.mark.parametrize(
    ("member", "why"),
    [("../evil.txt", "'..'"), ("sub/../../evil.txt", "'..'"), ("/tmp/evil-abs.txt", "absolute"),
     ("C:/evil.txt", "absolute")],
)
def test_unpack_refuses_members_outside_the_folder(tmp_path: Path, capsys, member: str, why: str) -> None:
    root = tmp_path / "data"
    bad = _zip(root / "Bad" / "bad.zip", {"good.txt": b"ok", member: b"evil"})
    _zip(root / "Good" / "good.zip", {"fine.txt": b"fine"})
    assert main(["unpack", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"archive {bad}, member {member!r}" in out and why in out and "REFUSED" in out
    assert not (root / "Bad" / "good.txt").exists()  # nothing of a refused archive is written
    assert not marker_path(bad).exists()
    assert not (root / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/evil-abs.txt").exists()
    assert (root / "Good" / "fine.txt").read_bytes() == b"fine"  # the other archives are still extracted


def test_unpack_refuses_symlink_entries_and_writing_through_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "data"
    link_zip = _zip(root / "A" / "links.zip", {"x.txt": b"x"}, symlinks={"escape": "/etc"})
    with pytest.raises(ArchiveError) as info:
        unpack_archive(link_zip, progress=False)
    assert info.value.member == "escape" and "symbolic link" in str(info.value)
    # an existing symlink inside the folder that leads outside is not written through
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "B").mkdir(parents=True)
    (root / "B" / "videos").symlink_to(outside, target_is_directory=True)
    through = _zip(root / "B" / "b.zip", {"videos/x.mp4": b"x"})
    result = unpack(root, progress=False, log=lambda _: None)
    assert {e.member for e in result.errors} == {"escape", "videos/x.mp4"}
    assert not (outside / "x.mp4").exists() and not result.ok
    assert str(through) in str(next(e for e in result.errors if e.member == "videos/x.mp4"))


def test_unpack_reports_corrupt_archives_split_parts_and_missing_dir(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    (root / "A").mkdir(parents=True)
    (root / "A" / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    (root / "B").mkdir()
    (root / "B" / "big.z01").write_bytes(b"part")
    assert main(["unpack", str(root)]) == 1
    out = capsys.readouterr().out
    assert "A/broken.zip" in out and "not a readable zip file" in out
    assert "split archive part" in out and "big.z01" in out
    assert main(["unpack", str(tmp_path / "nope")]) == 2


def test_unpack_leaves_nested_archives_and_hidden_folders_alone(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    inner = _zip(tmp_path / "inner.zip", {"deep.txt": b"deep"}).read_bytes()
    _zip(root / "S" / "outer.zip", {"inner.zip": inner})
    _zip(root / ".cache" / "huggingface" / "x.zip", {"cached.txt": b"c"})
    assert main(["unpack", str(root)]) == 0
    assert (root / "S" / "inner.zip").is_file() and not (root / "S" / "deep.txt").exists()
    assert main(["unpack", str(root)]) == 0
    out = capsys.readouterr().out
    assert "skip S/inner.zip: it was extracted from S/outer.zip" in out
    assert not (root / "S" / "deep.txt").exists() and not (root / ".cache" / "huggingface" / "cached.txt").exists()


def test_unpack_warns_when_the_folder_name_would_double(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    _zip(root / "CLEVRER" / "CLEVRER.zip", {"CLEVRER/v.mp4": b"v"})
    assert main(["unpack", str(root)]) == 0
    assert "every member starts with 'CLEVRER/'" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- check

SMALL = ["--max_frames", "4", "--min_pixels", "784", "--max_pixels", "3136"]


def _row(pid: int, path: str, data_type: str = "video", **kw) -> dict:
    row = {
        "problem_id": pid, "problem": "Which colour?", "data_type": data_type, "problem_type": "multiple choice",
        "options": ["A. red", "B. blue"], "solution": "<answer>A</answer>", "path": path, "data_source": "unit",
    }
    row.update(kw)
    return row


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """videos/good.mp4, two truncated copies, an empty file, a PNG image."""
    root = tmp_path_factory.mktemp("media")
    frames = np.zeros((8, 56, 56, 3), np.uint8)
    frames[::2] = (200, 30, 30)
    good = root / "videos" / "good.mp4"
    write_video(good, frames, fps=4.0)
    data = good.read_bytes()
    (root / "videos" / "half.mp4").write_bytes(data[: len(data) // 2])
    (root / "videos" / "most.mp4").write_bytes(data[: int(len(data) * 0.8)])
    (root / "videos" / "empty.mp4").write_bytes(b"")
    (root / "images").mkdir()
    Image.new("RGB", (60, 40), (10, 200, 10)).save(root / "images" / "good.png")
    return root


def _dataset(media: Path) -> tuple[list[dict], dict[int, str]]:
    """Rows and the reason expected for each bad row index."""
    rows = [
        _row(0, "./videos/good.mp4"),
        _row(1, "./videos/half.mp4"),
        _row(2, "./images/good.png", "image"),
        _row(3, "./videos/missing.mp4"),
        _row(4, "./videos/good.mp4", options=None),  # MC without options
        _row(5, "./videos/good.mp4", problem_type="numerical", options=None, solution="<answer>3</answer>"),
        _row(6, "../outside.mp4"),
        _row(7, "./videos/empty.mp4"),
        _row(8, "./images/good.png", "video"),  # an image given as a video
    ]
    bad = {1: "video_unreadable", 3: "media_missing", 4: "missing_options", 6: "path_outside_root",
           7: "media_empty", 8: "media_wrong_type"}
    return rows, bad


def test_check_finds_every_bad_row_and_writes_the_clean_file(media: Path, tmp_path: Path, capsys) -> None:
    rows, bad = _dataset(media)
    ds = tmp_path / "train.json"
    ds.write_text(json.dumps(rows, indent=2))
    clean = tmp_path / "out" / "clean.json"
    rc = main(["check", str(ds), "--media_root", str(media), "--workers", "2", "--write_clean", str(clean), *SMALL])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"{ds}: 9 row(s): 3 good, 6 bad" in out
    # good.mp4 is opened once for its 2 valid rows; good.png once as an image and once as a video
    assert "media: 5 distinct file(s) opened, 3 unusable" in out
    for reason in bad.values():
        assert f"  {reason}: 1" in out
    assert f"{ds}, row 3, field 'path': media file" in out  # examples name file, row and field
    assert json.loads(clean.read_text()) == [r for i, r in enumerate(rows) if i not in bad]
    rejected = [json.loads(line) for line in (tmp_path / "out" / "clean.json.rejected.jsonl").read_text().splitlines()]
    assert {r["row"]: r["reason"] for r in rejected} == bad
    assert all(r["problem_id"] == r["row"] and r["message"] for r in rejected)
    assert next(r for r in rejected if r["row"] == 4)["field"] == "options"


def test_check_jsonl_keeps_the_format_and_counts_bad_lines(media: Path, tmp_path: Path, capsys) -> None:
    ds = tmp_path / "train.jsonl"
    good = [_row(0, "./videos/good.mp4"), _row(2, "./images/good.png", "image")]
    ds.write_text(json.dumps(good[0]) + "\n{not json\n\n" + json.dumps(good[1]) + "\n")
    clean = tmp_path / "clean.jsonl"
    rc = main(["check", str(ds), "--media_root", str(media), "--workers", "0", "--write_clean", str(clean), *SMALL])
    out = capsys.readouterr().out
    assert rc == 1 and "3 row(s): 2 good, 1 bad" in out and "bad_json: 1" in out and "line 2" in out
    assert [json.loads(line) for line in clean.read_text().splitlines()] == good
    (rejected,) = [json.loads(x) for x in (tmp_path / "clean.jsonl.rejected.jsonl").read_text().splitlines()]
    assert (rejected["row"], rejected["line"], rejected["reason"]) == (1, 2, "bad_json")


def test_check_truncated_video_in_both_ways(media: Path, tmp_path: Path) -> None:
    ds = tmp_path / "t.json"
    ds.write_text(json.dumps([_row(0, "./videos/half.mp4"), _row(1, "./videos/most.mp4"), _row(2, "./videos/good.mp4")]))
    from video_ktr.data.media import FrameSettings

    result = check_dataset(ds, media, settings=FrameSettings(max_frames=4, max_pixels=3136), workers=0, progress=False)
    reasons = {r.row: r.reason for r in result.rejected}
    assert reasons[0] == "video_unreadable" and reasons[1] == "video_unreadable"
    assert 2 not in reasons and result.total == 3 and not result.ok


def test_check_all_good_exits_zero_and_open_media_false(media: Path, tmp_path: Path, capsys) -> None:
    ds = tmp_path / "ok.json"
    ds.write_text(json.dumps([_row(0, "./videos/good.mp4"), _row(1, "./images/good.png", "image")]))
    assert main(["check", "--media_root", str(media), str(ds), "--workers", "2", *SMALL]) == 0
    assert "2 row(s): 2 good, 0 bad" in capsys.readouterr().out
    # without opening the media a truncated video passes (only existence is checked)
    ds.write_text(json.dumps([_row(0, "./videos/half.mp4")]))
    assert main(["check", str(ds), "--media_root", str(media), "--open_media", "false"]) == 0


def test_check_usage_errors(media: Path, tmp_path: Path, capsys) -> None:
    assert main(["check", str(tmp_path / "missing.json")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text('[{"problem": ')
    assert main(["check", str(bad)]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    ds = tmp_path / "d.json"
    ds.write_text("[]")
    assert main(["check", str(ds), "--write_clean", str(ds)]) == 2
    with pytest.raises(SystemExit):
        main(["check", str(ds), "other.json"])
    assert main(["nope"]) == 2 and main([]) == 0


def _crash_on_half(path: str, data_type: str, settings):
    """A media opener for the test below: the worker dies on half.mp4 (as a decoder segfault would)."""
    if path.endswith("half.mp4"):
        os._exit(3)
    return data_check.open_media(path, data_type, settings)


def test_check_survives_a_worker_crash(media: Path, tmp_path: Path) -> None:
    from video_ktr.data.media import FrameSettings

    ds = tmp_path / "c.json"
    rows = [_row(0, "./videos/good.mp4"), _row(1, "./videos/half.mp4"), _row(2, "./images/good.png", "image")]
    ds.write_text(json.dumps(rows))
    result = check_dataset(ds, media, settings=FrameSettings(max_frames=4, max_pixels=3136), workers=2,
                           progress=False, opener=_crash_on_half)
    assert [(r.row, r.reason) for r in result.rejected] == [(1, "media_crashed")]
    assert result.good_rows == [rows[0], rows[2]]


def test_data_command_is_registered(capsys) -> None:
    assert cli.COMMANDS["data"][0] == "video_ktr.commands.data"
    assert cli.main(["data", "--help"]) == 0
    assert "unpack" in capsys.readouterr().out
