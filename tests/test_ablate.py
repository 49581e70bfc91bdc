"""`video-ktr ablate` end to end on the session's tiny model and synthetic set.

One ablation (grpo and ktr x seeds 0 and 1, 2 steps each, held-out greedy and sampled evaluation)
runs once per module; the other tests rerun it (nothing retrained), resume a run killed after its
first checkpoint, and check the refusals.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from tests.family import px
from video_ktr.analysis import ablation as ablate
from video_ktr.commands.ablate import main as ablate_main
from video_ktr.training.grpo import KTRTrainer

VARIANTS = ["grpo", "ktr"]
SEEDS = [0, 1]


def write_yaml(tiny_setup, path: Path) -> Path:
    cfg = {
        "model_name_or_path": str(tiny_setup.model_dir), "dataset": str(tiny_setup.train_json),
        "output_dir": "ignored/by/ablate", "seed": 123, "token_selection": ["entropy"],  # replaced per run
        "max_steps": 2, "per_device_train_batch_size": 1, "num_generations": 2, "max_completion_length": 8,
        "lr_scheduler_type": "constant", "beta": 0.0, "top_p": 1.0, "logging_steps": 0,
        "max_frames": 8, "video_fps": 4, "min_pixels": px(1), "max_pixels": px(4),
        # count_e differs between completions of the random model: non-zero advantages and gradients
        "reward_funcs": ["accuracy", "format", "tests.reward_fixtures:count_e"],
        "diagnostics_steps": 1, "save_total_limit": 2,  # keep checkpoint-1 for the resume test
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def argv(config: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(config), "--output_dir", str(out), "--seeds", "2", "--variants", *VARIANTS,
            "--eval_max_new_tokens", "8", "--learning_rate", "1e-3", *extra]  # a train option given on the command line


class Calls:
    """Counts KTRTrainer.train and ablate.evaluate_run calls (and where training started)."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.train: list[tuple[str, int, str | None]] = []
        self.evals: list[str] = []
        train, evaluate_run = KTRTrainer.train, ablate.evaluate_run

        def counted_train(trainer):
            self.train.append((trainer.cfg.output_dir, trainer.state.step, trainer.cfg.resume_from_checkpoint))
            return train(trainer)

        def counted_eval(folder, *a, **k):
            self.evals.append(str(folder))
            return evaluate_run(folder, *a, **k)

        mp.setattr(KTRTrainer, "train", counted_train)
        mp.setattr(ablate, "evaluate_run", counted_eval)


