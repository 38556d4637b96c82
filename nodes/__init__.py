"""Thin ComfyUI V3 nodes over the ``musubi`` library (no algorithms here)."""

from comfy_api.latest import ComfyExtension, io

from .ema_merge import MusubiPostHocEMAMerge
from .load_dit_fp8 import MusubiLoadDiTFP8Scaled
from .magcache import MusubiCalibrateMagCache, MusubiMagCache, MusubiMagCacheSampler
from .text_embeddings import MusubiLoadTextEmbedding, MusubiSaveTextEmbedding
from .timesteps import MusubiTimestepDistributionPreview, MusubiTimestepSettings
from .train_lora import MusubiTrainLoRA
from .train_settings import MusubiCheckpointSettings, MusubiLoRANetworkSettings, MusubiOptimizerSettings

NODES: list[type[io.ComfyNode]] = [
    MusubiLoadDiTFP8Scaled,
    MusubiLoadTextEmbedding,
    MusubiSaveTextEmbedding,
    MusubiPostHocEMAMerge,
    MusubiTimestepSettings,
    MusubiTimestepDistributionPreview,
    MusubiTrainLoRA,
    MusubiLoRANetworkSettings,
    MusubiOptimizerSettings,
    MusubiCheckpointSettings,
    MusubiMagCacheSampler,
    MusubiCalibrateMagCache,
    MusubiMagCache,
]


class MusubiExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
