"""FramePack (HunyuanVideo packed image-to-video, lllyasviel) without ComfyUI.

The network itself is diffusers' ``HunyuanVideoFramepackTransformer3DModel`` (imported lazily).
This package holds what diffusers does not:

* reading the checkpoints users have: :mod:`.checkpoint` (the config a file's tensor shapes
  imply) and :mod:`.loading` (which layout a path is, with clear errors for files that are not
  usable FramePack weights, and the transformer loaded from it);
* training: :mod:`.training_sections` (cutting a video latent into sections),
  :mod:`.section_items` (whole training samples seen as one item per section),
  :mod:`.cache_items` (musubi-tuner's FramePack section caches as training items) and
  :mod:`.adapter` (the training engine's model adapter);
* sampling by sections as musubi-tuner / lllyasviel's FramePack do it, vanilla (backwards) and
  F1 (forwards): :mod:`.sampling_sections` (which frames and indices each section sees),
  :mod:`.schedule` (the shifted sigmas), :mod:`.unipc` (the UniPC-bh1 solver),
  :mod:`.block_cache` (MagCache on the transformer blocks), :mod:`.calibration` (which MagCache
  curve a run uses, and saving a measured one) and :mod:`.sampling` (the loop).
"""
