"""Training Dataset (images/videos): a folder or a musubi-tuner dataset TOML becomes Train LoRA's data.

Items are encoded once with the graph's own VAE and text encoder (ComfyUI's VAE Encode and
CLIP Text Encode paths) and cached on disk in musubi-tuner's layout; later runs read the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch
from comfy_api.latest import io, ui

from ..musubi.architectures import COMFYUI_NATIVE
from ..musubi.data.buckets import parse_resolution
from ..musubi.data.cache import CachedDataset, Encoders, build_cache
from ..musubi.data.config import DatasetSpec, load_dataset_config
from ..musubi.data.plan import VIDEO_ARCHITECTURES, plan_items
from ..musubi.errors import MusubiError
from ..musubi.files import is_inside
from ..musubi.data.frames import MODES, normalize_target_frames
from ..musubi.data.media import is_image_file, is_video_file
from ..musubi.data.pixels import first_frame_video
from ..musubi.data.text_embeddings import TextEmbedding, validate_for_architecture
from .paths import folder_inside
from .train_settings import DatasetType

NODE = "Training Dataset (images/videos)"
ARCHITECTURES = list(COMFYUI_NATIVE)
CACHE_ROOT = "musubi_dataset_cache"  # inside ComfyUI's output folder
WAN_TEXT_LENGTH = 512


class MusubiDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MusubiDataset",
            display_name=NODE,
            category="musubi/training",
            description="Images and/or videos with captions (a folder, or a musubi-tuner dataset TOML) as training data for Train LoRA: bucketed by aspect ratio, videos cut into frame windows, encoded once with your VAE and text encoder and cached on disk (musubi-tuner's cache layout); unchanged items are read from the cache next time.",
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.String.Input("source", default="training_data",
                                tooltip="A folder of images/videos with caption files (relative to ComfyUI's input folder, or absolute), or a musubi-tuner dataset .toml/.json file (its own settings then replace the options below)."),
                io.Combo.Input("architecture", options=ARCHITECTURES, default="wan",
                               tooltip="The model family you train; decides cache names, frame rounding and the conditioning layout."),
                io.Vae.Input("vae", optional=True, tooltip="The model's VAE (core Load VAE). Needed unless every item is already cached."),
                io.Clip.Input("clip", optional=True, tooltip="The text encoder (core Load CLIP). Needed unless every caption is already cached."),
                io.Int.Input("width", default=960, min=16, max=8192, step=16, tooltip="Training resolution width (the bucket area is width × height)."),
                io.Int.Input("height", default=544, min=16, max=8192, step=16, tooltip="Training resolution height."),
                io.Boolean.Input("enable_bucket", default=True,
                                 tooltip="Group items by aspect ratio into buckets of about the same area (off: every item is resized and cropped to width × height)."),
                io.Boolean.Input("bucket_no_upscale", default=False, tooltip="Items smaller than the area keep their own size (floored to multiples of 16)."),
                io.Int.Input("num_repeats", default=1, min=1, max=10000, tooltip="How often each item appears per epoch."),
                io.String.Input("caption_extension", default=".txt", tooltip="Caption file of photo.png is photo<extension>."),
                io.String.Input("target_frames", default="1, 25, 45",
                                tooltip="Video item lengths in frames (rounded down to 4k+1), comma separated."),
                io.Combo.Input("frame_extraction", options=list(MODES), default="head",
                               tooltip="head: first frames; chunk: consecutive windows; slide: windows every frame_stride; uniform: frame_sample windows spread over the video; full: the whole video up to max_frames."),
                io.Int.Input("frame_stride", default=10, min=1, max=10000, tooltip="slide: frames between window starts."),
                io.Int.Input("frame_sample", default=1, min=1, max=1000, tooltip="uniform: windows per video."),
                io.Int.Input("max_frames", default=129, min=1, max=10000, tooltip="full: the most frames per video."),
                io.String.Input("cache_folder", default="",
                                tooltip="Where the encoded items go: a folder inside ComfyUI's output folder (sub-folders allowed; no '..' or absolute paths). Empty: output/musubi_dataset_cache/<folder name>_<hash>. TOML sources use their own cache_directory entries, which must lie inside ComfyUI's output or input folder."),
                io.Boolean.Input("reencode", default=False, tooltip="Encode every item again even when its cache is valid."),
                io.Boolean.Input("image_to_video", default=False,
                                 tooltip="Wan image-to-video models: each item is conditioned on its first frame (concat latent and mask, as core WanImageToVideo), plus CLIP-vision of that frame when clip_vision is connected."),
                io.String.Input("control_folder", default="", optional=True,
                                tooltip="FLUX.1 Kontext / Qwen-Image-Edit: folder of control (reference) images, <name>.png or <name>_0.png, <name>_1.png … for each training image <name> (relative to ComfyUI's input folder, or absolute). They reach the model as reference_latents, like core ReferenceLatent."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Wan 2.1 I2V: the CLIP-vision model (core Load CLIP Vision); its output of each item's first frame (center crop, as CLIP Vision Encode) conditions the item."),
            ],
            outputs=[
                DatasetType.Output("dataset", tooltip="Connect to Train LoRA's dataset input."),
                io.String.Output("report", tooltip="Items, buckets and what was encoded or reused."),
            ],
        )

    @classmethod
    def execute(cls, source, architecture, width, height, enable_bucket, bucket_no_upscale, num_repeats,
                caption_extension, target_frames, frame_extraction, frame_stride, frame_sample, max_frames,
                cache_folder, reencode, image_to_video=False, control_folder="", vae=None, clip=None,
                clip_vision=None) -> io.NodeOutput:
        specs = dataset_specs(source, width, height, enable_bucket, bucket_no_upscale, num_repeats, caption_extension,
                              target_frames, frame_extraction, frame_stride, frame_sample, max_frames, cache_folder,
                              architecture, control_folder)
        items = plan_items(specs, architecture, where=NODE)
        if image_to_video and architecture != "wan":
            raise MusubiError(f"{NODE}: image_to_video is for Wan image-to-video models; turn it off for {architecture}.")
        if clip_vision is not None and not image_to_video:
            raise MusubiError(f"{NODE}: clip_vision is connected but image_to_video is off; turn it on (Wan 2.1 I2V) or disconnect it.")
        encoders = make_encoders(vae, clip, architecture, clip_vision if image_to_video else None, image_to_video)
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            import comfy.model_management
            import comfy.utils

            comfy.model_management.throw_exception_if_processing_interrupted()
            if total == 0:
                return
            if bar is None:
                bar = comfy.utils.ProgressBar(total, node_id=cls.hidden.unique_id)
            bar.update_absolute(done, total)

        cached, report = build_cache(items, architecture, encoders, reencode=reencode, progress=progress, where=NODE)
        data = ComfyTrainingData(CachedDataset(cached, architecture), architecture)
        buckets: dict[tuple, int] = {}
        for index in range(len(data)):
            buckets[data.latent_shape(index)] = buckets.get(data.latent_shape(index), 0) + 1
        listing = ", ".join(f"{'x'.join(map(str, shape[1:]))}: {count}" for shape, count in sorted(buckets.items()))
        text = (f"{len(cached)} items ({len(data)} with repeats) in {len(buckets)} bucket(s) of latent size {listing}; "
                f"{report.describe()}. Cache: {', '.join(sorted({spec.cache_folder for spec in specs}))}")
        logging.info("%s: %s", NODE, text)
        return io.NodeOutput(data, text, ui=ui.PreviewText(text))

    @classmethod
    def fingerprint_inputs(cls, source, architecture, width, height, enable_bucket, bucket_no_upscale, num_repeats,
                           caption_extension, target_frames, frame_extraction, frame_stride, frame_sample, max_frames,
                           cache_folder, control_folder="", **_):
        """Run again when a file of the dataset changes (ComfyUI would otherwise reuse the last
        output). Cache files are left out: writing them must not make Train LoRA train again."""
        try:
            specs = dataset_specs(source, width, height, enable_bucket, bucket_no_upscale, num_repeats, caption_extension,
                                  target_frames, frame_extraction, frame_stride, frame_sample, max_frames, cache_folder,
                                  architecture, control_folder)
            path = resolve_source(source)
        except MusubiError:
            return float("nan")  # execute reports the problem
        digest = hashlib.sha256()
        if os.path.isfile(path):
            with open(path, "rb") as file:
                digest.update(file.read())
        folders = {folder for spec in specs for folder in (spec.directory, spec.jsonl_file and os.path.dirname(spec.jsonl_file),
                                                            spec.control_directory) if folder}
        for folder in sorted(folders):
            if not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(folder)):
                if name.startswith(".") or name.endswith(".safetensors"):
                    continue
                try:
                    stat = os.stat(os.path.join(folder, name))
                except OSError:
                    continue
                digest.update(f"{folder}/{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        return digest.hexdigest()


def resolve_source(source: str) -> str:
    import folder_paths

    text = source.strip()
    if not text:
        raise MusubiError(f"{NODE}: source is empty; give a folder of images/videos or a dataset .toml file.")
    path = os.path.expanduser(text)
    if not os.path.isabs(path):
        path = os.path.join(folder_paths.get_input_directory(), path)
    if not os.path.exists(path):
        raise MusubiError(f"{NODE}: {path} does not exist; give a folder (relative to ComfyUI's input folder, or absolute) or a dataset .toml file.")
    return os.path.normpath(path)


def dataset_specs(source, width, height, enable_bucket, bucket_no_upscale, num_repeats, caption_extension,
                  target_frames, frame_extraction, frame_stride, frame_sample, max_frames, cache_folder,
                  architecture, control_folder: str = "") -> list[DatasetSpec]:
    """The TOML's datasets, or one image and/or one video dataset over the folder."""
    import folder_paths

    path = resolve_source(source)
    if os.path.isfile(path):
        if not path.lower().endswith((".toml", ".json")):
            raise MusubiError(f"{NODE}: {path} is a file but not a dataset .toml/.json; give a folder or a dataset config.")
        return check_config_caches(load_dataset_config(path), path)
    controls = None
    if control_folder.strip():
        controls = os.path.expanduser(control_folder.strip())
        if not os.path.isabs(controls):
            controls = os.path.join(folder_paths.get_input_directory(), controls)
        if not os.path.isdir(controls):
            raise MusubiError(f"{NODE}: control_folder {controls} does not exist.")
    if cache_folder.strip():
        cache = folder_inside(NODE, "cache_folder", folder_paths.get_output_directory(), cache_folder,
                              example=f"{CACHE_ROOT}/my_dataset")
    else:
        tag = hashlib.sha256(path.encode()).hexdigest()[:8]
        label = os.path.basename(path)
        if len(label.encode("utf-8")) > 200:  # the folder name must stay within the file system's 255 bytes
            label = label[:50]
        cache = os.path.join(folder_paths.get_output_directory(), CACHE_ROOT, f"{label}_{tag}")
    try:
        frames = [int(part) for part in target_frames.replace(";", ",").split(",") if part.strip()]
    except ValueError as error:
        raise MusubiError(f"{NODE}: target_frames {target_frames!r} must be whole numbers separated by commas, e.g. 1, 25, 45.") from error
    common = dict(directory=path, caption_extension=caption_extension.strip() or ".txt",
                  resolution=parse_resolution([width, height], f"{NODE}: width/height"), num_repeats=num_repeats,
                  enable_bucket=enable_bucket, bucket_no_upscale=bucket_no_upscale, cache_directory=cache)
    names = os.listdir(path)
    specs = []
    if any(is_image_file(name) for name in names):
        specs.append(DatasetSpec(kind="image", control_directory=controls, **common))
    videos = [name for name in names if is_video_file(name) and not is_image_file(name)]
    if videos:
        if architecture not in VIDEO_ARCHITECTURES:
            raise MusubiError(f"{NODE}: {path} holds videos ({', '.join(videos[:5])}), but {architecture} trains on images only; remove them.")
        specs.append(DatasetSpec(kind="video", target_frames=tuple(normalize_target_frames(frames)),
                                 frame_extraction=frame_extraction, frame_stride=frame_stride, frame_sample=frame_sample,
                                 max_frames=max_frames, **common))
    if not specs:
        raise MusubiError(f"{NODE}: the folder {path} holds no images or videos; put the training files (with caption files) there.")
    return specs


