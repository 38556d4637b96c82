"""FramePack LoRA training on the tiny diffusers FramePack model: adapter inputs, layouts, checkpointing,
the command line, and the LoRA file key names."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

from musubi.cli import main
from musubi.errors import MusubiError
from musubi.framepack.adapter import FramePackAdapter, from_checkpoint, from_musubi_cache, training_items, write_training_items
from musubi.framepack.checkpoint import config_from_shapes
from musubi.framepack.loading import load_transformer
from musubi.data.latent_cache import LatentCacheDataset
from musubi.data.musubi_cache import open_cache_folder
from musubi.lora.formats import from_canonical, load_lora_state_dict, save_lora
from musubi.lora.network import LoRANetwork
from musubi.data.text_embeddings import TextEmbedding, save_text_embedding
from musubi.data.memory import InMemoryLatentDataset
from musubi.training.loop import Trainer
from musubi.training.settings import TrainSettings
from tiny_checkpoints import FRAMEPACK_TINY_CONFIG, tiny_state_dict, write_tiny_checkpoint

torch.set_num_threads(1)

# The LoRA targets of one block, written out from musubi-tuner's rule: every Linear of the block
# except the AdaLN modulation (norm1.linear, norm1_context.linear, norm.linear).
DOUBLE_BLOCK_LINEARS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
SINGLE_BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


def expected_modules(double: int, single: int) -> set[str]:
    return ({f"transformer_blocks.{i}.{name}" for i in range(double) for name in DOUBLE_BLOCK_LINEARS}
            | {f"single_transformer_blocks.{i}.{name}" for i in range(single) for name in SINGLE_BLOCK_LINEARS})


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return write_tiny_checkpoint("framepack", tmp_path_factory.mktemp("framepack") / "tiny_framepack.safetensors")


@pytest.fixture()
def adapter(tiny_file):
    return from_checkpoint(dit=str(tiny_file), dtype="float32")


def conditioning(seed: int = 0, tokens: int = 5):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, 4096, generator=generator), torch.randn(768, generator=generator), torch.randn(729, 1152, generator=generator)


def video(frames: int, seed: int = 1, size: int = 8):
    return torch.randn(16, frames, size, size, generator=torch.Generator().manual_seed(seed))


def batch_of(items):
    return LatentCacheDataset.collate(items)


# --- loading -----------------------------------------------------------------------------------------


def test_loader_reads_the_tiny_file_with_its_config(tiny_file):
    model = load_transformer(str(tiny_file), torch.float32)
    assert tuple(model.config.rope_axes_dim) == tuple(FRAMEPACK_TINY_CONFIG["rope_axes_dim"])
    assert len(model.transformer_blocks) == 2 and len(model.single_transformer_blocks) == 2
    reference = tiny_state_dict("framepack")
    state = model.state_dict()
    assert set(state) == set(reference)
    assert all(torch.equal(state[key], reference[key].float()) for key in reference)
    assert not any(param.requires_grad for param in model.parameters())


def test_config_is_recovered_from_shapes_of_a_real_shaped_file(tmp_path):
    from tiny_checkpoints import build_framepack_model

    # 128-wide heads as in the real model, everything else small.
    config = {**FRAMEPACK_TINY_CONFIG, "num_attention_heads": 1, "attention_head_dim": 128, "num_layers": 1,
              "num_single_layers": 3, "num_refiner_layers": 1, "text_embed_dim": 64, "pooled_projection_dim": 32,
              "image_proj_dim": 48, "rope_axes_dim": [16, 56, 56], "mlp_ratio": 2.0}
    model = build_framepack_model(config)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    recovered = config_from_shapes(state)
    assert {key: recovered[key] for key in config} == config
    # a single file without metadata loads through the recovered config; so does a diffusers folder
    save_file(state, str(tmp_path / "no_metadata.safetensors"))
    model.save_pretrained(str(tmp_path / "folder"))
    for path in (tmp_path / "no_metadata.safetensors", tmp_path / "folder"):
        loaded = load_transformer(str(path))
        assert all(torch.equal(loaded.state_dict()[key], state[key]) for key in state)
    # the tiny model's 32-wide heads do not say how they split over the rotary axes
    with pytest.raises(MusubiError, match="rotary split"):
        config_from_shapes(tiny_state_dict("framepack"))
    with pytest.raises(MusubiError, match="not a FramePack transformer"):
        config_from_shapes({"foo.weight": torch.zeros(1)})


def test_factory_errors(tiny_file, tmp_path):
    with pytest.raises(MusubiError, match="name the checkpoint"):
        from_checkpoint()
    with pytest.raises(MusubiError, match="dtype"):
        from_checkpoint(dit=str(tiny_file), dtype="int8")
    with pytest.raises(MusubiError, match="does not exist"):
        from_checkpoint(path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(MusubiError, match="HunyuanVideoFramepackTransformer3DModel"):
        FramePackAdapter(torch.nn.Linear(2, 2))


# --- what the model is given -------------------------------------------------------------------------


def test_model_gets_exact_timestep_guidance_and_one_dimensional_indices(adapter):
    context, pooled, image = conditioning()
    items = training_items(video(19), context, pooled, image, layout="f1")
    seen = {}
    handle = adapter.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        batch = batch_of(items)
        latents = batch.pop("latents")
        t = torch.tensor([0.25, 0.7])
        adapter.predict_velocity(latents, t, batch)
    finally:
        handle.remove()
    assert torch.equal(seen["timestep"], torch.tensor([250.0, 700.0]))  # exactly 1000·t, no +1
    assert torch.equal(seen["guidance"], torch.tensor([1000.0, 1000.0]))  # guidance 1.0 × 1000
    assert seen["indices_latents"].tolist() == list(range(20, 29))
    assert seen["indices_latents_clean"].tolist() == [0, 19]
    assert seen["indices_latents_history_2x"].tolist() == [17, 18]
    assert seen["indices_latents_history_4x"].tolist() == list(range(1, 17))
    assert torch.equal(seen["image_embeds"][1], image) and torch.equal(seen["pooled_projections"][0], pooled)
    assert seen["latents_history_4x"].shape == (2, 16, 16, 8, 8)


def test_batches_of_mixed_layouts_equal_items_run_alone(adapter):
    # vanilla sections of one video have different paddings (index layouts); F1 sections share one.
    for layout, frames in (("vanilla", 28), ("f1", 19)):
        items = []
        for number, item in enumerate(training_items(video(frames), *conditioning(), layout=layout)):
            context, _, _ = conditioning(seed=number, tokens=3 + 2 * number)  # contexts of different lengths
            items.append({**item, "context": context})
        batch = batch_of(items)
        latents = batch.pop("latents")
        t = torch.linspace(0.2, 0.8, len(items))
        with torch.no_grad():
            together = adapter.predict_velocity(latents, t, batch)
            for row, item in enumerate(items):
                alone_batch = batch_of([item])
                alone = adapter.predict_velocity(alone_batch.pop("latents"), t[row:row + 1], alone_batch)
                torch.testing.assert_close(together[row:row + 1], alone, rtol=1e-4, atol=1e-5)


def test_missing_conditioning_is_a_clear_error(adapter):
    item = training_items(video(10), *conditioning(), layout="vanilla")[0]
    del item["image_embeds"]
    batch = batch_of([item])
    with pytest.raises(MusubiError, match="image_embeds"):
        adapter.predict_velocity(batch.pop("latents"), torch.tensor([0.5]), batch)


def test_musubi_tuner_framepack_caches_become_training_items(adapter, tmp_path):
    # The keys musubi-tuner's fpack_cache_latents.py writes for one vanilla section (target 9x8x8, bf16).
    generator = torch.Generator().manual_seed(2)
    target = torch.randn(16, 9, 8, 8, generator=generator).bfloat16()
    cache = {
        "latents_9x8x8_bfloat16": target,
        "image_embeddings_bfloat16": torch.randn(729, 1152, generator=generator).bfloat16(),
        "latent_indices_int64": torch.arange(10, 19),
        "clean_latent_indices_int64": torch.tensor([0, 19]),
        "latents_clean_9x8x8_bfloat16": torch.randn(16, 2, 8, 8, generator=generator).bfloat16(),
        "clean_latent_2x_indices_int64": torch.tensor([20, 21]),
        "latents_clean_2x_9x8x8_bfloat16": torch.randn(16, 2, 8, 8, generator=generator).bfloat16(),
        "clean_latent_4x_indices_int64": torch.arange(22, 38),
        "latents_clean_4x_9x8x8_bfloat16": torch.randn(16, 16, 8, 8, generator=generator).bfloat16(),
    }
    item = from_musubi_cache(cache)
    assert torch.equal(item["latents"], target) and torch.equal(item["history_2x_latents"], cache["latents_clean_2x_9x8x8_bfloat16"])

    # The same cache in a musubi-tuner cache folder (with its text cache) reads as a training item.
    folder = tmp_path / "fp_cache"
    folder.mkdir()
    safetensors.torch.save_file(cache, folder / "clip_00000-009_0064x0064_fp.safetensors")
    context, pooled, _ = conditioning()
    save_text_embedding(folder / "clip_fp_te.safetensors", TextEmbedding(context=context, pooled=pooled, architecture="framepack", extra={}))
    dataset = open_cache_folder(folder)
    assert dataset.architecture == "framepack" and len(dataset) == 1
    from_folder = dataset[0]
    for key, value in item.items():
        assert torch.equal(from_folder[key], value), key
    assert torch.equal(from_folder["context"], context) and torch.equal(from_folder["pooled"], pooled)
    assert torch.equal(item["clean_latents"], cache["latents_clean_9x8x8_bfloat16"])
    assert item["history_4x_indices"].tolist() == list(range(22, 38)) and item["image_embeds"].shape == (729, 1152)
    context, pooled, _ = conditioning()
    batch = batch_of([{**item, "context": context, "pooled": pooled}])
    with torch.no_grad():
        assert torch.isfinite(adapter.predict_velocity(batch.pop("latents").float(), torch.tensor([0.5]), batch)).all()

    # one-frame caches keep only the 2x/4x indices: the history is zeros, as musubi-tuner's trainer fills it
    one_frame = {"latents_1x8x8_float32": torch.ones(16, 1, 8, 8), "image_embeddings_float32": torch.ones(729, 1152),
                 "latent_indices_int64": torch.tensor([9]), "clean_latent_indices_int64": torch.tensor([0, 10]),
                 "latents_clean_1x8x8_float32": torch.ones(16, 2, 8, 8),
                 "clean_latent_2x_indices_int64": torch.tensor([11, 12]), "clean_latent_4x_indices_int64": torch.arange(13, 29)}
    item = from_musubi_cache(one_frame)
    assert item["history_2x_latents"].shape == (16, 2, 8, 8) and item["history_4x_latents"].shape == (16, 16, 8, 8)
    assert item["history_2x_latents"].abs().sum() == 0 and item["history_4x_latents"].abs().sum() == 0
    del one_frame["clean_latent_2x_indices_int64"]
    with pytest.raises(MusubiError, match="one_frame_no_2x"):
        from_musubi_cache(one_frame)
    with pytest.raises(MusubiError, match="not a musubi-tuner FramePack latent cache"):
        from_musubi_cache({"latents_1x8x8_float32": torch.ones(16, 1, 8, 8)})


# --- training ------------------------------------------------------------------------------------------


def train(adapter, items, tmp_path, steps=3, **overrides):
    network = LoRANetwork(adapter.lora_root(), "framepack", network_dim=4, network_alpha=4.0)
    settings = TrainSettings(output_dir=str(tmp_path / "out"), max_train_steps=steps, learning_rate=1e-3, seed=0,
                             save_state=False, **overrides)
    try:
        result = Trainer(adapter, network, InMemoryLatentDataset(items, "framepack"), settings).train()
    finally:
        network.remove()
    return network, result


@pytest.mark.parametrize("layout,frames", [("vanilla", 19), ("f1", 19), ("one_frame", 2)])
def test_a_few_steps_train_the_lora(adapter, tmp_path, layout, frames):
    items = training_items(video(frames), *conditioning(), layout=layout)
    network, result = train(adapter, items, tmp_path, batch_size=2)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    state = network.state_dict()
    assert set(key.rsplit(".lora_", 1)[0] for key in state if ".lora_" in key) == expected_modules(2, 2)
    ups = [value for key, value in state.items() if key.endswith("lora_up.weight")]
    assert all(float(up.abs().max()) > 0 for up in ups), "every LoRA up-projection moved away from its zero init"
    assert os.path.isfile(result.final_lora_path)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(adapter):
    items = training_items(video(28), *conditioning(), layout="vanilla")[:2]
    batch = batch_of(items)
    latents = batch.pop("latents")
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.3, 0.6])
    noisy = (1 - t.view(-1, 1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1, 1) * noise
    network = LoRANetwork(adapter.lora_root(), "framepack", network_dim=4, network_alpha=4.0)
    try:
        with torch.no_grad():
            for key, param in network.named_parameters():
                if "lora_up" in key:
                    param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(key)))
        results = []
        for enabled in (False, True):
            adapter.set_gradient_checkpointing(enabled)
            network.zero_grad()
            loss = torch.nn.functional.mse_loss(adapter.predict_velocity(noisy, t, batch), adapter.velocity_target(latents, noise))
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in network.parameters()]))
        assert adapter.transformer.gradient_checkpointing
    finally:
        adapter.set_gradient_checkpointing(False)
        network.remove()
    (loss_off, grads_off), (loss_on, grads_on) = results
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=1e-7)
    for on, off in zip(grads_on, grads_off):
        torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-7)


def test_cli_trains_from_a_tiny_checkpoint_file(tiny_file, tmp_path, capsys):
    context, pooled, image = conditioning()
    paths = write_training_items(tmp_path / "data", "clip", video(19), context, pooled, image, layout="f1")
    paths += write_training_items(tmp_path / "data", "still", video(2, seed=5), context[:3], pooled, image, layout="one_frame")
    assert [os.path.basename(p) for p in paths] == ["clip_0000.safetensors", "clip_0001.safetensors", "still_0000.safetensors"]
    config = tmp_path / "framepack.toml"
    config.write_text(textwrap.dedent(f"""
        model = "musubi.framepack.adapter:from_checkpoint"
        dit = {json.dumps(str(tiny_file))}
        data_dir = {json.dumps(str(tmp_path / "data"))}
        network_dim = 4
        learning_rate = 1e-3
        max_train_steps = 2
        batch_size = 2
        seed = 1
        save_state = false
        output_dir = {json.dumps(str(tmp_path / "out"))}
        output_name = "fp"
        lora_format = "musubi"
        [model_args]
        dtype = "float32"
    """))
    assert main(["train", "--config_file", str(config)]) == 0
    assert "Done: 2 steps" in capsys.readouterr().out
    tensors, metadata, layout = load_lora_state_dict(str(tmp_path / "out" / "fp.safetensors"))
    assert layout == "musubi"
    assert metadata["ss_base_model_version"] == "framepack" and metadata["ss_network_module"] == "networks.lora_framepack"
    names = {key.split(".")[0] for key in tensors}
    assert names == {"lora_unet_" + module.replace(".", "_") for module in expected_modules(2, 2)}


# --- LoRA files ------------------------------------------------------------------------------------------


def test_real_model_gets_440_lora_modules():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    with torch.device("meta"):
        model = HunyuanVideoFramepackTransformer3DModel(has_image_proj=True, has_clean_x_embedder=True)
    network = LoRANetwork(model, "framepack", network_dim=4)
    try:
        assert len(network.module_names()) == 440
        assert set(network.module_names()) == expected_modules(20, 40)
    finally:
        network.remove()


def test_lora_files_in_comfyui_and_musubi_layouts(adapter, tmp_path):
    network = LoRANetwork(adapter.lora_root(), "framepack", network_dim=4, network_alpha=2.0)
    try:
        with torch.no_grad():
            for param in network.parameters():
                param.normal_(generator=torch.Generator().manual_seed(param.numel()))
        state = network.state_dict()
        comfy = from_canonical(state, "comfyui", "framepack")
        musubi = from_canonical(state, "musubi", "framepack")
        modules = expected_modules(2, 2)
        assert set(comfy) == {f"diffusion_model.{m}.{s}" for m in modules for s in ("lora_up.weight", "lora_down.weight", "alpha")}
        assert set(musubi) == {f"lora_unet_{m.replace('.', '_')}.{s}" for m in modules
                               for s in ("lora_up.weight", "lora_down.weight", "alpha")}
        assert torch.equal(musubi["lora_unet_transformer_blocks_1_ff_context_net_0_proj.lora_up.weight"],
                           state["transformer_blocks.1.ff_context.net.0.proj.lora_up.weight"])
        # both files load back into the network (musubi's underscored names resolve to the right modules)
        for file_format in ("comfyui", "musubi"):
            path = tmp_path / f"{file_format}.safetensors"
            save_lora(network, str(path), format=file_format)
            fresh = LoRANetwork(adapter.lora_root(), "framepack", network_dim=4, network_alpha=2.0)
            try:
                fresh.load_weights(str(path))
                for key, value in fresh.state_dict().items():
                    assert torch.equal(value, state[key]), (file_format, key)
            finally:
                fresh.remove()
    finally:
        network.remove()
