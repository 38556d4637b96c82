"""MagCache inside a real ComfyUI: calibrate and sample every native architecture, skip exactly as
the rule says, reproduce core KSampler bit for bit at threshold 0, and patch any sampler's model.

Two kinds of tiny model are used. The seeded random checkpoints show that nothing changes while
nothing is skipped. "Constant-residual" variants of them, whose blocks add the same vectors at
every step whatever the latent and noise level (output projections zeroed, biases kept,
modulation made constant), give independent references for what MagCache's own code measures and
reuses: a calibration must find ratio 1 everywhere, and a skipped step must reproduce the computed
one.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import safetensors.torch
import torch

from comfy_server import REPO_ROOT, Graph, preview_text, relative_error
from fixture_files import write_wan_lora_checkpoints
from tiny_checkpoints import ARCHS, FLUX_SIZES, tiny_state_dict

pytestmark = pytest.mark.comfyui

NATIVE = [name for name, arch in ARCHS.items() if arch.comfy_native]
DEFAULTS_FILE = REPO_ROOT / "musubi" / "magcache" / "defaults.json"


# --- helpers -----------------------------------------------------------------------------------


def _inputs(g: Graph, model_name: str, arch: str, embedding: str, batch_size: int = 1, negative: str | None = None,
            **options):
    """KSampler inputs for a 64×64 latent; the negative prompt is the positive one unless named."""
    family = ARCHS[arch].family
    model = g.add("UNETLoader", unet_name=model_name, weight_dtype="default")
    positive = g.add("MusubiLoadTextEmbedding", embedding=embedding, architecture=family)
    if negative is not None:
        negative_node = g.add("MusubiLoadTextEmbedding", embedding=negative, architecture=family)
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=batch_size)
    common = dict(model=model[0], positive=positive[0], negative=(positive if negative is None else negative_node)[0],
                  latent_image=latent[0], seed=5, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    common.update(options)
    return common


def _long_wan_prompt(comfy) -> str:
    """A 29-token Wan prompt: it cannot be batched with the 7-token one, so with it as the negative,
    cond and uncond run as two forward calls per step."""
    path = comfy.models_dir("text_embeddings") / "magcache_long_wan.safetensors"
    if not path.exists():
        from musubi.data.text_embeddings import TextEmbedding, save_text_embedding
        context = torch.randn(29, ARCHS["wan21_t2v"].text_dim, generator=torch.Generator().manual_seed(2))
        save_text_embedding(path, TextEmbedding(context=context, architecture="wan", extra={}))
    return path.name


def _magcache(threshold=0.24, retention_ratio=0.2, K=6, ratios="auto", expert="auto", pasted_ratios=""):
    return dict(threshold=threshold, retention_ratio=retention_ratio, K=K, ratios=ratios, expert=expert,
                pasted_ratios=pasted_ratios)


def _save(g: Graph, node, name: str) -> None:
    g.add("SaveLatent", samples=node[0], filename_prefix=f"magcache/{name}")


def _latent(comfy, name: str) -> torch.Tensor:
    return comfy.saved_latent("magcache", name)


def _skipped(report: str) -> list[int]:
    if "no step skipped" in report:
        return []
    return [int(step) for step in re.search(r"skipped \d+ of \d+ steps \(([\d, ]+)\)", report).group(1).split(",")]


def _calls(report: str) -> tuple[int, int]:
    computed, skipped = re.search(r"model calls: (\d+) computed, (\d+) skipped", report).groups()
    return int(computed), int(skipped)


def _blocks(report: str) -> tuple[int, int]:
    run, seen = re.search(r"transformer blocks run: (\d+) of (\d+)", report).groups()
    return int(run), int(seen)


def _new_log_reports(comfy, offset: int) -> list[str]:
    """Reports the patch node logged since the log had ``offset`` characters."""
    text = comfy.log_text()[offset:]
    return re.findall(r"^MagCache .*?^transformer blocks run: .*?$", text, re.S | re.M)


def _expected_skips(ratios: list[float], threshold: float, K: int, retention_ratio: float) -> list[int]:
    """MagCache's rule written out: the first max(floor(ρ·n), 1) steps and the last are computed;
    other steps multiply A by their ratio, add |1 − A| to E and are skipped while E ≤ θ and at most
    K in a row, otherwise computed with A, E and the count reset."""
    n = len(ratios)
    accumulated, error, in_a_row, skipped = 1.0, 0.0, 0, []
    for step in range(max(math.floor(retention_ratio * n + 1e-9), 1), n - 1):
        accumulated *= ratios[step]
        error += abs(1.0 - accumulated)
        in_a_row += 1
        if error <= threshold and in_a_row <= K:
            skipped.append(step)
        else:
            accumulated, error, in_a_row = 1.0, 0.0, 0
    return skipped


# --- constant-residual models ----------------------------------------------------------------

# Weights zeroed so that every block adds a constant: each image update passes through an output
# projection (weight zeroed, bias kept) times a gate made from a modulation layer (weight zeroed,
# bias kept). The kept biases are enlarged so the residual is large next to the hidden state.
_CONSTANT = {
    # Wan's cross-attention keeps its output weights but loses its query weights: its output then
    # depends on the prompt only, so cond and uncond have different (still constant) residuals.
    "wan21_t2v": (r"time_projection\.1\.weight|blocks\.\d+\.(self_attn\.o|cross_attn\.q|ffn\.2)\.weight",
                  r"blocks\.\d+\.(self_attn\.o|cross_attn\.q|ffn\.2)\.bias"),
    "hunyuan_video": (r"(double_blocks\.\d+\.(img|txt)_(mod\.linear|attn_proj|mlp\.fc2)|single_blocks\.\d+\.(linear2|modulation\.linear))\.weight",
                      r"(double_blocks\.\d+\.(img_attn_proj|img_mlp\.fc2|img_mod\.linear|txt_mod\.linear)|single_blocks\.\d+\.(linear2|modulation\.linear))\.bias"),
    "flux_kontext": (r"(double_blocks\.\d+\.(img|txt)_(mod\.lin|attn\.proj|mlp\.2)|single_blocks\.\d+\.(linear1|linear2|modulation\.lin))\.weight",
                     r"(double_blocks\.\d+\.(img_attn\.proj|img_mlp\.2|img_mod\.lin|txt_mod\.lin)|single_blocks\.\d+\.(linear2|modulation\.lin))\.bias"),
    "qwen_image": (r"transformer_blocks\.\d+\.(img_mod\.1|txt_mod\.1|attn\.to_out\.0|attn\.to_add_out|img_mlp\.net\.2|txt_mlp\.net\.2)\.weight",
                   r"transformer_blocks\.\d+\.(attn\.to_out\.0|img_mlp\.net\.2|img_mod\.1|txt_mod\.1)\.bias"),
}
BLOCKS = {"wan21_t2v": 2, "hunyuan_video": 4, "flux_kontext": 2, "qwen_image": 1}


def _flux_single_block(state_dict: dict) -> None:
    """FLUX's tiny fixture has no single-stream block; add one (text-first token stream) in its layout."""
    h = FLUX_SIZES["hidden"]
    mlp, head = 4 * h, h // FLUX_SIZES["heads"]
    prefix = "single_blocks.0"
    shapes = {"linear1.weight": (3 * h + mlp, h), "linear1.bias": (3 * h + mlp,), "linear2.weight": (h, h + mlp),
              "linear2.bias": (h,), "modulation.lin.weight": (3 * h, h), "modulation.lin.bias": (3 * h,)}
    generator = torch.Generator().manual_seed(11)
    for name, shape in shapes.items():
        state_dict[f"{prefix}.{name}"] = (torch.randn(shape, generator=generator) * 0.01).to(torch.bfloat16)
    for norm in ("query_norm", "key_norm"):
        state_dict[f"{prefix}.norm.{norm}.scale"] = torch.ones(head, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def constant_model_file(comfy):
    written: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in written:
            state_dict = tiny_state_dict(arch)
            if arch == "flux_kontext":
                _flux_single_block(state_dict)
            zeroed, enlarged = _CONSTANT[arch]
            generator = torch.Generator().manual_seed(3)
            for key, tensor in state_dict.items():
                if re.fullmatch(zeroed, key):
                    state_dict[key] = torch.zeros_like(tensor)
                elif re.fullmatch(enlarged, key):
                    state_dict[key] = torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
            name = f"magcache_constant_{arch}.safetensors"
            safetensors.torch.save_file(state_dict, comfy.models_dir("diffusion_models") / name)
            written[arch] = name
        return written[arch]

    return get


# --- calibrate, then sample ------------------------------------------------------------------


CASES = [(arch, 1.0) for arch in NATIVE] + [("wan21_t2v", 3.5), ("wan21_i2v", 2.0)]


@pytest.mark.parametrize("arch, cfg", CASES, ids=[f"{arch}-cfg{cfg:g}" for arch, cfg in CASES])
def test_calibration_is_saved_and_threshold_zero_reproduces_core_ksampler(comfy, arch, cfg, tiny_model_file, text_embedding_file):
    g = Graph()
    common = _inputs(g, tiny_model_file(arch), arch, text_embedding_file(arch), cfg=cfg)
    core = g.add("KSampler", **common)
    calibrate = g.add("MusubiCalibrateMagCache", **common, filename=f"test/{arch}_cfg{cfg:g}")
    sampled = g.add("MusubiMagCacheSampler", **common, **_magcache(threshold=0.0, pasted_ratios=calibrate[1]))
    for name, node in (("core", core), ("calibrate", calibrate), ("threshold0", sampled)):
        _save(g, node, f"{arch}_cfg{cfg:g}_{name}")
    outputs = comfy.run(g.to_dict())

    reference = _latent(comfy, f"{arch}_cfg{cfg:g}_core")
    assert torch.equal(_latent(comfy, f"{arch}_cfg{cfg:g}_calibrate"), reference)
    assert torch.equal(_latent(comfy, f"{arch}_cfg{cfg:g}_threshold0"), reference)
    report = preview_text(outputs, sampled)
    assert _skipped(report) == [] and _calls(report) == (4, 0), report

    path = comfy.models_dir("magcache") / "test" / f"{arch}_cfg{cfg:g}.json"
    saved = json.loads(path.read_text())
    assert saved["architecture"] == ARCHS[arch].family
    assert (saved["steps"], saved["sampler"], saved["scheduler"]) == (4, "euler", "simple")
    assert len(saved["ratios"]) == len(saved["norm_std"]) == len(saved["cos_dis"]) == 4
    assert saved["ratios"][0] == 1.0 and all(0 < ratio < 10 for ratio in saved["ratios"])
    assert all(value >= 0 for value in saved["norm_std"] + saved["cos_dis"])
    assert preview_text(outputs, calibrate).count(",".join(f"{ratio:.5f}" for ratio in saved["ratios"])) == 1


def test_saved_calibration_is_listed_and_reused_at_another_step_count(comfy, tiny_model_file, text_embedding_file):
    arch = "wan21_t2v"
    g = Graph()
    common = _inputs(g, tiny_model_file(arch), arch, text_embedding_file(arch), steps=6)
    g.add("MusubiCalibrateMagCache", **common, filename="reuse/wan_6steps")
    comfy.run(g.to_dict())
    listed = comfy.object_info("MusubiMagCacheSampler")["MusubiMagCacheSampler"]["input"]["required"]["ratios"]
    assert "reuse/wan_6steps.json" in listed[1]["options"]

    g = Graph()
    common = _inputs(g, tiny_model_file(arch), arch, text_embedding_file(arch), steps=9)
    _save(g, g.add("KSampler", **common), "reuse_core")
    exact = g.add("MusubiMagCacheSampler", **common, **_magcache(threshold=0.0, ratios="reuse/wan_6steps.json"))
    _save(g, exact, "reuse_threshold0")
    skipping = g.add("MusubiMagCacheSampler", **common, **_magcache(threshold=5.0, K=8, ratios="reuse/wan_6steps.json"))
    _save(g, skipping, "reuse_skipping")
    outputs = comfy.run(g.to_dict())
    assert torch.equal(_latent(comfy, "reuse_threshold0"), _latent(comfy, "reuse_core"))
    report = preview_text(outputs, skipping)
    assert "reuse/wan_6steps.json, 9 steps" in report
    # θ = 5 covers any drift of 9 tiny-model steps: every step but the retained first and the last is skipped.
    assert _skipped(report) == list(range(1, 8)) and _calls(report) == (2, 7), report



# Tiny widths are not released sizes: "auto" takes the nearest released one (Wan 128 → 1.3B), and the
# 64×64 latent is nearer to 480p/544p than to 720p.
AUTO_KEYS = {
    "wan21_t2v": "wan2.1_t2v_1.3B", "wan21_i2v": "wan2.1_i2v_480p_14B", "wan22_ti2v_5b": "wan2.2_ti2v_5B",
    "wan22_a14b_high": "wan2.1_t2v_1.3B", "wan22_a14b_low": "wan2.1_t2v_1.3B",
    "hunyuan_video": "hunyuan_video_544p", "flux_kontext": "flux", "qwen_image": "qwen_image",
}


def test_auto_recognises_every_native_model(comfy, tiny_model_file, text_embedding_file):
    assert set(AUTO_KEYS) == set(NATIVE)
    g = Graph()
    samplers = {}
    for arch in NATIVE:
        common = _inputs(g, tiny_model_file(arch), arch, text_embedding_file(arch), steps=1)
        samplers[arch] = g.add("MusubiMagCacheSampler", **common, **_magcache())
        _save(g, samplers[arch], f"auto_{arch}")
    # A reference latent makes FLUX a Kontext run.
    common = _inputs(g, tiny_model_file("flux_kontext"), "flux_kontext", text_embedding_file("flux_kontext"), steps=1)
    reference = g.add("EmptySD3LatentImage", width=64, height=64, batch_size=1)  # 16 channels, as FLUX's VAE gives
    common["positive"] = g.add("ReferenceLatent", conditioning=common["positive"], latent=reference[0])[0]
    kontext = g.add("MusubiMagCacheSampler", **common, **_magcache())
    _save(g, kontext, "auto_kontext")
    outputs = comfy.run(g.to_dict())

    for arch, key in AUTO_KEYS.items():
        assert f"MagCache ratios {key} (auto), 1 steps" in preview_text(outputs, samplers[arch]), arch
    assert "MagCache ratios flux_kontext (auto)" in preview_text(outputs, kontext)

# --- the skip rule, counted ------------------------------------------------------------------


def test_skipped_steps_follow_the_rule_for_a_hand_checked_list(comfy, tiny_model_file, text_embedding_file):
    arch = "wan21_t2v"
    # ρ = 0.2 of 10 steps keeps steps 0 and 1. With θ = 0.25, K = 2:
    # step 2: A = 0.9, E = 0.1 → skip; step 3: A = 0.9, E = 0.2 → skip; step 4: E = 0.3 → compute (reset);
    # step 5: A = 0.5, E = 0.5 → compute (reset); steps 6, 7: A = 1, E = 0 → skip; step 8: third in a row
    # (> K) → compute; step 9 is the last → compute.
    ratios = "1.0, 1.0, 0.9, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0"
    settings = _magcache(threshold=0.25, K=2, pasted_ratios=ratios)
    g = Graph()
    common = _inputs(g, tiny_model_file(arch), arch, text_embedding_file(arch), steps=10)
    one_call = g.add("MusubiMagCacheSampler", **common, **settings)
    unbatched = _inputs(g, tiny_model_file(arch), arch, text_embedding_file(arch), negative=_long_wan_prompt(comfy),
                        steps=10, cfg=2.0)
    two_calls = g.add("MusubiMagCacheSampler", **unbatched, **settings)
    _save(g, one_call, "rule_one_call")
    _save(g, two_calls, "rule_two_calls")
    outputs = comfy.run(g.to_dict())

    expected = [2, 3, 6, 7]
    assert _expected_skips([float(r) for r in ratios.split(",")], 0.25, 2, 0.2) == expected
    report = preview_text(outputs, one_call)
    assert _skipped(report) == expected and _calls(report) == (6, 4) and _blocks(report) == (12, 20), report
    report = preview_text(outputs, two_calls)
    assert _skipped(report) == expected and _calls(report) == (12, 8) and _blocks(report) == (24, 40), report
    assert "no residual cached" not in report


@pytest.mark.parametrize("arch", list(_CONSTANT))
def test_constant_residual_model_measures_ratio_one_and_skipping_reproduces_it(comfy, arch, constant_model_file, text_embedding_file):
    steps = 6 if not ARCHS[arch].big else 4
    g = Graph()
    common = _inputs(g, constant_model_file(arch), arch, text_embedding_file(arch), steps=steps)
    calibrate = g.add("MusubiCalibrateMagCache", **common, filename=f"constant/{arch}")
    # All ratios 1: A stays 1 and E 0, so every step after the first and before the last is skipped.
    skipping = g.add("MusubiMagCacheSampler", **common, **_magcache(threshold=0.1, K=20, pasted_ratios="1," * steps))
    _save(g, calibrate, f"constant_{arch}_full")
    _save(g, skipping, f"constant_{arch}_skipped")
    variants = {}
    if arch == "wan21_t2v":
        # Real CFG with a batch of two in one call; and Heun (two evaluations per step) with cond
        # and uncond as separate calls, each needing its own residual.
        variants = {"batch": dict(batch_size=2, cfg=3.0),
                    "heun_unbatched": dict(cfg=3.0, sampler_name="heun", negative=_long_wan_prompt(comfy))}
    variant_samplers = {}
    for name, options in variants.items():
        variant = _inputs(g, constant_model_file(arch), arch, text_embedding_file(arch), steps=steps, **options)
        _save(g, g.add("KSampler", **variant), f"constant_{name}_full")
        variant_samplers[name] = g.add("MusubiMagCacheSampler", **variant,
                                       **_magcache(threshold=0.1, K=20, pasted_ratios="1, 1"))
        _save(g, variant_samplers[name], f"constant_{name}_skipped")
    outputs = comfy.run(g.to_dict())

    saved = json.loads((comfy.models_dir("magcache") / "constant" / f"{arch}.json").read_text())
    assert saved["ratios"] == [1.0] * steps
    assert saved["norm_std"] == [0.0] * steps and saved["cos_dis"] == [0.0] * steps

    distance = relative_error(_latent(comfy, f"constant_{arch}_skipped"), _latent(comfy, f"constant_{arch}_full"))
    assert distance < 1e-4, distance
    report = preview_text(outputs, skipping)
    assert _skipped(report) == list(range(1, steps - 1)) and _calls(report) == (2, steps - 2), report
    assert _blocks(report) == (2 * BLOCKS[arch], steps * BLOCKS[arch]), report
    for name, node in variant_samplers.items():
        distance = relative_error(_latent(comfy, f"constant_{name}_skipped"), _latent(comfy, f"constant_{name}_full"))
        assert distance < 1e-4, (name, distance)
        report = preview_text(outputs, node)
        assert _skipped(report) == list(range(1, steps - 1)), report
        assert "no residual cached" not in report, report


# --- the patch node with other samplers and model sources -------------------------------------


def test_patch_node_composes_with_fp8_lora_and_any_sampler(comfy, tiny_model_file, text_embedding_file):
    arch = "wan21_t2v"
    lora_folder = comfy.models_dir("loras") / "magcache_lora"
    if not lora_folder.exists():
        write_wan_lora_checkpoints(lora_folder, count=1)
    g = Graph()
    fp8 = g.add("MusubiLoadDiTFP8Scaled", unet_name=tiny_model_file(arch), fp8_format="e4m3fn", mode="block",
                block_size=64, compute_dtype="default", architecture="auto", loras="", save_as="")
    lora = g.add("LoraLoaderModelOnly", model=fp8[0], lora_name="magcache_lora/step_000.safetensors", strength_model=1.0)
    exact = g.add("MusubiMagCache", model=lora[0], **_magcache(threshold=0.0))
    skipping = g.add("MusubiMagCache", model=lora[0], **_magcache(threshold=0.1, K=20, pasted_ratios="1, 1"))
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(arch), architecture="wan")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    conditioning = dict(positive=positive[0], negative=positive[0], latent_image=latent[0], cfg=3.0)
    advanced = dict(add_noise="enable", noise_seed=4, steps=6, sampler_name="euler", scheduler="simple",
                    start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable", **conditioning)
    for name, model in (("plain", lora), ("patched", exact)):
        _save(g, g.add("KSamplerAdvanced", model=model[0], **advanced), f"advanced_{name}")
    # Custom sigmas and Heun (two evaluations per step but the last).
    sigmas = g.add("KarrasScheduler", steps=7, sigma_max=1.0, sigma_min=0.02, rho=7.0)
    heun = g.add("KSamplerSelect", sampler_name="heun")
    custom = dict(add_noise=True, noise_seed=4, sampler=heun[0], sigmas=sigmas[0], **conditioning)
    for name, model in (("plain", lora), ("patched", exact), ("skipping", skipping)):
        _save(g, g.add("SamplerCustom", model=model[0], **custom), f"custom_{name}")
    offset = len(comfy.log_text())
    comfy.run(g.to_dict())

    assert torch.equal(_latent(comfy, "advanced_patched"), _latent(comfy, "advanced_plain"))
    assert torch.equal(_latent(comfy, "custom_patched"), _latent(comfy, "custom_plain"))
    [report] = [text for text in _new_log_reports(comfy, offset) if "pasted ratios" in text]
    # Evaluations: Heun's step i evaluates at σ_i and its corrector at σ_{i+1}, which is the noise
    # level of step i+1; the last step (to σ = 0) is one Euler evaluation. So step 0 has one call,
    # steps 1…5 two each (skipped), step 6 two (computed, last).
    assert "7 steps" in report and _skipped(report) == [1, 2, 3, 4, 5], report
    assert _calls(report) == (3, 10) and _blocks(report) == (6, 26), report
    assert torch.isfinite(_latent(comfy, "custom_skipping")).all()


def test_wan22_a14b_experts_sampled_by_two_advanced_samplers(comfy, tiny_model_file, text_embedding_file):
    steps, switch, threshold, K = 40, 26, 0.06, 2
    g = Graph()
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file("wan22_a14b_high"), architecture="wan")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    models = {}
    for expert in ("high", "low"):
        loaded = g.add("UNETLoader", unet_name=tiny_model_file(f"wan22_a14b_{expert}"), weight_dtype="default")
        models[expert] = g.add("MusubiMagCache", model=loaded[0],
                               **_magcache(threshold=threshold, K=K, ratios="wan2.2_t2v_A14B"))
    shared = dict(positive=positive[0], negative=positive[0], noise_seed=8, steps=steps, cfg=1.0,
                  sampler_name="euler", scheduler="simple")
    high = g.add("KSamplerAdvanced", model=models["high"][0], latent_image=latent[0], add_noise="enable",
                 start_at_step=0, end_at_step=switch, return_with_leftover_noise="enable", **shared)
    low = g.add("KSamplerAdvanced", model=models["low"][0], latent_image=high[0], add_noise="disable",
                start_at_step=switch, end_at_step=10000, return_with_leftover_noise="disable", **shared)
    _save(g, low, "a14b")
    offset = len(comfy.log_text())
    comfy.run(g.to_dict())

    reports = _new_log_reports(comfy, offset)
    [high_report] = [text for text in reports if "high_noise expert" in text]
    [low_report] = [text for text in reports if "low_noise expert" in text]
    # The published curve holds (cond, uncond) pairs for 40 steps; each step's ratio is their
    # geometric mean. The high-noise expert's run is steps 0–25 of it; the low-noise expert's run
    # starts at the hand-over, whose ratio measures the change of network and counts as a fresh 1.
    pairs = json.loads(DEFAULTS_FILE.read_text())["models"]["wan2.2_t2v_A14B"]["ratios"]
    per_step = [math.sqrt(pairs[2 * i] * pairs[2 * i + 1]) for i in range(steps)]
    high_ratios, low_ratios = per_step[:switch], [1.0] + per_step[switch + 1:]
    assert f"{switch} steps" in high_report and f"{steps - switch} steps" in low_report
    assert _skipped(high_report) == _expected_skips(high_ratios, threshold, K, 0.2) != [], high_report
    assert _skipped(low_report) == _expected_skips(low_ratios, threshold, K, 0.2) != [], low_report
    assert torch.isfinite(_latent(comfy, "a14b")).all()