def check_config_caches(specs: list[DatasetSpec], config: str) -> list[DatasetSpec]:
    """A dataset TOML's caches must lie inside ComfyUI's output or input folder.

    A TOML can be uploaded by any API client, so its ``cache_directory`` (or, without one, the
    image/video folder, musubi-tuner's default place for caches) could otherwise point the node's
    writes anywhere on the server. Paths are compared as written (resolved against the TOML's
    folder), so folders the machine's owner linked in from elsewhere stay usable.
    """
    import folder_paths

    roots = {"output": folder_paths.get_output_directory(), "input": folder_paths.get_input_directory()}
    for index, spec in enumerate(specs, 1):
        cache = spec.cache_folder
        if any(is_inside(cache, root) for root in roots.values()):
            continue
        given = "its cache_directory" if spec.cache_directory else f"its {spec.kind} folder (no cache_directory given)"
        raise MusubiError(
            f"{NODE}: {config} [[datasets]] #{index} caches into {cache} ({given}), outside ComfyUI's output folder "
            f"({roots['output']}) and input folder ({roots['input']}). The node writes only inside ComfyUI's folders, "
            "since a dataset TOML can come from any API client: set cache_directory to a folder inside one of them, "
            f"e.g. cache_directory = \"{os.path.join(roots['output'], CACHE_ROOT, 'my_dataset')}\"."
        )
    return specs


