"""Thin ComfyUI V3 nodes over the ``musubi`` library (no algorithms here).

Every node is registered through :data:`NODES`, where each gets the pack-wide input checks of
:mod:`.checks` (non-finite FLOAT inputs are refused before ``execute`` runs).
"""

from comfy_api.latest import ComfyExtension, io

from .checks import refuse_non_finite_floats
from .compile import MusubiCompileModel
from .dataset import MusubiDataset
from .ema_merge import MusubiEMACandidates, MusubiPostHocEMAMerge
from .framepack_sampler import MusubiFramePackSampler
from .framepack_train import MusubiFramePackTrainingSettings
from .image_embeddings import MusubiLoadImageEmbedding, MusubiSaveImageEmbedding
from .load_dit_fp8 import MusubiLoadDiTFP8Scaled
from .load_framepack import MusubiLoadFramePack
from .magcache import MusubiCalibrateMagCache, MusubiMagCache, MusubiMagCacheSampler
from .text_embeddings import MusubiLoadTextEmbedding, MusubiSaveTextEmbedding
from .timesteps import MusubiTimestepDistributionPreview, MusubiTimestepSettings
from .train_lora import MusubiTrainLoRA
from .validation_data import MusubiValidationData
from .training_samples import MusubiTrainingSamples
from .train_settings import MusubiCheckpointSettings, MusubiLoRANetworkSettings, MusubiOptimizerSettings
from .train_settings import MusubiCompileSettings

NODES: list[type[io.ComfyNode]] = [
    MusubiLoadDiTFP8Scaled,
    MusubiLoadFramePack,
    MusubiLoadTextEmbedding,
    MusubiSaveTextEmbedding,
    MusubiPostHocEMAMerge,
    MusubiEMACandidates,
    MusubiTimestepSettings,
    MusubiTimestepDistributionPreview,
    MusubiTrainLoRA,
    MusubiValidationData,
    MusubiTrainingSamples,
    MusubiDataset,
    MusubiLoRANetworkSettings,
    MusubiOptimizerSettings,
    MusubiCheckpointSettings,
    MusubiCompileSettings,
    MusubiFramePackTrainingSettings,
    MusubiMagCacheSampler,
    MusubiCalibrateMagCache,
    MusubiMagCache,
    MusubiCompileModel,
    MusubiFramePackSampler,
    MusubiSaveImageEmbedding,
    MusubiLoadImageEmbedding,
]
for _node in NODES:
    refuse_non_finite_floats(_node)
del _node


class MusubiExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
