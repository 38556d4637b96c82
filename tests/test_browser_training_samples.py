"""Training samples inside Train LoRA in the real ComfyUI frontend (headless Chromium).

The page loads the shipped Wan 2.1 training workflow and queues a tiny real run with two Training
Samples nodes chained (a still image and a 5-frame video) through the frontend's own
``api.queuePrompt``; the newest samples must show inside the Train LoRA node, each labelled with
its step, the video as an animated WebP. A screenshot goes to
``$MUSUBI_TEST_ARTIFACTS/browser_training_samples/`` (else pytest's temporary folder).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from comfy_server import Graph
from test_browser import BROWSER_SKIP_REASON, find_chromium, frontend_page
from test_browser_live_view import (
    WORKFLOW,
    _clip,
    _latent_file,
    _load,
    _show,
    _train_lora_id,
)
from test_comfyui_dataset import wan_vae  # noqa: F401 — the tiny real-layout Wan 2.1 VAE fixture
from tiny_checkpoints import ARCHS

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

ARCH = "wan21_t2v"
STEPS = 6

_GALLERY = """
(() => {
  const box = app.graph.getNodeById(%s)?.widgets?.find((w) => w.name === "loss_curve")?.element;
  const gallery = box?.querySelector(".musubi-train-samples");
  if (!gallery) return null;
  return {
    shown: gallery.style.display !== "none",
    notes: box.querySelector(".musubi-train-notes").textContent,
    samples: [...gallery.querySelectorAll("figure")].map((figure) => {
      const picture = figure.querySelector("img");
      return {src: picture.src, loaded: picture.complete && picture.naturalWidth > 0, caption: figure.textContent,
              height: picture.getBoundingClientRect().height};
    }),
    inside: (() => {
      const outer = box.getBoundingClientRect(), inner = gallery.getBoundingClientRect();
      return inner.top >= outer.top - 1 && inner.bottom <= outer.bottom + 1;
    })(),
  };
})()
"""


def _run_graph(comfy, tiny_model_file, text_embedding_file, vae_name: str, train_id: str) -> dict:
    g = Graph()
    model = g.add("UNETLoader", unet_name=tiny_model_file(ARCH), weight_dtype="default")
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(ARCH), architecture="auto")
    latents = g.add("LoadLatent", latent=_latent_file(comfy))
    vae = g.add("VAELoader", vae_name=vae_name)
    common = {"positive": positive[0], "vae": vae[0], "width": 64, "height": 64, "steps": 2, "cfg": 1.0,
              "sampler_name": "euler", "scheduler": "simple", "seed": 1, "every_n_steps": 2, "at_checkpoints": True,
              "at_start": False}
    still = g.add("MusubiTrainingSamples", length=1, **common)
    video = g.add("MusubiTrainingSamples", length=5, samples=still[0], **common)
    train = g.add("MusubiTrainLoRA", model=model[0], latents=latents[0], conditioning=positive[0], steps=STEPS,
                  batch_size=1, gradient_accumulation_steps=1, seed=3, output_name="browser_samples", resume="no",
                  mixed_precision="no", gradient_checkpointing=False, samples=video[0])
    graph = g.to_dict()
    graph[train_id] = graph.pop(str(train))
    return graph


async def _exercise(chromium: str, url: str, profile: Path, artifacts: Path, graph: dict, train_id: int) -> dict:
    settings = {"Comfy.Workflow.ShowMissingModelsWarning": False}
    async with frontend_page(chromium, url, profile, width=1600, height=1000, settings=settings) as page:
        await _load(page, WORKFLOW)
        report = {"before": await page.evaluate(_GALLERY % train_id)}
        await page.evaluate(f"""(async () => {{
          await window.comfyAPI.api.api.queuePrompt(0, {{output: {json.dumps(graph)}, workflow: app.graph.serialize()}});
        }})()""")
        # While it runs: the samples of step 2 appear before the run ends.
        await page.wait_for(f"""(() => {{
          const box = app.graph.getNodeById({train_id})?.widgets?.find((w) => w.name === "loss_curve")?.element;
          return box?.querySelectorAll(".musubi-train-samples figure").length === 2;
        }})()""", timeout=300)
        report["during"] = await page.evaluate(_GALLERY % train_id)
        await page.wait_for(f"""(() => {{
          const box = app.graph.getNodeById({train_id})?.widgets?.find((w) => w.name === "loss_curve")?.element;
          return box?.querySelector(".musubi-train-notes")?.textContent.includes("trained steps 1–{STEPS} of {STEPS}");
        }})()""", timeout=300)
        await asyncio.sleep(1.0)  # the last previews load
        shown = await _show(page, train_id, width=420)
        await asyncio.sleep(0.5)
        report["after"] = await page.evaluate(_GALLERY % train_id)
        # The node's lower part: the last widgets, the chart, the samples and the messages.
        rect = await page.evaluate(
            f"(() => {{ const r = app.graph.getNodeById({train_id}).widgets.find((w) => w.name === 'loss_curve').element"
            ".getBoundingClientRect(); return {x: r.x, y: r.y - 260, width: r.width, height: r.height + 260}; })()")
        await _clip(page, shown | {"rect": rect}, artifacts / "train_lora_samples.png")
        report["errors"] = page.errors_from("/extensions/")
        return report


def test_train_lora_shows_the_newest_samples_with_their_step_during_the_run(comfy, tiny_model_file, text_embedding_file,
                                                                            wan_vae, tmp_path_factory):  # noqa: F811
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(BROWSER_SKIP_REASON)
    pytest.importorskip("aiohttp", reason="aiohttp (a ComfyUI requirement) is needed to speak to Chromium")
    assert ARCHS[ARCH].comfy_native
    root = os.environ.get("MUSUBI_TEST_ARTIFACTS")
    artifacts = Path(root) / "browser_training_samples" if root else tmp_path_factory.mktemp("browser_training_samples")
    artifacts.mkdir(parents=True, exist_ok=True)
    print(f"training samples screenshot: {artifacts}")
    train_id = _train_lora_id(WORKFLOW)
    graph = _run_graph(comfy, tiny_model_file, text_embedding_file, wan_vae, str(train_id))
    report = asyncio.run(_exercise(chromium, comfy.url, tmp_path_factory.mktemp("chromium-samples"), artifacts,
                                   graph, train_id))
    assert report["before"] is not None and not report["before"]["shown"]
    assert len(report["during"]["samples"]) == 2
    after = report["after"]
    assert after["shown"] and after["inside"], after
    assert [sample["caption"] for sample in after["samples"]] == [f"step {STEPS} · prompt 1", f"step {STEPS} · prompt 2 · 5 frames"]
    assert all(sample["loaded"] and sample["height"] > 50 for sample in after["samples"]), after["samples"]
    assert after["samples"][0]["src"].endswith(".png") is False  # served through /view with query parameters
    assert ".png" in after["samples"][0]["src"] and ".webp" in after["samples"][1]["src"]
    assert report["errors"] == []
    assert (artifacts / "train_lora_samples.png").stat().st_size > 2_000
