"""Training data from parquet, `datasets` folders and (offline: refused) hub ids (data/sources.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
datasets = pytest.importorskip("datasets")
import pyarrow.parquet as pq  # noqa: E402

from video_ktr.data.rows import DataError, load_dataset, read_rows  # noqa: E402
from video_ktr.data.sources import SourceError, read_source  # noqa: E402


def _rows(tiny_setup) -> list[dict]:
    return json.loads(Path(tiny_setup.train_json).read_text())


def _key(samples):
    return [(s.problem_id, s.problem, s.solution, s.problem_type, s.data_type, s.options, s.media_path) for s in samples]


@pytest.fixture(scope="module")
def sources(tiny_setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    rows = _rows(tiny_setup)
    pq.write_table(pa.Table.from_pylist(rows), root / "train.parquet")
    (root / "shards").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:10]), root / "shards" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[10:]), root / "shards" / "train-00001-of-00002.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:12]),
                          "validation": datasets.Dataset.from_list(rows[12:])}).save_to_disk(str(root / "saved_dict"))
    return root


@pytest.mark.parametrize("name", ["train.parquet", "shards", "saved"])
def test_each_source_gives_the_json_files_rows(tiny_setup, sources, name):
    want = load_dataset(tiny_setup.train_json)
    got = load_dataset(sources / name, media_root=tiny_setup.data_dir)
    assert _key(got) == _key(want)


def test_a_dataset_dict_folder_takes_its_split(tiny_setup, sources):
    rows = _rows(tiny_setup)
    train = load_dataset(sources / "saved_dict", media_root=tiny_setup.data_dir)
    val = load_dataset(sources / "saved_dict", media_root=tiny_setup.data_dir, split="validation")
    assert [s.problem_id for s in train] == [str(r["problem_id"]) for r in rows[:12]]
    assert [s.problem_id for s in val] == [str(r["problem_id"]) for r in rows[12:]]
    with pytest.raises(DataError, match=r"saved_dict: no split 'test' \(splits: train, validation\)"):
        load_dataset(sources / "saved_dict", media_root=tiny_setup.data_dir, split="test")


def test_a_bad_parquet_row_is_named_by_file_row_and_field(tiny_setup, tmp_path):
    rows = _rows(tiny_setup)
    rows[3] = {**rows[3], "problem_type": "essay"}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / "bad.parquet", media_root=tiny_setup.data_dir)
    assert (err.value.file, err.value.row, err.value.field) == (str(tmp_path / "bad.parquet"), 3, "problem_type")


def test_hub_ids_are_refused_offline_and_need_a_media_root(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match=r"Video-R1/Video-R1-260k: not a local file or folder, and HF_HUB_OFFLINE"):
        read_source("Video-R1/Video-R1-260k", read_rows=read_rows)
    with pytest.raises(DataError, match="needs --media_root"):
        load_dataset("Video-R1/Video-R1-260k")
    with pytest.raises(DataError, match=r"missing\.parquet: data file does not exist"):
        load_dataset(tmp_path / "missing.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a save_to_disk dataset"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet.*not a readable parquet file"):
        load_dataset(tmp_path / "junk.parquet")


def test_a_hub_id_goes_to_datasets_load_dataset_when_online(monkeypatch, tiny_setup):
    """Online, a hub id is passed to datasets.load_dataset with the config and split (a stand-in: no network)."""
    calls = []
    rows = _rows(tiny_setup)

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = load_dataset("owner/videos", media_root=tiny_setup.data_dir, config="mix", split="train")
    assert calls == [("owner/videos", "mix", "train")]
    assert _key(got) == _key(load_dataset(tiny_setup.train_json))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train.parquet", "saved"])
def test_two_training_steps_from_parquet_and_save_to_disk_match_the_json_run(tiny_setup, sources, tmp_path, name):
    from video_ktr.training.grpo import KTRTrainer
    from video_ktr.training.grpo_config import TrainConfig
    from video_ktr.utils.config import parse_args

    def run(out, *extra):
        cfg = parse_args(TrainConfig, tiny_setup.train_args(out, "--max_steps", "2", *extra))
        KTRTrainer(cfg).train()
        return [{k: v for k, v in json.loads(line).items() if "second" not in k and "time" not in k}
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    base = run(tmp_path / "json")
    other = run(tmp_path / name, "--dataset", str(sources / name), "--media_root", str(tiny_setup.data_dir))
    assert len(base) == 2 and other == base
