"""The math of a GRPO/KTR step: rewards, advantages, key-token selection, the loss and its diagnostics. Pure tensors, no model."""