@pytest.fixture(scope="module")
def first(tiny_setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    config = write_yaml(tiny_setup, root / "tiny.yaml")
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        calls = Calls(mp)
        assert ablate_main(argv(config, out)) == 0
    return config, out, calls


def test_layout_runs_and_evaluations(first, tiny_setup):
    config, out, calls = first
    assert len(calls.train) == 4 and all(step == 0 and resume is None for _, step, resume in calls.train)
    assert len(calls.evals) == 4
    for v in VARIANTS:
        for s in SEEDS:
            d = out / v / f"seed{s}"
            for name in ("config.json", "metrics.jsonl", "train_config.json", "done.json", "eval_greedy.json",
                         "eval_sampled.json", "checkpoint-2"):
                assert (d / name).exists(), d / name
            tc = json.loads((d / "train_config.json").read_text())
            assert tc["seed"] == s and tc["output_dir"] == str(d)
            assert tc["token_selection"] == ablate.VARIANTS[v]["token_selection"]
            assert tc["learning_rate"] == 1e-3 and tc["save_steps"] == 1  # command-line override; max_steps // 4 -> 1
            done = json.loads((d / "done.json").read_text())
            assert done["variant"] == v and done["seed"] == s and done["steps"] == 2
            assert done["eval_protocol"]["data"] == str(tiny_setup.test_json)  # default: test.json beside the data
            assert done["eval_protocol"]["max_new_tokens"] == 8
            for dec in ("greedy", "sampled"):
                ev = json.loads((d / f"eval_{dec}.json").read_text())
                assert len(ev["results"]) == 8
                assert done["evaluation"][dec]["accuracy"] == ev["metrics"]["overall"]
                assert set(done["evaluation"][dec]["by_kind"]) == set(ev["metrics"]["by_kind"])
            metrics = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            assert done["summary"]["final_reward"] == pytest.approx(metrics[-1]["reward"])  # last 10% of 2 steps: 1
            assert done["summary"]["loss_variance"] == pytest.approx(statistics.fmean(m["loss_variance"] for m in metrics))
            assert done["summary"]["grad_norm_key"] == pytest.approx(statistics.fmean(m["grad_norm_key"] for m in metrics))
    # the same prompts for every variant of a seed (only the selection differs)
    sel = {v: json.loads((out / v / "seed0" / "train_config.json").read_text()) for v in VARIANTS}
    diff = {k for k in sel["grpo"] if sel["grpo"][k] != sel["ktr"][k]}
    assert diff == {"token_selection", "output_dir"}, diff


def test_ablation_json_matches_done_files(first):
    _, out, _ = first
    report = json.loads((out / "ablation.json").read_text())
    assert report["seeds"] == SEEDS and list(report["variants"]) == VARIANTS
    assert report["runs_trained_now"] == 4 and report["machine"]["nproc"] >= 1 and report["wall_seconds"] > 0
    for v in VARIANTS:
        summaries = [json.loads((out / v / f"seed{s}" / "done.json").read_text())["summary"] for s in SEEDS]
        for metric in ("greedy_accuracy", "sampled_accuracy", "final_reward", "loss_variance", "grad_norm_key",
                       "grad_norm_masked", "cos_key_full"):
            st = report["variants"][v]["metrics"][metric]
            values = [x[metric] for x in summaries]
            assert st["values"] == values, (v, metric)
            assert st["mean"] == pytest.approx(statistics.fmean(values))
            assert st["std"] == pytest.approx(statistics.stdev(values))
            assert st["n"] == 2
        assert report["variants"][v]["metrics"]["grad_norm_key"]["mean"] > 0
        assert report["variants"][v]["metrics"]["final_reward"]["std"] > 0
    # the reading is computed from the table
    (entry,) = report["reading"]
    g, k = (report["variants"][n]["metrics"]["greedy_accuracy"] for n in ("grpo", "ktr"))
    pooled = math.sqrt((g["std"] ** 2 + k["std"] ** 2) / 2)
    assert entry["pooled_std"] == pytest.approx(pooled)
    assert entry["difference"] == pytest.approx(k["mean"] - g["mean"])
    assert entry["verdict"] == (ablate.EXCEEDS if abs(k["mean"] - g["mean"]) > pooled else ablate.WITHIN)
    md = (out / "ablation.md").read_text()
    assert "| variant | token_selection |" in md and "`ktr`" in md and "`grpo`" in md
    assert entry["text"] in md and entry["verdict"] in md
    assert f"{g['mean']:.3f} ± {g['std']:.3f}" in md
    assert "video-ktr ablate --config" in md and "nproc" in md and "wall time" in md
    for png in ("accuracy.png", "reward_curves.png"):
        assert (out / png).stat().st_size > 1000 and png in report["plots"]


def test_rerun_does_not_retrain(first, monkeypatch, capsys):
    config, out, _ = first
    calls = Calls(monkeypatch)
    assert ablate_main(argv(config, out)) == 0
    assert calls.train == [] and calls.evals == []
    assert capsys.readouterr().out.count("already done, reused") == 4
    assert json.loads((out / "ablation.json").read_text())["runs_reused"] == 4
    # other settings into the same folder are refused before anything is trained
    assert ablate_main(argv(config, out, "--max_steps", "3")) == 2
    assert calls.train == []
    assert "other settings" in capsys.readouterr().err


def test_partial_run_resumes_from_its_checkpoint(first, tmp_path, monkeypatch):
    config, out, _ = first
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    run = copy / "ktr" / "seed1"
    before = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # as if killed during step 2: no final model, no done.json, no checkpoint-2
    for p in list(run.iterdir()):
        if p.is_file() and p.name not in ("metrics.jsonl", "train_config.json"):
            p.unlink()
    shutil.rmtree(run / "checkpoint-2")
    calls = Calls(monkeypatch)
    assert ablate_main(argv(config, copy, "--delete_checkpoints_when_done")) == 0
    assert calls.train == [(str(run), 1, "latest")]  # resumed at step 1, the other three runs reused
    assert calls.evals == [str(run)]
    after = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in after] == [1, 2]
    assert after[1]["reward"] == before[1]["reward"]  # the same step 2 as the uninterrupted run
    done = json.loads((run / "done.json").read_text())
    assert done["resumed_from_step"] == 1
    assert not list(run.glob("checkpoint-*")) and (copy / "ktr" / "seed0" / "checkpoint-2").is_dir()  # reused: untouched
    assert done["summary"]["final_reward"] == json.loads((out / "ktr" / "seed1" / "done.json").read_text())["summary"]["final_reward"]
    report = json.loads((copy / "ablation.json").read_text())
    assert report["runs_trained_now"] == 1 and report["runs_reused"] == 3
    assert report["variants"]["ktr"]["run_dirs"][1] == str(run)


