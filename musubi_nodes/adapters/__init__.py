"""How Train LoRA's inputs become the training engine's model adapter and dataset — decided here only.

The node hands over what it was given (a MODEL, the training data, the optional FramePack
settings and Wan 2.2 high-noise expert); :func:`prepare_training` picks the adapter once:
a FramePack MODEL trains by sections (:mod:`.framepack`), every ComfyUI-native model through
ComfyUI's own conditioning code (:mod:`.comfy_model`), and a second expert makes it a pair.
"""

from __future__ import annotations

from ...musubi.errors import MusubiError
from ...musubi.framepack.section_items import FramePackSections
from ...musubi.training.expert_pair import ExpertPairAdapter
from ..framepack_model import framepack_transformer
from .comfy_model import ComfyModelAdapter
from .framepack import ComfyFramePackAdapter
from .training_data import JoinedData, TrainingData, TrainingItems

NODE = "Train LoRA"


def prepare_training(model, data: TrainingData, framepack_settings: dict | None = None, model_high_noise=None,
                     timestep_boundary: float = 0.875):
    """``(adapter, dataset)`` for the trainer; the models must already be clones the caller owns."""
    transformer = framepack_transformer(model)
    if transformer is not None:
        if model_high_noise is not None:
            raise MusubiError(f"{NODE}: model_high_noise is for Wan 2.2 A14B's two experts; disconnect it for FramePack.")
        data = FramePackSections(data, framepack_settings, NODE)  # one training item per section
        adapter = ComfyFramePackAdapter.prepare(model, transformer, data)
    else:
        if framepack_settings is not None:
            raise MusubiError(f"{NODE}: FramePack Training Settings is connected but the model is not a FramePack model; "
                              "disconnect it, or load FramePack with Load FramePack DiT.")
        adapter = ComfyModelAdapter.prepare(model, data)
        if model_high_noise is not None:
            adapter = ExpertPairAdapter(adapter, ComfyModelAdapter.prepare(model_high_noise, data), timestep_boundary)
    return adapter, TrainingItems(data, model.model.process_latent_in, adapter.architecture)


def prepare_training_with_validation(model, data: TrainingData, validation: TrainingData | None,
                                     framepack_settings: dict | None = None, model_high_noise=None,
                                     timestep_boundary: float = 0.875):
    """``(adapter, training items, validation items or None)``: one adapter reads both, training
    items first, so the training view is the one :func:`prepare_training` would give."""
    if validation is None:
        return (*prepare_training(model, data, framepack_settings, model_high_noise, timestep_boundary), None)
    if framepack_transformer(model) is not None:
        raise MusubiError(f"{NODE}: validation data is not supported for FramePack models yet (they train by sections); "
                          "disconnect the validation input.")
    joined = JoinedData(data, validation)
    adapter, _ = prepare_training(model, joined, framepack_settings, model_high_noise, timestep_boundary)
    process_in = model.model.process_latent_in
    training = TrainingItems(joined, process_in, adapter.architecture, range(len(data)))
    held = TrainingItems(joined, process_in, adapter.architecture, range(len(data), len(joined)))
    return adapter, training, held
