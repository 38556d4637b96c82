"""Train LoRA's live view in the real ComfyUI frontend (headless Chromium, as tests/test_browser.py).

The page loads a shipped training workflow and queues a tiny real run through the frontend's own
``api.queuePrompt``, with the Train LoRA under the workflow's node id: the server's events draw the
curve and the run's messages into that node. Then events are injected as the websocket would
deliver them: one of a prompt this tab did not queue must leave the chart untouched, one of this
tab's prompt must change it; a Cancel message shows as text on the node. Another workflow whose
Train LoRA has the same node id shows no curve, and the first one shows its run again when it is
reopened. The header labels are laid out without overlapping at every width, and screenshots of
a narrow and a wide node go to ``$MUSUBI_TEST_ARTIFACTS/browser_live_view/`` (else pytest's
temporary folder).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from comfy_server import PACK_NAME, REPO_ROOT, Graph, adamw_constant
from test_browser import BROWSER_SKIP_REASON, DevToolsPage, find_chromium, frontend_page
from tiny_checkpoints import ARCHS

# Node text drawn even when a whole workflow is fitted; no dialog about models the tests never download.
PAGE_SETTINGS = {"LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1, "Comfy.Workflow.ShowMissingModelsWarning": False}

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

ARCH = "wan21_t2v"
WORKFLOW = REPO_ROOT / "workflows" / "wan21_t2v_training.json"
STEPS = 30
EXTENSION_URL = f"/extensions/{PACK_NAME}/train_loss.js"

# The chart of one Train LoRA node, read from the page: pixels of the loss colour (#7f9fcc), the
# canvas as a data URL, and the message lines under it.
_CHART = """
(() => {
  const node = app.graph.getNodeById(%s);
  const box = node?.widgets?.find((w) => w.name === "loss_curve")?.element;
  if (!box) return null;
  const canvas = box.querySelector("canvas");
  const notes = box.querySelector(".musubi-train-notes");
  let lossPixels = 0;
  if (canvas.width && canvas.height) {
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 0; i < data.length; i += 4) {
      if (Math.abs(data[i] - 127) < 14 && Math.abs(data[i + 1] - 159) < 14 && Math.abs(data[i + 2] - 204) < 14) lossPixels++;
    }
  }
  const rect = box.getBoundingClientRect();
  return {lossPixels, image: canvas.toDataURL(), notes: notes.textContent, notesShown: notes.style.display !== "none",
          notesColor: notes.style.color, width: canvas.clientWidth, height: canvas.clientHeight,
          rect: {x: rect.x, y: rect.y, width: rect.width, height: rect.height}};
})()
"""

# Every header layout from 100 to 800 pixels for long labels: labels of one row must not overlap
# and each must fit the width.
_LAYOUT_CHECK = """
(async () => {
  const { layoutHeader } = await import(%s);
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = "11px sans-serif";
  const measure = (text) => ctx.measureText(text).width;
  const cases = [
    {stats: ["step 12345", "loss 0.08912", "avg100 0.09034"], range: "0.2513 … 0.01234", lr: "lr 1.00e-04 / 4.00e-04"},
    {stats: ["step 2", "loss 0.1234"], range: "0.1300 … 0.1234", lr: "lr 1.00e-02"},
    {stats: ["step 7", "loss –"], range: "1.000 … 0.000", lr: ""},
  ];
  const problems = [];
  let rows = {};
  for (const header of cases) {
    for (let width = 100; width <= 800; width += 4) {
      const {labels, rows: count} = layoutHeader(measure, width, header);
      rows[`${header.stats[0]}@${width}`] = count;
      const spans = labels.map((l) => {
        const w = measure(l.text);
        return {row: l.row, from: l.align === "right" ? width - w : 0, to: l.align === "right" ? width : w, text: l.text};
      });
      for (const s of spans) if (s.to - s.from > width + 0.5) problems.push(`${width}: '${s.text}' is wider than the chart`);
      for (let i = 0; i < spans.length; i++)
        for (let j = i + 1; j < spans.length; j++)
          if (spans[i].row === spans[j].row && spans[i].from < spans[j].to && spans[j].from < spans[i].to)
            problems.push(`${width}: '${spans[i].text}' overlaps '${spans[j].text}'`);
      if (!labels.some((l) => l.text.includes("…"))) problems.push(`${width}: no loss range label`);
    }
  }
  const wide = layoutHeader(measure, 700, cases[0]);
  return {problems, wideRows: wide.rows, wideTexts: wide.labels.map((l) => l.text)};
})()
"""


def _train_lora_id(path: Path):
    return next((node["id"] for node in json.loads(path.read_text())["nodes"] if node["type"] == "MusubiTrainLoRA"), None)


def _other_workflow() -> Path:
    """Another shipped workflow (another workflow id) whose Train LoRA has the same node id."""
    ours = json.loads(WORKFLOW.read_text())
    for path in sorted(WORKFLOW.parent.glob("*_training.json")):
        other = json.loads(path.read_text())
        if path != WORKFLOW and other.get("id") != ours.get("id") and _train_lora_id(path) == _train_lora_id(WORKFLOW):
            return path
    pytest.fail(f"no other shipped training workflow has a Train LoRA with id {_train_lora_id(WORKFLOW)}")


def _latent_file(comfy) -> str:
    tiny = ARCHS[ARCH]
    name = f"live_view_browser_{ARCH}.latent"
    path = comfy.input_dir / name
    if not path.exists():
        latents = torch.randn((2, tiny.latent_channels, 1, 4, 4), generator=torch.Generator().manual_seed(0))
        safetensors.torch.save_file({"latent_tensor": latents, "latent_format_version_0": torch.tensor([])}, path)
    return name


def _tiny_run(comfy, tiny_model_file, text_embedding_file, train_id: str, steps: int, output_name: str) -> dict:
    """An API graph of a tiny Train LoRA run whose Train LoRA node has the id ``train_id``."""
    g = Graph()
    model = g.add("UNETLoader", unet_name=tiny_model_file(ARCH), weight_dtype="default")
    positive = g.add("MusubiLoadTextEmbedding", embedding=text_embedding_file(ARCH), architecture="auto")
    latents = g.add("LoadLatent", latent=_latent_file(comfy))
    optimizer = adamw_constant(g, 1e-2)
    train = g.add("MusubiTrainLoRA", model=model[0], latents=latents[0], conditioning=positive[0], steps=steps,
                  batch_size=1, gradient_accumulation_steps=1, seed=3, output_name=output_name, resume="no",
                  mixed_precision="no", gradient_checkpointing=False, optimizer_settings=optimizer[0])
    graph = g.to_dict()
    assert train_id not in graph
    graph[train_id] = graph.pop(str(train))
    return graph


_CLOSE_DIALOGS = "document.querySelectorAll('.p-dialog-close-button, .p-toast-close-button').forEach((b) => b.click())"


async def _load(page: DevToolsPage, path: Path) -> None:
    await page.evaluate(_CLOSE_DIALOGS)
    await page.evaluate(f"app.loadGraphData({path.read_text()}, true, true, {json.dumps(path.name)})")
    await asyncio.sleep(0.5)
    await page.evaluate(_CLOSE_DIALOGS)


async def _show(page: DevToolsPage, node_id: int, width: int | None = None) -> dict:
    """Zoom 1, the node centred (at ``width`` pixels when given); returns its chart once drawn."""
    size = "" if width is None else f"node.setSize([{width}, node.size[1]]);"
    await page.evaluate(f"""(() => {{
      const node = app.graph.getNodeById({node_id});
      {size}
      app.canvas.ds.scale = 1;
      app.canvas.centerOnNode(node);
      app.graph.setDirtyCanvas(true, true);
    }})()""")
    await asyncio.sleep(0.8)
    return await page.evaluate(_CHART % node_id)


async def _chart_after(page: DevToolsPage, node_id: int, expression: str) -> dict:
    await page.evaluate(expression)
    await asyncio.sleep(0.5)  # a repaint is one animation frame away
    return await page.evaluate(_CHART % node_id)


async def _clip(page: DevToolsPage, chart: dict, path: Path) -> None:
    rect = chart["rect"]
    clip = {"x": max(0, rect["x"] - 12), "y": max(0, rect["y"] - 12), "width": rect["width"] + 24,
            "height": rect["height"] + 24, "scale": 2}
    shot = await page.send("Page.captureScreenshot", format="png", clip=clip)
    path.write_bytes(base64.b64decode(shot["data"]))


def _dispatch(kind: str, detail: str) -> str:
    return f"window.comfyAPI.api.api.dispatchCustomEvent({json.dumps(kind)}, {detail})"


async def _exercise(page: DevToolsPage, artifacts: Path, run_graph, second_graph) -> dict:
    other_workflow = _other_workflow()
    report: dict = {}
    train_id = _train_lora_id(WORKFLOW)
    report["train_id"] = train_id
    await _load(page, WORKFLOW)
    report["before"] = await _show(page, train_id)

    # A real run, queued by this tab through the frontend's api.queuePrompt, into this workflow.
    prompt_id = await page.evaluate(f"""(async () => {{
      const answer = await window.comfyAPI.api.api.queuePrompt(0, {{output: {json.dumps(run_graph)}, workflow: app.graph.serialize()}});
      return answer.prompt_id;
    }})()""")
    report["prompt_id"] = prompt_id
    await page.wait_for(f"""(() => {{
      const box = app.graph.getNodeById({train_id})?.widgets?.find((w) => w.name === "loss_curve")?.element;
      return box?.querySelector(".musubi-train-notes")?.textContent.includes("trained steps 1–{STEPS} of {STEPS}");
    }})()""", timeout=300)
    report["after_run"] = await _show(page, train_id)
    await asyncio.sleep(1.0)  # an image preview would load by now
    report["picture_after_run"] = await page.evaluate(f"""(() => {{
      const node = app.graph.getNodeById({train_id});
      return {{imgs: (node.imgs || []).length, preview: (node.widgets || []).some((w) => w.name === "$$canvas-image-preview"),
               outputs: (app.nodeOutputs?.[String({train_id})]?.images || []).length}};
    }})()""")
    await _clip(page, report["after_run"], artifacts / "train_lora_live_view_wide.png")
    report["narrow"] = await _show(page, train_id, width=300)
    await _clip(page, report["narrow"], artifacts / "train_lora_live_view_narrow.png")

    # Injected as the websocket would deliver them: a foreign prompt's events change nothing ...
    client = "window.comfyAPI.api.api.clientId"
    report["foreign_progress"] = await _chart_after(page, train_id, _dispatch(
        "musubi.train.progress",
        f'{{node: "{train_id}", prompt_id: "a-prompt-of-another-tab", client_id: {client}, step: 1, loss: 9.5, lrs: {{"unet": 0.5}}}}'))
    report["foreign_status"] = await _chart_after(page, train_id, _dispatch(
        "musubi.train.status",
        f'{{node: "{train_id}", prompt_id: "a-prompt-of-another-tab", client_id: {client}, kind: "stopped", text: "Stopped at step 1"}}'))
    # ... this tab's prompt draws: one more step, then the Cancel message under the curve.
    report["own_progress"] = await _chart_after(page, train_id, _dispatch(
        "musubi.train.progress",
        f'{{node: "{train_id}", prompt_id: {json.dumps(prompt_id)}, client_id: {client}, step: {STEPS + 1}, loss: 0.9, lrs: {{"unet": 0.01}}}}'))
    stopped = (f"Stopped at step {STEPS + 1} on request; resume from /output/musubi_training_states/live/live-step{STEPS + 1:06d}-state: "
               "queue again with resume = latest to continue.\\nresume states: /output/musubi_training_states/live")
    report["own_status"] = await _chart_after(page, train_id, _dispatch(
        "musubi.train.status",
        f'{{node: "{train_id}", prompt_id: {json.dumps(prompt_id)}, client_id: {client}, kind: "stopped", text: "{stopped}"}}'))
    report["stopped_narrow"] = await _show(page, train_id, width=300)
    await _clip(page, report["stopped_narrow"], artifacts / "train_lora_live_view_stopped_narrow.png")

    # Another workflow with a Train LoRA of the same id shows no curve; the first shows its run again.
    report["other_workflow_name"] = other_workflow.name
    await _load(page, other_workflow)
    report["other_workflow"] = await _show(page, train_id)
    await _load(page, WORKFLOW)
    report["reopened"] = await _show(page, train_id)

    # A new prompt of this tab starts a new chart.
    second_id = await page.evaluate(f"""(async () => {{
      const answer = await window.comfyAPI.api.api.queuePrompt(0, {{output: {json.dumps(second_graph)}, workflow: app.graph.serialize()}});
      return answer.prompt_id;
    }})()""")
    await page.wait_for(f"""(() => {{
      const box = app.graph.getNodeById({train_id})?.widgets?.find((w) => w.name === "loss_curve")?.element;
      return box?.querySelector(".musubi-train-notes")?.textContent.includes("trained steps 1–3 of 3");
    }})()""", timeout=300)
    report["second_prompt"] = await _show(page, train_id)
    report["second_prompt_id"] = second_id

    # Events that come before /prompt has answered the tab (a run that starts at once) are kept and
    # drawn once the answer names the prompt as this tab's: here /prompt is answered by the page
    # itself, after a message of that prompt arrived.
    report["early"] = await _chart_after(page, train_id, f"""(async () => {{
      const api = window.comfyAPI.api.api;
      const fetchApi = api.fetchApi;
      api.fetchApi = async function (route, options) {{
        if (route !== "/prompt") return fetchApi.call(this, route, options);
        api.fetchApi = fetchApi;
        api.dispatchCustomEvent("musubi.train.status", {{node: "{train_id}", prompt_id: "an-early-prompt",
          client_id: api.clientId, kind: "started", text: "came before /prompt answered"}});
        return new Response(JSON.stringify({{prompt_id: "an-early-prompt", number: 99, node_errors: {{}}}}),
                            {{status: 200, headers: {{"Content-Type": "application/json"}}}});
      }};
      await api.queuePrompt(0, {{output: {{}}, workflow: app.graph.serialize()}});
    }})()""")

    report["layout"] = await page.evaluate(_LAYOUT_CHECK % json.dumps(EXTENSION_URL))
    report["extension_errors"] = page.errors_from(f"/extensions/{PACK_NAME}/")
    return report


async def _in_browser(chromium: str, url: str, profile: Path, artifacts: Path, run_graph, second_graph) -> dict:
    # No first-run templates and no missing-models dialog (the shipped models are not on the test
    # server) over the node in the screenshots.
    async with frontend_page(chromium, url, profile, 1600, 1000, settings=PAGE_SETTINGS) as page:
        return await _exercise(page, artifacts, run_graph, second_graph)


@pytest.fixture(scope="module")
def live_view(request, tmp_path_factory) -> dict:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(BROWSER_SKIP_REASON)
    pytest.importorskip("aiohttp", reason="aiohttp (a ComfyUI requirement) is needed to speak to Chromium")
    comfy = request.getfixturevalue("comfy")
    tiny_model_file = request.getfixturevalue("tiny_model_file")
    text_embedding_file = request.getfixturevalue("text_embedding_file")
    root = os.environ.get("MUSUBI_TEST_ARTIFACTS")
    artifacts = Path(root) / "browser_live_view" if root else tmp_path_factory.mktemp("browser_live_view")
    artifacts.mkdir(parents=True, exist_ok=True)
    print(f"live view screenshots: {artifacts}")
    train_id = str(_train_lora_id(WORKFLOW))
    stamp = time.strftime("%H%M%S")
    run_graph = _tiny_run(comfy, tiny_model_file, text_embedding_file, train_id, STEPS, f"live_view_browser_{stamp}")
    second_graph = _tiny_run(comfy, tiny_model_file, text_embedding_file, train_id, 3, f"live_view_browser_{stamp}_b")
    report = asyncio.run(_in_browser(chromium, comfy.url, tmp_path_factory.mktemp("chromium-live-view"), artifacts,
                                     run_graph, second_graph))
    report["artifacts"] = artifacts
    return report


def test_the_run_this_tab_drew_live_shows_no_second_picture_of_its_curve(live_view):
    assert live_view["picture_after_run"] == {"imgs": 0, "preview": False, "outputs": 0}


def test_this_tabs_run_draws_its_curve_and_messages_into_its_node(live_view):
    assert live_view["before"]["lossPixels"] == 0 and not live_view["before"]["notesShown"]
    after = live_view["after_run"]
    assert after["lossPixels"] > 50, after["lossPixels"]
    assert after["notesShown"] and after["notes"].startswith(f"trained steps 1–{STEPS} of {STEPS}"), after["notes"]
    assert live_view["extension_errors"] == []


def test_events_of_a_foreign_prompt_do_not_draw_and_this_tabs_do(live_view):
    narrow = live_view["narrow"]
    assert live_view["foreign_progress"]["image"] == narrow["image"], "a foreign prompt's step changed the chart"
    assert live_view["foreign_status"]["notes"] == narrow["notes"], "a foreign prompt's message reached the node"
    assert live_view["own_progress"]["image"] != narrow["image"], "a step of this tab's prompt did not draw"
    status = live_view["own_status"]
    assert status["notesShown"] and status["notes"].startswith(f"Stopped at step {STEPS + 1} on request; resume from "), status["notes"]
    assert "resume states: " in status["notes"]
    assert status["notesColor"] in ("rgb(240, 192, 74)", "#f0c04a"), status["notesColor"]


def test_another_workflow_with_the_same_node_id_shows_no_curve(live_view):
    other = live_view["other_workflow"]
    assert other["lossPixels"] == 0 and not other["notesShown"], other
    reopened = live_view["reopened"]
    assert reopened["lossPixels"] > 50 and reopened["notes"].startswith(f"Stopped at step {STEPS + 1}"), reopened["notes"]


def test_a_new_prompt_of_this_tab_starts_a_new_chart(live_view):
    second = live_view["second_prompt"]
    assert second["notes"].startswith("trained steps 1–3 of 3"), second["notes"]
    assert "Stopped at step" not in second["notes"]
    assert second["lossPixels"] > 0


def test_events_that_come_before_the_prompt_answer_are_drawn_after_it(live_view):
    early = live_view["early"]
    assert early["notesShown"] and early["notes"] == "came before /prompt answered", early["notes"]
    assert early["lossPixels"] == 0  # a new prompt: the earlier run's curve is gone


def test_header_labels_never_overlap_and_the_narrow_chart_was_captured(live_view):
    layout = live_view["layout"]
    assert layout["problems"] == [], layout["problems"][:10]
    assert layout["wideRows"] == 1, layout  # wide enough: one row, nothing dropped
    assert any("lr 1.00e-04" in text for text in layout["wideTexts"])
    assert live_view["narrow"]["width"] < 300
    for name in ("train_lora_live_view_narrow.png", "train_lora_live_view_wide.png", "train_lora_live_view_stopped_narrow.png"):
        assert (live_view["artifacts"] / name).stat().st_size > 2_000