# --- errors ----------------------------------------------------------------------------------


def test_bad_settings_are_refused_with_the_option_and_the_fix(comfy, tiny_model_file, text_embedding_file):
    arch = "wan21_t2v"

    def error_of(**settings) -> str:
        g = Graph()
        common = _inputs(g, tiny_model_file(arch), arch, text_embedding_file(arch))
        g.add("SaveLatent", samples=g.add("MusubiMagCacheSampler", **common, **_magcache(**settings))[0],
              filename_prefix="magcache/error")
        return comfy.run_error(g.to_dict())

    message = error_of(threshold=-0.5)
    assert "threshold" in message and "min" in message
    message = error_of(pasted_ratios="1.0, 0.98, abc")
    assert "MusubiMagCacheSampler" in message and "pasted_ratios" in message and "'abc'" in message
    message = error_of(expert="high_noise")
    assert "MagCache Sampler" in message and "wan2.2_t2v_A14B" in message
    message = error_of(ratios="hunyuan_video")
    assert "hunyuan_video model but this model is wan" in message


def test_calibration_with_more_steps_than_noise_levels_says_why(comfy, tiny_model_file, text_embedding_file):
    """'simple' picks from the model's 1000 timesteps: 1500 steps repeat levels, which no
    calibration can measure apart — refused before any step runs, with the number that works."""
    arch = "wan21_t2v"
    g = Graph()
    common = _inputs(g, tiny_model_file(arch), arch, text_embedding_file(arch), steps=1500)
    _save(g, g.add("MusubiCalibrateMagCache", **common, filename="too_many_steps"), "too_many_steps")
    message = comfy.run_error(g.to_dict())
    assert "Calibrate MagCache" in message and "distinct noise levels for 1500 steps" in message, message
    distinct = int(message.split("gives only ")[1].split()[0])
    assert 2 <= distinct < 1500 and f"at most {distinct} steps" in message
    assert not (comfy.models_dir("magcache") / "too_many_steps.json").exists()


def test_magcache_sampler_refuses_prompts_of_another_text_encoder(comfy, tiny_model_file, text_embedding_file):
    """Wan's text (4096 wide, no pooled output) on HunyuanVideo used to fail with KeyError: 'pooled_output'."""
    g = Graph()
    common = _inputs(g, tiny_model_file("hunyuan_video"), "hunyuan_video", text_embedding_file("hunyuan_video"))
    wrong = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file("wan21_t2v"), architecture="wan")
    common["positive"] = wrong[0]
    _save(g, g.add("MusubiMagCacheSampler", **common, **_magcache()), "wrong_text")
    message = comfy.run_error(g.to_dict())
    assert "MagCache Sampler: positive's conditioning has no pooled output" in message, message
    assert "HunyuanVideo text encoders" in message and "KeyError" not in message
