"""The validation loss and the EMA candidates in the real ComfyUI frontend (headless Chromium).

A tiny Train LoRA run with Validation Data, queued by the page into a shipped training workflow,
must draw the validation line (its colour, #6fd08c, on the chart) next to the training loss and
its average; a Post-Hoc EMA Merge with candidates, added to the page's graph, must show its table
and plot on the node. Screenshots go to ``$MUSUBI_TEST_ARTIFACTS/browser_validation/`` (else
pytest's temporary folder) for a person to judge.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from pathlib import Path

import pytest

from comfy_server import Graph, adamw_constant
from test_browser import BROWSER_SKIP_REASON, DevToolsPage, find_chromium, frontend_page
from test_browser_live_view import ARCH, PAGE_SETTINGS, WORKFLOW, _clip, _latent_file, _load, _show, _train_lora_id

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]
STEPS = 60
MERGE_ID = "9001"

_GREEN_PIXELS = """
(() => {
  const box = app.graph.getNodeById(%s)?.widgets?.find((w) => w.name === "loss_curve")?.element;
  const canvas = box?.querySelector("canvas");
  if (!canvas?.width) return 0;
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let count = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (Math.abs(data[i] - 111) < 14 && Math.abs(data[i + 1] - 208) < 14 && Math.abs(data[i + 2] - 140) < 14) count++;
  }
  return count;
})()
"""


def _graphs(comfy, tiny_model_file, text_embedding_file, train_id: str, name: str):
    g = Graph()
    model = g.add("UNETLoader", unet_name=tiny_model_file(ARCH), weight_dtype="default")
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(ARCH), architecture="auto")
    latents = g.add("LoadLatent", latent=_latent_file(comfy))
    optimizer = adamw_constant(g, 2e-2)
    checkpoints = g.add("MusubiCheckpointSettings", save_every_n_steps=15, save_last_n_checkpoints=0, save_state=False,
                        lora_format="comfyui", save_precision="float32", log_with="none", logging_dir="")
    validation = g.add("MusubiValidationData", latents=latents[0], conditioning=positive[0], held_out_fraction=0.0,
                       every_n_steps=10, num_timesteps=8, num_bands=4, seed=0)
    train = g.add("MusubiTrainLoRA", model=model[0], latents=latents[0], conditioning=positive[0], steps=STEPS,
                  batch_size=1, gradient_accumulation_steps=1, seed=3, output_name=name, resume="no",
                  mixed_precision="no", gradient_checkpointing=False, optimizer_settings=optimizer[0],
                  checkpoint_settings=checkpoints[0], validation=validation[0])
    training = g.to_dict()
    training[train_id] = training.pop(str(train))
    candidates = g.add("MusubiEMACandidates", model=model[0], validation=validation[0], values="0.05, 0.1, 0.2, 0.28")
    merge = g.add("MusubiPostHocEMAMerge", checkpoints=f"{name}/*.safetensors", output_name=f"ema/{name}", mode="sigma_rel",
                  beta=0.95, beta2=0.95, sigma_rel=0.2, order="as listed", candidates=candidates[0])
    merging = {key: node for key, node in g.to_dict().items() if node["class_type"] != "MusubiTrainLoRA"}
    merging[MERGE_ID] = merging.pop(str(merge))  # the id of the node the page adds to an empty graph
    return training, merging, MERGE_ID


async def _exercise(page: DevToolsPage, artifacts: Path, training: dict, merging: dict, merge_id: str) -> dict:
    train_id = _train_lora_id(WORKFLOW)
    await _load(page, WORKFLOW)
    report: dict = {}
    await page.evaluate(f"""(async () => {{
      await window.comfyAPI.api.api.queuePrompt(0, {{output: {json.dumps(training)}, workflow: app.graph.serialize()}});
    }})()""")
    await page.wait_for(f"""(() => {{
      const box = app.graph.getNodeById({train_id})?.widgets?.find((w) => w.name === "loss_curve")?.element;
      return box?.querySelector(".musubi-train-notes")?.textContent.includes("trained steps 1–{STEPS} of {STEPS}");
    }})()""", timeout=600)
    await page.evaluate(f"app.graph.getNodeById({train_id}).setSize([520, 440])")
    report["chart"] = await _show(page, train_id, width=520)
    report["green"] = await page.evaluate(_GREEN_PIXELS % train_id)
    await _clip(page, report["chart"], artifacts / "train_lora_validation.png")

    # The EMA node in the page's graph under the id the queued graph gives it: its outputs show on it.
    await page.evaluate(f"""(() => {{
      app.graph.clear();
      const node = LiteGraph.createNode("MusubiPostHocEMAMerge");
      node.id = {merge_id};  // before add: the graph keeps a free id as it is
      app.graph.add(node);
      node.pos = [100, 100];
      node.setSize([760, 900]);
    }})()""")
    await page.evaluate(f"""(async () => {{
      await window.comfyAPI.api.api.queuePrompt(0, {{output: {json.dumps(merging)}, workflow: app.graph.serialize()}});
    }})()""")
    await page.wait_for(f"(() => !!app.graph.getNodeById({merge_id})?.widgets?.some((w) => w.name === 'candidate_report'))()",
                        timeout=600)
    await asyncio.sleep(1.5)
    report["ema_text"] = await page.evaluate(f"""(() => {{
      const node = app.graph.getNodeById({merge_id});
      const widget = node.widgets?.find((w) => w.name === "candidate_report");
      return widget?.element?.value ?? widget?.value ?? null;
    }})()""")
    await page.evaluate(f"""(() => {{
      const node = app.graph.getNodeById({merge_id});
      app.canvas.ds.scale = 1;
      app.canvas.centerOnNode(node);
      app.graph.setDirtyCanvas(true, true);
    }})()""")
    await asyncio.sleep(1.0)
    shot = await page.send("Page.captureScreenshot", format="png")
    (artifacts / "ema_candidates.png").write_bytes(base64.b64decode(shot["data"]))
    return report


async def _in_browser(chromium: str, url: str, profile: Path, artifacts: Path, *graphs) -> dict:
    # No first-run templates and no missing-models dialog (the shipped models are not on the test
    # server) over the node in the screenshots.
    async with frontend_page(chromium, url, profile, 1600, 1000, settings=PAGE_SETTINGS) as page:
        return await _exercise(page, artifacts, *graphs)


def test_the_chart_draws_the_validation_line_and_the_ema_node_shows_its_candidates(comfy, tiny_model_file,
                                                                                  text_embedding_file, tmp_path_factory):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(BROWSER_SKIP_REASON)
    pytest.importorskip("aiohttp", reason="aiohttp (a ComfyUI requirement) is needed to speak to Chromium")
    root = os.environ.get("MUSUBI_TEST_ARTIFACTS")
    artifacts = Path(root) / "browser_validation" if root else tmp_path_factory.mktemp("browser_validation")
    artifacts.mkdir(parents=True, exist_ok=True)
    print(f"validation screenshots: {artifacts}")
    name = f"browser_validation_{time.strftime('%H%M%S')}"
    graphs = _graphs(comfy, tiny_model_file, text_embedding_file, str(_train_lora_id(WORKFLOW)), name)
    report = asyncio.run(_in_browser(chromium, comfy.url, tmp_path_factory.mktemp("chromium-validation"), artifacts, *graphs))
    assert report["green"] > 50, report["green"]
    assert report["ema_text"] and "← best" in report["ema_text"], report["ema_text"]
    assert (artifacts / "ema_candidates.png").stat().st_size > 10_000
