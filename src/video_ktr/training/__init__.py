"""Recipes that change weights: the GRPO/KTR step, SFT, checkpoints, schedules and the distributed set-up."""
