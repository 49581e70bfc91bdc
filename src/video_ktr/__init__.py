"""video-ktr: Key-Token Reinforcement for video reasoning (GRPO on Qwen2.5-VL-family models)."""

__version__ = "0.1.0"
