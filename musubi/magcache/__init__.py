"""MagCache (arXiv 2506.09045): skip transformer passes whose residual change a calibrated
magnitude-ratio curve predicts. Free of model code; import from the module that holds a concept:

* :mod:`.settings` — :class:`MagCacheSettings` (θ, K, ρ, optional ratios), the option checks and
  :func:`parse_ratio_string`;
* :mod:`.calibration` — :class:`Calibration`, one expert's part of a two-expert curve, the
  calibration file format and :func:`load_calibration_json`;
* :mod:`.published` — the calibrations shipped in ``defaults.json`` and which fits a model family;
* :mod:`.resampling` — one ratio per step of the run at hand, whatever the step count, branches
  and experts of the calibration;
* :mod:`.state` — :class:`MagCacheState`, the per-step skip decisions of one run;
* :mod:`.recorder` — :class:`CalibrationRecorder`, which measures a model's curve;
* :mod:`.steps` — which sampling step a model evaluation belongs to, from its noise level;
* :mod:`.choice` — which ratios a run uses, from a user's options ("auto", published, saved,
  pasted, Wan 2.2 A14B experts).
"""