# --- encoders from ComfyUI objects ----------------------------------------------------------------

def latent_format(architecture: str, channels: int):
    import comfy.latent_formats as formats

    if architecture in ("wan", "qwen_image"):
        return formats.Wan22() if channels == 48 else formats.Wan21()
    if architecture == "hunyuan_video":
        return formats.HunyuanVideo()
    return formats.Flux()


def to_model_space(latent: torch.Tensor, architecture: str) -> torch.Tensor:
    return latent_format(architecture, latent.shape[0]).process_in(latent.unsqueeze(0).float())[0]


def to_vae_space(latent: torch.Tensor, architecture: str) -> torch.Tensor:
    return latent_format(architecture, latent.shape[0]).process_out(latent.unsqueeze(0).float())[0]


def make_encoders(vae, clip, architecture: str, clip_vision=None, image_to_video: bool = False) -> Encoders:
    encoders = Encoders(to_model_space=lambda latent: to_model_space(latent, architecture))
    if image_to_video:
        encoders.image_condition_id = "wan-i2v-first-frame"
    if vae is not None:
        encoders.encode_pixels = lambda pixels: vae.encode(pixels)[0]
        encoders.vae_id = weights_fingerprint(vae.first_stage_model, type(vae.first_stage_model).__name__)
        if image_to_video:
            encoders.encode_image_condition = lambda pixels: image_condition(vae, clip_vision, pixels, architecture)
    if clip_vision is not None:
        encoders.image_condition_id += "+clip:" + weights_fingerprint(clip_vision.model, type(clip_vision.model).__name__)
    if clip is not None:
        encoders.encode_text = lambda caption: encode_caption(clip, caption, architecture)
        # A LoRA on the text encoder changes its output: its patches count (by their identity; the
        # same LoRA loaded again after a restart re-encodes once).
        patches = f"{len(clip.patcher.patches)}:{clip.patcher.patches_uuid}" if clip.patcher.patches else "none"
        encoders.text_encoder_id = weights_fingerprint(
            clip.cond_stage_model, f"{type(clip.cond_stage_model).__name__}|{type(clip.tokenizer).__name__}|"
                                   f"layer={clip.layer_idx}|patches={patches}")
    return encoders


