"""The training engine, shared by the Train LoRA node and ``python -m musubi train``.

``loop`` (the Trainer) · ``settings`` (every option, declared once) · ``checkpoints`` (files and
resumable states on disk) · ``config`` and ``cli`` (TOML and command line) · ``optimizers`` ·
``schedulers`` (LR schedules, Rex included) · ``timesteps`` and ``timestep_preview`` (noise-level
sampling) · ``adapter`` (what a model must offer the trainer) · ``expert_pair`` (Wan 2.2 A14B's two
experts as one model) · ``loss_plot``.
"""
