"""LoRA networks and their files.

``network`` (LoRA, LoHa and LoKr networks, attached to a frozen model with hooks) · ``modules``
(each type's module of one layer: its math, initialisation and file tensors) · ``presets`` (which
layers each model family trains by default) · ``formats`` (ComfyUI and musubi-tuner key layouts,
metadata, reading any LoRA file) · ``merge`` (folding a LoRA into weights) · ``ema`` (post-hoc EMA
of a run's checkpoints).
"""
