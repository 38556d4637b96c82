"""Training data: from image/video folders or dataset TOMLs to cached latents and embeddings.

``config`` (musubi-tuner's dataset TOML) · ``plan`` (which items a dataset yields) · ``buckets`` ·
``frames`` (frame extraction) · ``media`` (reading images and videos) · ``pixels`` · ``cache``
(encoding and musubi-tuner's cache layout) · ``latent_cache`` (the trainer's on-disk dataset) ·
``musubi_cache`` (musubi-tuner's cache folders as that dataset; ``open_cache_folder`` picks one,
``open_training_data`` also reads dataset configs through their caches) ·
``memory`` (an in-memory dataset) · ``text_embeddings`` and ``image_embeddings`` (cached encoder
outputs).
"""
