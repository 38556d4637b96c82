"""LoRA networks and their files.

``network`` (the trainable modules, attached to a frozen model with hooks) · ``presets`` (which
layers each model family trains by default) · ``formats`` (ComfyUI and musubi-tuner key layouts,
metadata, reading any LoRA file) · ``merge`` (folding a LoRA into weights) · ``ema`` (post-hoc EMA
of a run's checkpoints).
"""
