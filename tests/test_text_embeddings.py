"""Text-encoder output caches: musubi-tuner's *_te.safetensors layouts, both ways.

The musubi-tuner layouts below were learned from kohya-ss/musubi-tuner
(src/musubi_tuner/dataset/cache_io.py `save_text_encoder_output_cache*`, the
`*_cache_text_encoder_outputs.py` scripts, hunyuan_model/text_encoder.py, frame_pack/hunyuan.py and
frame_pack/utils.py `crop_or_pad_yield_mask`): keys are `<stem>_<torch dtype name>`, masks carry no
dtype suffix, metadata is {"architecture", "caption1", "format_version": "1.0.1"}.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from musubi.errors import MusubiError
from musubi.data.text_embeddings import (
    ARCHITECTURES,
    TextEmbedding,
    expected_widths,
    load_text_embedding,
    load_text_embeddings,
    save_text_embedding,
    validate_for_architecture,
)

torch.set_num_threads(1)

WIDTHS = {  # (context, pooled) of each model's text conditioning
    "wan": (4096, None),
    "hunyuan_video": (4096, 768),
    "framepack": (4096, 768),
    "flux": (4096, 768),
    "qwen_image": (3584, None),
}

TOKENS = 7
# What musubi-tuner's caching scripts write for a 7-token float16 prompt: key -> (shape, dtype).
MUSUBI_KEYS = {
    "wan": {"varlen_t5_float16": ((TOKENS, 4096), torch.float16)},
    "hunyuan_video": {
        "llm_float16": ((256, 4096), torch.float16),
        "llm_mask": ((256,), torch.int64),
        "clipL_float16": ((768,), torch.float16),
    },
    "framepack": {
        "llama_vec_float16": ((512, 4096), torch.float16),
        "llama_attention_mask": ((512,), torch.bool),
        "clip_l_pooler_float16": ((768,), torch.float16),
    },
    "flux": {"t5_vec_float16": ((TOKENS, 4096), torch.float16), "clip_l_pooler_float16": ((768,), torch.float16)},
    "qwen_image": {"varlen_vl_embed_float16": ((TOKENS, 3584), torch.float16)},
}
MUSUBI_ARCHITECTURE_NAMES = {
    "wan": "wan", "hunyuan_video": "hunyuan_video", "framepack": "framepack",
    "flux": "flux_kontext", "qwen_image": "qwen_image",
}


def random(*shape, dtype=torch.float16, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def read_raw(path):
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()


def write_musubi_cache(path, tensors, architecture, caption="a cat on a mat"):
    metadata = {"caption1": caption, "format_version": "1.0.1"}
    if architecture is not None:
        metadata["architecture"] = architecture
    save_file(tensors, str(path), metadata=metadata)
    return path


# --- widths --------------------------------------------------------------------------------

def test_expected_widths_of_every_architecture():
    assert set(ARCHITECTURES) == set(WIDTHS)
    for architecture, widths in WIDTHS.items():
        assert expected_widths(architecture) == widths


def test_expected_widths_of_unknown_architecture_lists_the_known_ones():
    with pytest.raises(MusubiError, match="sdxl.*wan, hunyuan_video"):
        expected_widths("sdxl")


# --- round trips in musubi-tuner's layout -----------------------------------------------------

@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_round_trip_writes_musubi_layout_and_reads_back_identically(tmp_path, architecture):
    context_width, pooled_width = WIDTHS[architecture]
    context = random(TOKENS, context_width, seed=1)
    pooled = None if pooled_width is None else random(pooled_width, seed=2)
    path = tmp_path / f"item_{architecture}_te.safetensors"

    save_text_embedding(path, TextEmbedding(context, pooled, architecture), caption="a cat on a mat")

    tensors, metadata = read_raw(path)
    assert {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()} == MUSUBI_KEYS[architecture]
    assert metadata == {
        "architecture": MUSUBI_ARCHITECTURE_NAMES[architecture],
        "caption1": "a cat on a mat",
        "format_version": "1.0.1",
    }
    for mask_key in ("llm_mask", "llama_attention_mask"):
        if mask_key in tensors:
            mask = tensors[mask_key]
            assert mask[:TOKENS].all() and not mask[TOKENS:].any()
            padded = next(t for key, t in tensors.items() if t.dim() == 2)
            assert torch.equal(padded[:TOKENS], context) and not padded[TOKENS:].any()

    loaded = load_text_embedding(path)
    assert loaded.architecture == architecture
    assert loaded.context.dtype == torch.float16 and torch.equal(loaded.context, context)
    if pooled is None:
        assert loaded.pooled is None
    else:
        assert torch.equal(loaded.pooled, pooled)
    assert loaded.extra["caption"] == "a cat on a mat"
    assert loaded.source == str(path)


def test_caption_defaults_to_the_embeddings_own(tmp_path):
    path = tmp_path / "wan.safetensors"
    save_text_embedding(path, TextEmbedding(random(3, 4096), None, "wan", {"caption": "from extra"}))
    assert read_raw(path)[1]["caption1"] == "from extra"
    assert load_text_embedding(path).extra == {"caption": "from extra"}


def test_plain_layout_without_architecture_round_trips(tmp_path):
    context, pooled = random(5, 32, dtype=torch.float32), random(8, dtype=torch.float32, seed=3)
    path = tmp_path / "plain.safetensors"
    save_text_embedding(path, TextEmbedding(context, pooled, None), caption="x")
    tensors, metadata = read_raw(path)
    assert set(tensors) == {"context", "pooled"} and metadata == {"caption1": "x"}
    loaded = load_text_embedding(path)
    assert loaded.architecture is None
    assert torch.equal(loaded.context, context) and torch.equal(loaded.pooled, pooled)


def test_hunyuan_context_longer_than_musubis_256_tokens_is_kept_whole(tmp_path):
    context = random(300, 4096)
    path = tmp_path / "long.safetensors"
    save_text_embedding(path, TextEmbedding(context, random(768, seed=1), "hunyuan_video"))
    tensors, _ = read_raw(path)
    assert tensors["llm_float16"].shape == (300, 4096) and tensors["llm_mask"].sum() == 300
    assert torch.equal(load_text_embedding(path).context, context)


def test_pooled_output_is_dropped_where_the_model_takes_none(tmp_path):
    path = tmp_path / "wan.safetensors"
    save_text_embedding(path, TextEmbedding(random(4, 4096), random(768, seed=1), "wan"))
    assert set(read_raw(path)[0]) == {"varlen_t5_float16"}
    assert load_text_embedding(path).pooled is None


def test_save_is_atomic_overwrites_and_creates_folders(tmp_path):
    path = tmp_path / "new" / "folder" / "p.safetensors"
    save_text_embedding(path, TextEmbedding(random(4, 3584), None, "qwen_image"))
    save_text_embedding(path, TextEmbedding(random(6, 3584, seed=5), None, "qwen_image"))
    assert os.listdir(path.parent) == ["p.safetensors"]  # no temporary file left behind
    assert torch.equal(load_text_embedding(path).context, random(6, 3584, seed=5))


# --- files exactly as musubi-tuner writes them ------------------------------------------------

def test_loads_musubi_wan_cache(tmp_path):
    t5 = random(5, 4096, dtype=torch.bfloat16)
    path = write_musubi_cache(tmp_path / "img_wan_te.safetensors", {"varlen_t5_bfloat16": t5}, "wan")
    loaded = load_text_embedding(path)
    assert loaded.architecture == "wan" and loaded.pooled is None
    assert loaded.context.dtype == torch.bfloat16 and torch.equal(loaded.context, t5)
    assert loaded.extra["caption"] == "a cat on a mat"


def test_loads_musubi_hunyuan_video_cache_keeping_only_valid_tokens(tmp_path):
    # Two passes of hv caching: LLM states padded to 256 (pad positions hold real LLM outputs, masked),
    # then CLIP-L pooled output with its 77-token mask.
    llm = random(256, 4096, seed=1)
    mask = torch.zeros(256, dtype=torch.int64)
    mask[:9] = 1
    clip = random(768, seed=2)
    clip_mask = torch.zeros(77, dtype=torch.int64)
    clip_mask[:5] = 1
    path = write_musubi_cache(
        tmp_path / "v_00000-017_hv_te.safetensors",
        {"llm_float16": llm, "llm_mask": mask, "clipL_float16": clip, "clipL_mask": clip_mask},
        "hunyuan_video",
    )
    loaded = load_text_embedding(path)
    assert loaded.architecture == "hunyuan_video"
    assert torch.equal(loaded.context, llm[:9])
    assert torch.equal(loaded.pooled, clip)


def test_mask_selects_tokens_by_position(tmp_path):
    llm = random(256, 4096, seed=1)
    mask = torch.zeros(256, dtype=torch.int64)
    mask[[0, 2, 3]] = 1
    path = write_musubi_cache(
        tmp_path / "x_hv_te.safetensors", {"llm_float16": llm, "llm_mask": mask, "clipL_float16": random(768)}, "hunyuan_video"
    )
    assert torch.equal(load_text_embedding(path).context, torch.stack([llm[0], llm[2], llm[3]]))


def test_loads_musubi_framepack_cache(tmp_path):
    llama = torch.zeros(512, 4096, dtype=torch.float16)
    llama[:12] = random(12, 4096, seed=4)
    mask = torch.zeros(512, dtype=torch.bool)
    mask[:12] = True
    pooler = random(768, seed=5)
    path = write_musubi_cache(
        tmp_path / "a_fp_te.safetensors",
        {"llama_vec_float16": llama, "llama_attention_mask": mask, "clip_l_pooler_float16": pooler},
        "framepack",
    )
    loaded = load_text_embedding(path)
    assert loaded.architecture == "framepack"
    assert loaded.context.shape == (12, 4096) and torch.equal(loaded.context, llama[:12])
    assert torch.equal(loaded.pooled, pooler)


def test_loads_musubi_flux_kontext_cache_with_all_512_tokens(tmp_path):
    # FLUX attends to T5 padding tokens too, so nothing is removed.
    t5 = random(512, 4096, dtype=torch.bfloat16, seed=6)
    pooler = random(768, dtype=torch.bfloat16, seed=7)
    path = write_musubi_cache(
        tmp_path / "a_fk_te.safetensors", {"t5_vec_bfloat16": t5, "clip_l_pooler_bfloat16": pooler}, "flux_kontext"
    )
    loaded = load_text_embedding(path)
    assert loaded.architecture == "flux"
    assert torch.equal(loaded.context, t5) and torch.equal(loaded.pooled, pooler)


@pytest.mark.parametrize("musubi_name", ["qwen_image", "qwen_image_edit"])
def test_loads_musubi_qwen_image_cache(tmp_path, musubi_name):
    embed = random(11, 3584, dtype=torch.bfloat16, seed=8)
    path = write_musubi_cache(tmp_path / "a_qie_te.safetensors", {"varlen_vl_embed_bfloat16": embed}, musubi_name)
    loaded = load_text_embedding(path)
    assert loaded.architecture == "qwen_image" and loaded.pooled is None
    assert torch.equal(loaded.context, embed)


def test_layout_is_recognised_from_keys_when_metadata_is_missing(tmp_path):
    t5 = random(512, 4096, seed=6)
    path = tmp_path / "bare.safetensors"
    save_file({"t5_vec_float16": t5, "clip_l_pooler_float16": random(768)}, str(path))
    loaded = load_text_embedding(path)
    assert loaded.architecture == "flux" and "caption" not in loaded.extra


def test_float8_states_are_widened_so_models_can_use_them(tmp_path):
    t5 = random(4, 4096, dtype=torch.float32).to(torch.float8_e4m3fn)
    path = write_musubi_cache(tmp_path / "a_wan_te.safetensors", {"varlen_t5_float8_e4m3fn": t5}, "wan")
    loaded = load_text_embedding(path)
    assert loaded.context.dtype == torch.bfloat16
    assert torch.equal(loaded.context.float(), t5.float())


def test_load_text_embeddings_keeps_order(tmp_path):
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"{seed}.safetensors")
        save_text_embedding(paths[-1], TextEmbedding(random(seed + 2, 4096, seed=seed), None, "wan"))
    loaded = load_text_embeddings(paths)
    assert [e.context.shape[0] for e in loaded] == [2, 3, 4]
    assert load_text_embeddings([]) == []


def test_load_text_embeddings_refuses_caches_of_different_models(tmp_path):
    save_text_embedding(tmp_path / "a.safetensors", TextEmbedding(random(2, 4096), None, "wan"))
    save_text_embedding(tmp_path / "b.safetensors", TextEmbedding(random(2, 3584), None, "qwen_image"))
    with pytest.raises(MusubiError, match=r"b\.safetensors.*3584.*a\.safetensors.*4096"):
        load_text_embeddings([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])


# --- errors -------------------------------------------------------------------------------------

def test_missing_file_is_named(tmp_path):
    with pytest.raises(MusubiError, match="nothing.safetensors.*not found"):
        load_text_embedding(tmp_path / "nothing.safetensors")


def test_file_that_is_not_safetensors_is_named(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("a photo of a cat, not a tensor file at all")
    with pytest.raises(MusubiError, match="prompt.txt.*not a readable safetensors"):
        load_text_embedding(path)


def test_unknown_keys_are_listed(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_up.weight": torch.zeros(2, 2), "lora_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(MusubiError) as error:
        load_text_embedding(path)
    message = str(error.value)
    assert "lora.safetensors" in message and "lora_down.weight, lora_up.weight" in message
    assert "varlen_t5_<dtype>" in message


def test_unsupported_musubi_architecture_is_named(tmp_path):
    path = write_musubi_cache(
        tmp_path / "a_hv15_te.safetensors",
        {"varlen_vl_embed_bfloat16": random(3, 3584), "varlen_byt5_embed_bfloat16": random(3, 1472)},
        "hunyuan_video_1_5",
    )
    with pytest.raises(MusubiError, match="hunyuan_video_1_5.*not supported.*varlen_byt5_embed_bfloat16"):
        load_text_embedding(path)


def test_unfinished_hunyuan_cache_without_clip_output_is_explained(tmp_path):
    path = write_musubi_cache(
        tmp_path / "a_hv_te.safetensors",
        {"llm_float16": random(256, 4096), "llm_mask": torch.ones(256, dtype=torch.int64)},
        "hunyuan_video",
    )
    with pytest.raises(MusubiError, match="clipL_<dtype>.*Keys found: llm_float16, llm_mask.*again"):
        load_text_embedding(path)


def test_two_dtype_copies_of_one_tensor_are_refused(tmp_path):
    path = write_musubi_cache(
        tmp_path / "a_wan_te.safetensors",
        {"varlen_t5_float16": random(3, 4096), "varlen_t5_bfloat16": random(3, 4096, dtype=torch.bfloat16)},
        "wan",
    )
    with pytest.raises(MusubiError, match="several copies"):
        load_text_embedding(path)


def test_mask_of_the_wrong_length_is_refused(tmp_path):
    path = write_musubi_cache(
        tmp_path / "a_fp_te.safetensors",
        {
            "llama_vec_float16": random(512, 4096),
            "llama_attention_mask": torch.ones(77, dtype=torch.bool),
            "clip_l_pooler_float16": random(768),
        },
        "framepack",
    )
    with pytest.raises(MusubiError, match=r"llama_attention_mask.*\[77\].*512"):
        load_text_embedding(path)


def test_wrong_width_names_file_architecture_both_widths_and_the_fix(tmp_path):
    path = tmp_path / "q.safetensors"
    save_text_embedding(path, TextEmbedding(random(4, 3584), None, "qwen_image"))
    with pytest.raises(MusubiError) as error:
        validate_for_architecture(load_text_embedding(path), "wan")
    message = str(error.value)
    assert "q.safetensors" in message and "3584" in message and "4096" in message
    assert "wan" in message and "UMT5-XXL" in message and "fits qwen_image" in message


def test_missing_or_wrong_pooled_output_is_refused():
    with pytest.raises(MusubiError, match="flux needs a pooled CLIP-L output of width 768"):
        validate_for_architecture(TextEmbedding(random(4, 4096), None, None), "flux")
    with pytest.raises(MusubiError, match=r"\[1280\].*\[768\]"):
        validate_for_architecture(TextEmbedding(random(4, 4096), random(1280), None), "hunyuan_video")


def test_states_of_another_text_encoder_with_the_same_width_are_refused():
    flux_states = TextEmbedding(random(4, 4096), random(768), "flux")
    with pytest.raises(MusubiError, match="encoded for flux.*LLaVA-Llama3"):
        validate_for_architecture(flux_states, "hunyuan_video")
    # HunyuanVideo and FramePack share their text encoders, so their states are interchangeable.
    validate_for_architecture(TextEmbedding(random(4, 4096), random(768), "hunyuan_video"), "framepack")


def test_save_refuses_unknown_architecture_wrong_width_and_non_finite_values(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(MusubiError, match="'sd3' is not known"):
        save_text_embedding(path, TextEmbedding(random(4, 4096), None, "sd3"))
    with pytest.raises(MusubiError, match="768.*4096"):
        save_text_embedding(path, TextEmbedding(random(4, 768), None, "wan"))
    broken = random(4, 4096)
    broken[1, 7] = float("inf")
    with pytest.raises(MusubiError, match="NaN or infinite"):
        save_text_embedding(path, TextEmbedding(broken, None, "wan"))
    assert not os.listdir(tmp_path)


def test_load_text_embeddings_accepts_architectures_sharing_text_encoders(tmp_path):
    save_text_embedding(tmp_path / "hv.safetensors", TextEmbedding(random(2, 4096), random(768), "hunyuan_video"))
    save_text_embedding(tmp_path / "fp.safetensors", TextEmbedding(random(3, 4096), random(768), "framepack"))
    save_text_embedding(tmp_path / "flux.safetensors", TextEmbedding(random(3, 4096), random(768), "flux"))
    assert len(load_text_embeddings([tmp_path / "hv.safetensors", tmp_path / "fp.safetensors"])) == 2
    with pytest.raises(MusubiError, match="flux.safetensors: flux states.*hunyuan_video"):
        load_text_embeddings([tmp_path / "hv.safetensors", tmp_path / "flux.safetensors"])
