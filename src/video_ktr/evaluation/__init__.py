"""Benchmark loaders (tasks), evaluation and scoring of a model, single-example inference."""
