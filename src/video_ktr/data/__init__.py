"""Rows of the Video-R1 schema and their validation, video and image decoding, prompts, the synthetic set, data tools."""