def image_condition(vae, clip_vision, pixels: torch.Tensor, architecture: str) -> dict[str, torch.Tensor]:
    """Core WanImageToVideo's concat latent (first frame, then gray) with its mask, stored as
    musubi-tuner stores it (``[4 mask + C, F, H, W]``, model space), and CLIP Vision Encode's
    penultimate states of the first frame."""
    latent = to_model_space(vae.encode(first_frame_video(pixels))[0].float().cpu(), architecture)
    given = torch.zeros((4, *latent.shape[1:]))
    given[:, :1] = 1.0  # musubi-tuner's layout: 4 mask channels (1 = the frame is given), then the latent
    result = {"latents_image": torch.cat([given, latent])}
    if clip_vision is not None:
        output = clip_vision.encode_image(pixels[:1], crop=True)
        result["clip"] = output.penultimate_hidden_states[0].float().cpu()
    return result


def encode_caption(clip, caption: str, architecture: str) -> TextEmbedding:
    """CLIP Text Encode's own path (tokenize + encode_from_tokens_scheduled), one caption."""
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
    context, options = conditioning[0]
    context = context[0]
    mask = options.get("attention_mask")
    if mask is not None and mask.shape[-1] == context.shape[0]:
        context = context[mask.reshape(-1).bool()]
    pooled = options.get("pooled_output")
    embedding = TextEmbedding(context.detach().cpu(), None if pooled is None else pooled[0].detach().cpu(), architecture, {},
                              source=f"{NODE}: the text encoder output")
    validate_for_architecture(embedding, architecture)
    return embedding