def test_options_are_checked(tmp_path, capsys):
    base = ["--config", "x.yaml", "--output_dir", str(tmp_path)]
    opts = ablate.parse_options([*base, "--seed_list", "3,5", "--variants", "ktr,random", "grpo"])
    assert opts.seeds == [3, 5] and opts.variants == ["ktr", "random", "grpo"]
    assert ablate.parse_options(base).variants == list(ablate.VARIANTS) and ablate.parse_options(base).seeds == [0, 1, 2]
    for bad in (["--variants", "nope"], ["--token_selection", "entropy"], ["--token_weighting", "linear"], ["--seed", "4"], ["--no_such_option", "1"]):
        with pytest.raises(SystemExit):
            ablate.parse_options([*base, *bad])
    assert {v["token_selection"][0] for v in ablate.VARIANTS.values()} == {"none", "entropy", "visual", "temporal",
                                                                            "random", "all"}
    assert ablate.VARIANTS["t_grpo"] == {"token_selection": ["none"], "temporal_grpo": True, "token_weighting": "hard"}
    assert ablate.VARIANTS["ktr_sigmoid"] == {"token_selection": ["all"], "temporal_grpo": False, "token_weighting": "sigmoid"}
    assert ablate.VARIANTS["ktr_linear"]["token_weighting"] == "linear"
    with pytest.raises(SystemExit):  # the weighting is the variant's, not an option
        ablate.parse_options([*base, "--token_weighting", "sigmoid"])


def test_intervals_and_paired_tests_are_reported(first):
    _, out, _ = first
    report = json.loads((out / "ablation.json").read_text())
    tests = {(e["variant"], e["metric"]): e for e in report["paired_tests"]}
    entry = tests[("ktr", "greedy_accuracy")]
    assert entry["baseline"] == "grpo" and entry["seeds"] == [0, 1] and entry["t_test"]["n"] == 2
    # McNemar pairs every held-out item of both seeds
    done = {(v, s): json.loads((out / v / f"seed{s}" / ablate.DONE).read_text()) for v in VARIANTS for s in SEEDS}
    n_items = sum(len(done[("grpo", s)]["evaluation"]["greedy"]["items"]) for s in SEEDS)
    assert entry["mcnemar"]["n"] == n_items > 0
    for v in VARIANTS:
        ci = report["variants"][v]["metrics"]["greedy_accuracy"]
        assert ci["ci95_seeds"]["n"] == 2 and ci["ci95_items"]["n"] == n_items
    text = (out / "ablation.md").read_text()
    assert "## 95 % intervals" in text and "## Paired tests against `grpo`" in text


def test_epochs_are_refused_for_a_step_count(tiny_setup, tmp_path):
    """A finished run is recognised by its step count: --num_train_epochs (max_steps -1) is refused, naming the fix."""
    config = write_yaml(tiny_setup, tmp_path / "c.yaml")
    opts = ablate.parse_options(["--config", str(config), "--output_dir", str(tmp_path / "o"), "--max_steps", "-1",
                                 "--num_train_epochs", "1"])
    with pytest.raises(ablate.AblateError, match="give --max_steps N instead of --num_train_epochs 1.0"):
        ablate.base_config(opts)
