"""--merge_adapters, the model card and --push_to_hub (training/hub.py), with a stand-in for the hub's upload."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from video_ktr.training import hub
from video_ktr.training.grpo_config import TrainConfig
from video_ktr.training.sft_config import SFTConfig
from video_ktr.utils.config import parse_args

REQ = ["--model_name_or_path", "Qwen/Qwen2.5-VL-7B-Instruct", "--dataset", "owner/videos", "--output_dir", "runs/ktr-7b"]


class StandInHub:
    """huggingface_hub.create_repo / upload_folder: records the calls; the upload selects files with the hub's own
    filter (huggingface_hub.utils.filter_repo_objects, what upload_folder applies to allow_patterns)."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: list[str] = []
        self.fail = fail

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def upload_folder(self, **kwargs):
        from pathlib import Path

        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(("upload_folder", kwargs))
        if self.fail is not None:
            raise self.fail
        root = Path(kwargs["folder_path"])
        every = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        self.uploaded = list(filter_repo_objects(every, allow_patterns=kwargs.get("allow_patterns"),
                                                 ignore_patterns=kwargs.get("ignore_patterns")))
        return SimpleNamespace(commit_url="https://huggingface.co/stand-in")


@pytest.fixture
def stand_in_hub(monkeypatch):
    import huggingface_hub

    fake = StandInHub()
    monkeypatch.setattr(huggingface_hub, "create_repo", fake.create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake.upload_folder)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the stand-in needs no network
    return fake