def weights_fingerprint(module: torch.nn.Module, label: str) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and a strided sample of values."""
    digest = hashlib.sha256(label.encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        if tensor.numel() and tensor.device.type != "meta":
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


class ComfyTrainingData:
    """Train LoRA's view of a cached dataset: VAE-space latents and per-item CONDITIONING, read on demand."""

    def __init__(self, cached: CachedDataset, architecture: str):
        self.cached = cached
        self.architecture = architecture

    def __len__(self) -> int:
        return len(self.cached)

    def latent_shape(self, index: int) -> tuple[int, ...]:
        return tuple(self.cached.latent_shape(index))

    def latent(self, index: int) -> torch.Tensor:
        return to_vae_space(self.cached.model_latent(index), self.architecture)

    def conditioning(self, index: int) -> list:
        text = self.cached.text(index)
        options: dict = {}
        if text.pooled is not None:
            options["pooled_output"] = text.pooled.unsqueeze(0).float()
        image = self.cached.model_image_condition(index)
        if "latents_image" in image:
            given, latent = image["latents_image"][:4].float(), image["latents_image"][4:]
            options["concat_latent_image"] = to_vae_space(latent, self.architecture).unsqueeze(0)
            # core WanImageToVideo's concat_mask: 0 where a frame is given
            options["concat_mask"] = (1.0 - given[:1]).unsqueeze(0)
        if "clip" in image:
            import comfy.clip_vision

            output = comfy.clip_vision.Output()
            output.penultimate_hidden_states = image["clip"].unsqueeze(0).float()
            options["clip_vision_output"] = output
        references = [to_vae_space(control, self.architecture).unsqueeze(0) for control in self.cached.model_controls(index)]
        if references:
            if self.architecture == "qwen_image" and references[0].dim() == 4:
                references = [reference.unsqueeze(2) for reference in references]
            options["reference_latents"] = references
        context = text.context.float()
        if self.architecture == "wan" and context.shape[0] < WAN_TEXT_LENGTH:
            # ComfyUI's Wan text encoder gives 512 tokens, zero past the caption (musubi's model pads the same way).
            context = torch.cat([context, context.new_zeros(WAN_TEXT_LENGTH - context.shape[0], context.shape[1])])
        return [[context.unsqueeze(0), options]]