def test_push_flags_parse_and_are_refused_where_they_cannot_work(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = parse_args(TrainConfig, [*REQ, "--push_to_hub", "--hub_model_id", "me/ktr", "--hub_private_repo", "--hub_token", "t"])
    assert (cfg.push_to_hub, cfg.hub_model_id, cfg.hub_private_repo, cfg.hub_token) == (True, "me/ktr", True, "t")
    assert cfg.record()["hub_token"] == "<HUB_TOKEN>" and cfg.hub_token == "t"  # never written in clear
    assert parse_args(SFTConfig, [*REQ, "--push_to_hub"]).push_to_hub
    assert hub.repo_name(parse_args(TrainConfig, [*REQ, "--push_to_hub"])) == "ktr-7b"  # transformers: the folder's name
    for flags, message in [
        (["--hub_model_id", "me/ktr"], "--hub_model_id has no effect without --push_to_hub true"),
        (["--push_to_hub", "--hub_model_id", "a/b/c"], "--hub_model_id must be 'name' or 'owner/name'"),
        (["--merge_adapters"], "--merge_adapters merges LoRA adapters: it needs --use_peft true"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(TrainConfig, [*REQ, *flags], prog="video-ktr train")
        assert message in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        parse_args(TrainConfig, [*REQ, "--push_to_hub"], prog="video-ktr train")
    assert "--push_to_hub with HF_HUB_OFFLINE=1" in capsys.readouterr().err


def test_model_card_front_matter_settings_and_eval_table(tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "mmvu.json").write_text(json.dumps({"results": [], "metrics": {"benchmark": "mmvu", "overall": 0.5},
                                                        "protocol": {"model": str(out)}}))
    (out / "metrics.jsonl").write_text(json.dumps({"step": 2, "reward": 0.75, "time_rollout": 1.0}) + "\n")
    cfg = parse_args(TrainConfig, [*REQ, "--use_peft", "--token_selection", "entropy", "visual"])
    text = hub.model_card(out, cfg, recipe="grpo", steps=2)
    card = ModelCard(text)  # the hub's own parser reads it
    assert card.data.base_model == "Qwen/Qwen2.5-VL-7B-Instruct" and card.data.datasets == ["owner/videos"]
    assert card.data.library_name == "peft" and "key-token-reinforcement" in card.data.tags
    assert "| `token_selection` | entropy, visual |" in text and "| reward | 0.75 |" in text and "time_rollout" not in text
    assert "| MMVU |" in text and "| 50.0 |" in text  # the evaluation table of OUT/eval
    assert "PeftModel.from_pretrained" in text
    local = parse_args(SFTConfig, ["--model_name_or_path", str(tmp_path), "--dataset", "d.json", "--output_dir", str(out)])
    card = ModelCard(hub.model_card(out, local, recipe="sft", steps=1, merged=False))
    assert card.data.base_model is None and card.data.library_name == "transformers"  # a local base is not a hub id


def test_push_uploads_only_the_final_model_and_wraps_failures(tmp_path, stand_in_hub):
    out = tmp_path / "ktr-run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "adapter").mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "metrics.jsonl", "completions.jsonl",
                 "train_config.json", "run_info.json", ".video-ktr.lock", "checkpoint-2/model.safetensors",
                 "adapter/adapter_config.json"):
        (out / name).write_text("x")
    cfg = parse_args(TrainConfig, ["--model_name_or_path", "m", "--dataset", "d.json", "--output_dir", str(out),
                                   "--push_to_hub", "--hub_private_repo", "--hub_token", "secret"])
    assert hub.push_to_hub(out, cfg, commit_message="m") == "me/ktr-run"
    (_, create), (_, upload) = stand_in_hub.calls
    assert create == {"repo_id": "ktr-run", "token": "secret", "private": True, "repo_type": "model", "exist_ok": True}
    assert upload["repo_id"] == "me/ktr-run" and upload["token"] == "secret" and upload["folder_path"] == str(out)
    assert stand_in_hub.uploaded == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    stand_in_hub.fail = OSError("connection refused")
    with pytest.raises(hub.HubError, match=r"upload of .* failed \(OSError: connection refused\); the model is saved in"):
        hub.push_to_hub(out, cfg, commit_message="m")


def test_merge_adapters_gives_a_model_from_pretrained_loads_without_peft(tiny_setup, tmp_path):
    """A LoRA adapter with non-zero weights, saved as the trainer saves it, merged: the merged folder's logits are the
    adapted model's (and not the base's); no LoRA tensor is left; the adapter moves to OUT/adapter."""
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    from video_ktr.model.loading import load_model

    base = load_model(str(tiny_setup.model_dir))
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        adapted = model(input_ids=ids).logits
    out = tmp_path / "out"
    model.save_pretrained(str(out))
    cfg = parse_args(TrainConfig, ["--model_name_or_path", str(tiny_setup.model_dir), "--dataset", "d.json",
                                   "--output_dir", str(out), "--use_peft", "--merge_adapters"])
    adapter = hub.merge_adapters(out, cfg)
    assert (adapter / "adapter_config.json").is_file() and not (out / "adapter_config.json").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert not [k for k in fh.keys() if "lora" in k]
    merged = load_model(str(out))
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    assert torch.allclose(merged_logits, adapted, atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)


def test_a_lora_run_merges_writes_its_card_and_pushes(tiny_setup, tmp_path, stand_in_hub):
    from video_ktr.training.grpo import KTRTrainer

    out = tmp_path / "lora-run"
    cfg = parse_args(TrainConfig, tiny_setup.train_args(
        out, "--max_steps", "1", "--save_steps", "1", "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
        "--merge_adapters", "--push_to_hub", "--hub_model_id", "me/tiny-ktr", "--hub_token", "secret"))
    KTRTrainer(cfg).train()
    assert json.loads((out / "train_config.json").read_text())["hub_token"] == "<HUB_TOKEN>"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "checkpoint-1").is_dir()
    assert "library_name: transformers" in (out / "README.md").read_text()
    uploaded = set(stand_in_hub.uploaded)
    assert {"README.md", "config.json", "model.safetensors"} <= uploaded
    assert not {n for n in uploaded if "/" in n or n.endswith(".jsonl") or n in ("train_config.json", "run_info.json")}
    from video_ktr.model.loading import load_model

    load_model(str(out))  # transformers loads the merged folder as it is
