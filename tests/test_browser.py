"""The real ComfyUI frontend, in headless Chromium, loads every shipped workflow.

Chromium (Debian's ``chromium`` package, or ``$MUSUBI_CHROMIUM``) is driven over the Chrome
DevTools Protocol with aiohttp, which ComfyUI itself needs — no browser download and no extra
Python package. The page opens the template browser, where the pack's entry must list exactly the
UI workflows (no API twins), each with a thumbnail that draws; each template is loaded by clicking
its card, as a user does, and the test checks
that no "missing nodes" dialog or error toast appears, that the frontend builds every node (its
type is registered, ``LiteGraph.createNode`` gives a node, and after loading it is neither marked
``has_errors`` nor the frontend's placeholder for a node it could not create), and that the
frontend's own ``graphToPrompt`` gives exactly the workflow's API-format twin
(``workflows/api/<name>.api.json``). Nodes that the frontend cannot build fail with one message
naming each (``workflow: node id, type, why``) before any API-format comparison. It also checks
that this pack's web extensions register and add their widgets without errors.

Layout: after loading, the page reads every node's bounding box as the frontend lays it out, then
plays what a run does to the nodes — a training step and a training sample reach Train LoRA's live view, then
every node that shows an output gets one (the loss plot and pictures as images, videos as video,
reports as text, Load Image/Load Video a file) — and reads the boxes again. No two nodes may
overlap at any of those sizes, every node lies inside the group whose area holds its centre (below
the group's title bar), nodes outside groups stay clear of them, and groups do not overlap.

Models: loader nodes carry ``properties.models`` (name, url, directory), which the frontend reads to
offer downloads of missing files; the missing-models dialog must list exactly the files the server
lacks, with no error (unknown folder, source or suffix).

Help: the frontend's node help panel opens every pack node's page (web/docs/<NodeId>.md), rendered
with the node's display name as its title.

Screenshots (one per workflow, the template browser, Train LoRA's help) go to ``$MUSUBI_TEST_ARTIFACTS/browser/`` when that variable is
set, else to pytest's temporary folder; the folder is printed in the test's output.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from comfy_server import PACK_NAME, REPO_ROOT

# Every test that needs the server and Chromium is marked ``comfyui`` and ``browser`` one by one:
# the unit test of the unbuilt-node message needs neither and runs everywhere.

BROWSER_SKIP_REASON = (
    "headless Chromium not found: install it (Debian: apt-get install -y chromium) or point "
    "MUSUBI_CHROMIUM at a Chromium/Chrome binary to run the browser test"
)
WORKFLOWS = REPO_ROOT / "workflows"
# ComfyUI offers every *.json directly in workflows/ as a template (loaded with app.loadGraphData);
# the API-format twins live in workflows/api/, which it does not list.
UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))
EXTENSIONS = {"musubi.PostHocEMAMerge", "musubi.TrainLossCurve"}
# The control graphs: a type nobody registered, and a registered type whose constructor throws.
UNKNOWN_TYPE = "MusubiNoSuchNode"
THROWING_TYPE = "MusubiThrowingNode"
# ComfyUI's optional requirements: without them core nodes such as UpscaleModelLoader do not load,
# and the frontend cannot build loaders such as VAELoader either.
OPTIONAL_REQUIREMENTS = "kornia, spandrel"


def api_twin(path: Path) -> Path:
    """The API-format twin of a UI workflow."""
    return WORKFLOWS / "api" / f"{path.stem}.api.json"


def find_chromium() -> str | None:
    for candidate in (os.environ.get("MUSUBI_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


class DevToolsPage:
    """One page of a Chromium started with --remote-debugging-port, spoken to over CDP."""

    def __init__(self, socket):
        self.socket = socket
        self.next_id = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.events: list[dict] = []

    async def read(self) -> None:
        async for message in self.socket:
            data = json.loads(message.data)
            future = self.pending.pop(data.get("id"), None)
            if future is not None:
                future.set_result(data)
            else:
                self.events.append(data)

    async def send(self, method: str, **params) -> dict:
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.socket.send_json({"id": self.next_id, "method": method, "params": params})
        answer = await asyncio.wait_for(future, 30)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    async def evaluate(self, expression: str):
        """The value of a JavaScript expression (promises awaited)."""
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if await self.evaluate(expression):
                    return
            except RuntimeError:
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError(f"the page never satisfied: {expression}")

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))

    def errors_from(self, marker: str) -> list[str]:
        """Console errors, uncaught exceptions and failed requests whose text or source names ``marker``."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                text = json.dumps(params["exceptionDetails"])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                text = json.dumps(params.get("args")) + json.dumps(params.get("stackTrace", {}))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                text = json.dumps(params["entry"])
            else:
                continue
            if marker in text:
                found.append(text[:1500])
        return found


# What the page reports after loading a graph: open dialogs, error toasts, what became of each
# node of the workflow, and the API prompt the frontend itself would queue.
#
# Per node (``built``): whether its type is registered; what the loaded graph holds under its id
# (frontend 1.27 puts a bare LGraphNode with ``has_errors`` and ``last_serialization`` in place of
# a node whose type it cannot create); and, only for a node that did not load properly, what
# ``LiteGraph.createNode`` gives for its type (with the constructor's error, if it throws).
_INSPECT = """
(async () => {
  const visible = (selector) => [...document.querySelectorAll(selector)]
      .filter((e) => e.offsetParent !== null).map((e) => e.innerText.slice(0, 400));
  const workflow = %s;
  const subgraphTypes = new Set((workflow.definitions?.subgraphs || []).map((s) => s.id));
  const built = workflow.nodes.map((n) => {
    const type = String(n.type);
    const registered = type in LiteGraph.registered_node_types || subgraphTypes.has(type);
    const node = app.graph.getNodeById(n.id);
    const loaded = node ? {
      type: String(node.type), hasErrors: !!node.has_errors,
      placeholder: !!node.last_serialization || (!subgraphTypes.has(type) && node.constructor !== LiteGraph.registered_node_types[node.type]),
      comfyClass: node.comfyClass ?? null, virtual: !!node.isVirtualNode || subgraphTypes.has(type),
    } : null;
    let created = null;
    if (registered && !subgraphTypes.has(type) && (!loaded || loaded.placeholder || loaded.hasErrors)) {
      try {
        created = LiteGraph.createNode(type) ? "a node" : "nothing";
      } catch (error) {
        created = "an exception: " + String(error).slice(0, 300);
      }
      if (created === "nothing") {
        try {
          new LiteGraph.registered_node_types[type](type);
        } catch (error) {
          created = "nothing (its constructor throws " + String(error).slice(0, 300) + ")";
        }
      }
    }
    return {id: n.id, type, registered, loaded, created};
  });
  const prompt = (await app.graphToPrompt()).output;
  for (const node of Object.values(prompt)) delete node._meta;
  const widgets = {};
  for (const node of app.graph._nodes) widgets[node.id] = {type: node.type, names: (node.widgets || []).map((w) => w.name)};
  const dialogs = [...document.querySelectorAll(".p-dialog")].filter((e) => e.offsetParent !== null);
  const missingModels = dialogs.flatMap((d) => [...d.querySelectorAll(".comfy-missing-models li")].map((e) => e.innerText));
  return {dialogs: dialogs.filter((d) => !d.querySelector(".comfy-missing-models")).map((e) => e.innerText.slice(0, 400)),
          missingModelsDialogs: dialogs.filter((d) => d.querySelector(".comfy-missing-models")).length, missingModels,
          errorToasts: visible(".p-toast-message-error"), built, nodeCount: app.graph._nodes.length, prompt, widgets};
})()
"""

# A node type whose constructor always throws, so LiteGraph.createNode gives nothing for it.
_REGISTER_THROWING_TYPE = """
(() => {
  function %s() { throw new Error("this constructor fails on purpose"); }
  LiteGraph.registerNodeType(%s, %s);
})()
"""

_CLOSE_DIALOGS = """
document.querySelectorAll('.p-dialog-close-button, .p-toast-close-button').forEach((b) => b.click())
"""


# What a run does to the nodes' sizes, in three steps: as loaded; with Train LoRA's live chart fed
# a training step and the run's messages (a prompt this tab "queued": /prompt answers a made-up id,
# so web/train_loss.js takes the events as its own); after every node that shows an output got one
# (LAYOUT_OUTPUTS; the other pack nodes show a text report). Each node's box is the union over the
# steps of its bounding box (title bar included) with the height its content asks for
# (computeSize), which the frontend grows a node to whenever it resizes it. Media load
# asynchronously, so the page waits until each shows.
LAYOUT_IMAGE = {"filename": "musubi_layout_plot.png", "subfolder": "", "type": "temp"}
LAYOUT_VIDEO = {"filename": "musubi_layout_clip.webm", "subfolder": "", "type": "temp"}
LAYOUT_SQUARE_VIDEO = {"filename": "musubi_layout_square_clip.webm", "subfolder": "", "type": "temp"}
LAYOUT_TEXT = ["a report\nof six\nlines\nas the pack's\nnodes\nwrite them"]
LAYOUT_TRAINING_MESSAGE = "\n".join(f"message line {i}: a new name taken, a resume, where Cancel stopped" for i in range(1, 9))
LAYOUT_OUTPUTS = {
    "MusubiTrainLoRA": {"images": [LAYOUT_IMAGE], "text": LAYOUT_TEXT},
    "MusubiTimestepDistributionPreview": {"images": [LAYOUT_IMAGE]},
    "SaveImage": {"images": [LAYOUT_IMAGE]},
    "LoadImage": {"images": [LAYOUT_IMAGE]},
    "SaveVideo": {"images": [LAYOUT_VIDEO], "animated": [True]},
    "LoadVideo": {"images": [LAYOUT_SQUARE_VIDEO], "animated": [True]},  # a user's clip: any shape; a square one is tall
    "PreviewAny": {"text": LAYOUT_TEXT},
}
_LAYOUT = """
(async () => {
  const api = window.comfyAPI.api.api;
  const outputs = %s;
  const text = %s;
  const message = %s;
  const frames = async (count) => {
    for (let i = 0; i < count; i++) {
      app.canvas.draw(true, true);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  };
  const boxes = {};
  const record = () => {
    for (const node of app.graph._nodes) {
      const [x, y, w, h] = node.getBounding();
      const wanted = node.computeSize()[1] + LiteGraph.NODE_TITLE_HEIGHT;
      const box = [x, y, x + w, y + Math.max(h, wanted)];
      const seen = boxes[node.id]?.box;
      boxes[node.id] = {title: node.title, type: node.type, box: seen
        ? [Math.min(seen[0], box[0]), Math.min(seen[1], box[1]), Math.max(seen[2], box[2]), Math.max(seen[3], box[3])] : box};
    }
  };
  // Every node on screen: the frontend builds output previews only for nodes it draws.
  const overview = async () => {
    await app.extensionManager.command.execute("Comfy.Canvas.FitView");
    await frames(3);
  };
  // Train LoRA at 100 %%: its chart and messages are HTML, laid out only while shown.
  const closeUp = async (node) => {
    for (let i = 0; i < 10 && !(i && app.canvas.ds.scale === 1); i++) {  // a view fit still pending may undo it
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [40 - node.pos[0], 80 - node.pos[1]];
      await frames(3);
    }
  };
  await overview();
  record();
  const trainers = app.graph._nodes.filter((node) => node.type === "MusubiTrainLoRA");
  const unchanged = [];
  if (trainers.length) {
    const prompt = "musubi-layout-" + Math.random().toString(36).slice(2);
    const fetchApi = api.fetchApi;
    api.fetchApi = async (route, options) => route === "/prompt"
      ? new Response(JSON.stringify({prompt_id: prompt, number: 0, node_errors: {}}), {status: 200})
      : fetchApi.call(api, route, options);
    try {
      await api.queuePrompt(0, {output: {}, workflow: app.graph.serialize()});
    } finally {
      api.fetchApi = fetchApi;
    }
    for (const node of trainers) {
      await closeUp(node);
      const before = node.computeSize()[1];
      const event = {node: String(node.id), prompt_id: prompt, client_id: api.clientId};
      api.dispatchCustomEvent("musubi.train.progress", {...event, step: 1, loss: 0.1, lrs: {unet: 1e-4}});
      api.dispatchCustomEvent("musubi.train.status", {...event, kind: "note", text: message});
      api.dispatchCustomEvent("musubi.train.samples", {...event, step: 1,  // a training sample's preview under the chart
        images: [{...outputs.MusubiTrainLoRA.images[0], step: 1, prompt: 1, label: "step 1 · prompt 1"}]});
      await frames(5);
      if (node.computeSize()[1] <= before) unchanged.push(`${node.title} (node ${node.id})`);
      record();
    }
    await overview();
  }
  record();
  const media = [];
  for (const node of app.graph._nodes) {
    const output = outputs[node.type] ?? (String(node.type).startsWith("Musubi") ? {text} : null);
    if (!output) continue;
    if (output.images) media.push(node);
    api.dispatchCustomEvent("executed", {node: String(node.id), display_node: String(node.id), output, prompt_id: "layout"});
  }
  const shown = (node) => (node.widgets || []).some((w) => w.name === "$$canvas-image-preview" || w.name === "video-preview");
  for (let i = 0; i < 200 && !media.every(shown); i++) await frames(1);
  await frames(5);
  record();
  for (const node of trainers) {  // the loss plot under the chart and its messages
    await closeUp(node);
    record();
  }
  const groups = app.graph._groups.map((g) => ({title: g.title, box: [g.pos[0], g.pos[1], g.pos[0] + g.size[0], g.pos[1] + g.size[1]],
                                                 titleHeight: g.titleHeight}));
  return {nodes: boxes, groups, mediaNotShown: media.filter((n) => !shown(n)).map((n) => `${n.title} (node ${n.id})`),
          chartUnchanged: unchanged};
})()
"""


def layout_script() -> str:
    return _LAYOUT % (json.dumps(LAYOUT_OUTPUTS), json.dumps(LAYOUT_TEXT), json.dumps(LAYOUT_TRAINING_MESSAGE))


def write_layout_media(temp_dir: Path) -> None:
    """The picture and the videos the layout check shows in nodes, in the server's temp folder: a
    768×384 plot (Train LoRA's size), a 832×480 clip (what the workflows sample) and a 480×480 one."""
    import av
    import numpy as np
    from PIL import Image

    temp_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (768, 384), (40, 60, 90)).save(temp_dir / LAYOUT_IMAGE["filename"])
    for video, (width, height) in ((LAYOUT_VIDEO, (832, 480)), (LAYOUT_SQUARE_VIDEO, (480, 480))):
        with av.open(str(temp_dir / video["filename"]), mode="w") as container:
            stream = container.add_stream("libvpx", rate=16)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for shade in range(0, 200, 40):
                frame = np.full((height, width, 3), shade, dtype=np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())


def _overlap(a, b) -> tuple[float, float]:
    return min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])


def layout_problems(layout: dict) -> list[str]:
    """Overlapping nodes, nodes outside their group, groups over each other, by title."""
    problems = [f"the simulated output never showed in {name}" for name in layout.get("mediaNotShown", [])]
    problems += [f"the simulated training messages never reached the live chart of {name}" for name in layout.get("chartUnchanged", [])]
    nodes = sorted(layout["nodes"].items(), key=lambda item: int(item[0]))
    groups = layout["groups"]

    def named(node_id, node) -> str:
        return f"'{node['title']}' (node {node_id})"

    for i, (id_a, a) in enumerate(nodes):
        for id_b, b in nodes[i + 1:]:
            width, height = _overlap(a["box"], b["box"])
            if width > 0 and height > 0:
                problems.append(f"{named(id_a, a)} and {named(id_b, b)} overlap by {width:.0f}×{height:.0f} px")
    for node_id, node in nodes:
        x0, y0, x1, y1 = node["box"]
        centre = ((x0 + x1) / 2, (y0 + y1) / 2)
        home = [g for g in groups if g["box"][0] <= centre[0] <= g["box"][2] and g["box"][1] <= centre[1] <= g["box"][3]]
        if not home:
            if node["type"] not in ("Note", "MarkdownNote") and groups:
                problems.append(f"{named(node_id, node)} is in no group")
            for group in groups:
                width, height = _overlap(node["box"], group["box"])
                if width > 0 and height > 0:
                    problems.append(f"{named(node_id, node)} reaches into group '{group['title']}'")
            continue
        gx0, gy0, gx1, gy1 = home[0]["box"]
        if x0 < gx0 or x1 > gx1 or y0 < gy0 + home[0]["titleHeight"] or y1 > gy1:
            problems.append(f"{named(node_id, node)} sticks out of group '{home[0]['title']}' "
                            f"(node {[round(v) for v in node['box']]}, group {[round(v) for v in home[0]['box']]})")
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            width, height = _overlap(a["box"], b["box"])
            if width > 0 and height > 0:
                problems.append(f"groups '{a['title']}' and '{b['title']}' overlap")
    return problems


# The template browser as a user meets it: Comfy.BrowseTemplates opens the dialog, the pack's entry
# under "Custom Nodes" lists its templates (ComfyUI's /workflow_templates) as cards with thumbnails.
# _TEMPLATE_CARDS shows that list: each card's name and whether its thumbnail drew (the dialog loads
# thumbnails lazily, so each card is scrolled into view first). _OPEN_TEMPLATE clicks one card,
# which makes the frontend fetch that template from the server and load it.
_SHOW_PACK_TEMPLATES = """
(async () => {
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  if (!document.querySelector('.p-dialog .template-card')) {
    await app.extensionManager.command.execute('Comfy.BrowseTemplates');
  }
  for (let i = 0; i < 100; i++) {
    const entry = [...document.querySelectorAll('.p-dialog .p-listbox-option')].find((e) => e.innerText.trim() === %s);
    if (entry) {
      entry.click();
      await sleep(500);
      return true;
    }
    await sleep(100);
  }
  return false;
})()
"""
_TEMPLATE_CARDS = """
(async () => {
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const all = () => [...document.querySelectorAll('.p-dialog .template-card')];
  // The dialog shows the first cards and adds more as its list is scrolled to the end.
  for (let count = -1, still = 0; still < 5; ) {
    const cards = all();
    cards[cards.length - 1]?.scrollIntoView();
    await sleep(200);
    still = all().length === count ? still + 1 : 0;
    count = all().length;
  }
  const cards = all();
  const found = [];
  for (const card of cards) {
    card.scrollIntoView();
    let image = null;
    for (let i = 0; i < 50; i++) {
      image = card.querySelector('img');
      if (image && image.complete && image.naturalWidth > 0) break;
      await sleep(100);
    }
    found.push({name: card.innerText.trim().split('\\n')[0], thumbnail: image ? [image.naturalWidth, image.naturalHeight] : null});
  }
  return found;
})()
"""
_OPEN_TEMPLATE = """
(async () => {
  const expected = JSON.stringify(%s);
  const ids = () => JSON.stringify(app.graph._nodes.map((n) => String(n.id)).sort());
  const name = %s;
  const find = () => [...document.querySelectorAll('.p-dialog .template-card')]
      .find((c) => c.innerText.trim().split('\\n')[0] === name);
  for (let i = 0; i < 50 && !find(); i++) {  // more cards appear as the list is scrolled to its end
    const cards = document.querySelectorAll('.p-dialog .template-card');
    cards[cards.length - 1]?.scrollIntoView();
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  const card = find();
  if (!card) return 'no card';
  app.graph.clear();
  card.scrollIntoView();
  card.click();
  for (let i = 0; i < 300 && ids() !== expected; i++) {
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return ids() === expected ? 'loaded' : 'the graph never showed the template: ' + ids();
})()
"""


async def _pack_templates(page: DevToolsPage) -> list[dict]:
    """The pack's templates as the template browser lists them (name, thumbnail size)."""
    await page.evaluate(_CLOSE_DIALOGS)
    assert await page.evaluate(_SHOW_PACK_TEMPLATES % json.dumps(PACK_NAME)), \
        f"the template browser has no entry {PACK_NAME!r} under Custom Nodes"
    return await page.evaluate(_TEMPLATE_CARDS)


async def _load_template(page: DevToolsPage, workflow: dict, name: str) -> dict:
    """Loads one template the way a user does (browse templates, the pack, click its card) and
    inspects the result like ``_load``; ``workflow`` is the file on disk, to compare against."""
    await page.evaluate(_CLOSE_DIALOGS)
    await page.wait_for("document.querySelectorAll('.p-dialog').length === 0", timeout=10)
    assert await page.evaluate(_SHOW_PACK_TEMPLATES % json.dumps(PACK_NAME))
    node_ids = sorted(str(node["id"]) for node in workflow["nodes"])
    loaded = await page.evaluate(_OPEN_TEMPLATE % (json.dumps(node_ids), json.dumps(name)))
    assert loaded == "loaded", f"template {name!r}: {loaded}"
    await asyncio.sleep(0.4)  # the missing-nodes dialog opens asynchronously after loading
    return await page.evaluate(_INSPECT % json.dumps(workflow))


# The node help panel of the frontend (its "nodeHelp" store, shown in the node library sidebar),
# opened for one node definition: what it rendered (first lines) or the error it shows.
_OPEN_HELP = """
(async () => {
  const pinia = document.getElementById('vue-app').__vue_app__.config.globalProperties.$pinia;
  const help = pinia._s.get('nodeHelp');
  const definition = pinia._s.get('nodeDef').nodeDefsByName[%s];
  if (!definition) return {error: 'no node definition'};
  if (!document.querySelector('.node-help-content') && !help.isHelpOpen) {
    await app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library');
  }
  help.closeHelp();
  await new Promise((resolve) => setTimeout(resolve, 50));
  help.openHelp(definition);
  for (let i = 0; i < 100; i++) {
    await new Promise((resolve) => setTimeout(resolve, 100));
    const shown = document.querySelector('.node-help-content');
    if (!help.isLoading && shown && shown.innerText.trim()) {
      return {text: shown.innerText.slice(0, 2000), error: help.error ? String(help.error) : null,
              headings: [...shown.querySelectorAll('h1, h2')].map((h) => h.innerText.trim())};
    }
  }
  return {error: help.error ? String(help.error) : 'the help panel showed nothing'};
})()
"""


async def _open_help_pages(page: DevToolsPage, node_ids: list[str], artifacts: Path) -> dict:
    await page.evaluate(_CLOSE_DIALOGS)
    pages = {}
    for node_id in node_ids:
        pages[node_id] = await page.evaluate(_OPEN_HELP % json.dumps(node_id))
        if node_id == "MusubiTrainLoRA":
            await page.screenshot(artifacts / "help_MusubiTrainLoRA.png")
    return pages


async def _load(page: DevToolsPage, workflow: dict, name: str) -> dict:
    await page.evaluate(_CLOSE_DIALOGS)
    await page.wait_for("document.querySelectorAll('.p-dialog').length === 0", timeout=10)
    await page.evaluate(f"app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(name)})")
    await asyncio.sleep(0.4)  # the missing-nodes dialog opens asynchronously after loading
    return await page.evaluate(_INSPECT % json.dumps(workflow))


@contextlib.asynccontextmanager
async def devtools_page(chromium: str, url: str, profile: Path, width: int = 2000, height: int = 1250,
                        settings: dict | None = None):
    """Headless Chromium with one blank page, spoken to over the DevTools protocol; yields its
    DevToolsPage (not yet navigated). ``settings`` are stored on the ComfyUI server at ``url`` first
    (the first-run template browser is always skipped)."""
    import aiohttp

    process = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        endpoint = None
        for line in process.stderr:
            match = re.search(r"DevTools listening on ws://([\d.]+:\d+)/", line)
            if match:
                endpoint = match.group(1)
                break
        assert endpoint, "Chromium did not open its DevTools port"
        async with aiohttp.ClientSession() as session:
            for setting, value in {"Comfy.TutorialCompleted": True, **(settings or {})}.items():
                async with session.post(f"{url}/api/settings/{setting}", json=value) as answer:
                    assert answer.status == 200
            async with session.get(f"http://{endpoint}/json/list") as answer:
                [target] = [t for t in await answer.json() if t["type"] == "page"][:1]
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as socket:
                page = DevToolsPage(socket)
                reader = asyncio.create_task(page.read())
                try:
                    yield page
                finally:
                    reader.cancel()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.asynccontextmanager
async def frontend_page(chromium: str, url: str, profile: Path, width: int = 2000, height: int = 1250,
                        settings: dict | None = None):
    """The ComfyUI frontend at ``url`` in a ``devtools_page``, ready (node types registered and this
    pack's extensions loaded)."""
    async with devtools_page(chromium, url, profile, width, height, settings) as page:
        for domain in ("Runtime", "Page", "Log"):
            await page.send(f"{domain}.enable")
        await page.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=1, mobile=False)
        await page.send("Page.navigate", url=url)
        await page.wait_for("window.app?.graph && window.LiteGraph && Object.keys(LiteGraph.registered_node_types).length > 50")
        await page.wait_for(f"{json.dumps(sorted(EXTENSIONS))}.every((n) => app.extensions.some((e) => e.name === n))",
                            timeout=20)
        yield page


async def _check_in_browser(chromium: str, url: str, profile: Path, artifacts: Path) -> dict:
    # Draw node text even when a whole workflow is fitted into the screenshot.
    async with frontend_page(chromium, url, profile, settings={"LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1}) as page:
        return await _inspect_workflows(page, artifacts)


async def _inspect_workflows(page: DevToolsPage, artifacts: Path) -> dict:
    report = {"workflows": {}, "layout": {}, "ready_at": time.monotonic()}
    report["templates"] = await _pack_templates(page)
    await page.screenshot(artifacts / "template_browser.png")
    listed = {card["name"] for card in report["templates"]}
    for path in UI_WORKFLOWS:
        if path.stem not in listed:
            continue  # the template test names it
        workflow = json.loads(path.read_text())
        report["workflows"][path.stem] = await _load_template(page, workflow, path.stem)
        await page.evaluate(_CLOSE_DIALOGS)
        await page.evaluate("app.extensionManager?.command?.execute?.('Comfy.Canvas.FitView')")
        await asyncio.sleep(0.3)
        await page.screenshot(artifacts / f"{path.stem}.png")
        report["layout"][path.stem] = await page.evaluate(layout_script())
    report["extension_errors"] = page.errors_from(f"/extensions/{PACK_NAME}/")
    # The detectors themselves: a graph with an unknown node type must raise the missing-nodes
    # dialog, and both controls must be named by the check for nodes the frontend cannot build.
    broken = json.loads(UI_WORKFLOWS[0].read_text())
    broken["nodes"].append({**broken["nodes"][0], "id": 9999, "type": UNKNOWN_TYPE, "inputs": [], "outputs": []})
    report["control"] = await _load(page, broken, "broken.json")
    await page.evaluate(_REGISTER_THROWING_TYPE % (THROWING_TYPE, json.dumps(THROWING_TYPE), THROWING_TYPE))
    throwing = json.loads(UI_WORKFLOWS[0].read_text())
    throwing["nodes"].append({**throwing["nodes"][0], "id": 9998, "type": THROWING_TYPE, "inputs": [], "outputs": []})
    report["throwing_control"] = await _load(page, throwing, "throwing.json")
    await page.evaluate(f"LiteGraph.unregisterNodeType({json.dumps(THROWING_TYPE)})")
    pack_nodes = await page.evaluate("Object.keys(LiteGraph.registered_node_types).filter((t) => t.startsWith('Musubi'))")
    report["help"] = await _open_help_pages(page, sorted(pack_nodes), artifacts)
    return report


@pytest.fixture(scope="module")
def browser_artifacts(tmp_path_factory) -> Path:
    root = os.environ.get("MUSUBI_TEST_ARTIFACTS")
    folder = Path(root) / "browser" if root else tmp_path_factory.mktemp("browser")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser_report(request, browser_artifacts, tmp_path_factory) -> dict:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(BROWSER_SKIP_REASON)
    pytest.importorskip("aiohttp", reason="aiohttp (a ComfyUI requirement) is needed to speak to Chromium")
    comfy = request.getfixturevalue("comfy")  # only started once Chromium is known to be there
    print(f"browser screenshots: {browser_artifacts}")
    write_layout_media(comfy.base_dir / "temp")
    # What the server holds now decides which embedded models the frontend reports missing.
    folders = {model["directory"] for path in UI_WORKFLOWS for model in embedded_models(json.loads(path.read_text()))}
    server_models = {folder: comfy.get_json(f"/models/{folder}") for folder in sorted(folders)}
    started = time.monotonic()
    report = asyncio.run(_check_in_browser(chromium, comfy.url, tmp_path_factory.mktemp("chromium-profile"), browser_artifacts))
    report["seconds"] = time.monotonic() - started
    report["object_info"] = comfy.object_info()
    report["startup_log"] = comfy.startup_log
    report["server_models"] = server_models
    return report


def embedded_models(workflow: dict) -> list[dict]:
    """The download entries ({name, url, directory}) the workflow's nodes carry in properties.models."""
    return [model for node in workflow["nodes"] for model in node.get("properties", {}).get("models", [])]


def why_not_built(node: dict) -> str | None:
    """Why the frontend could not build one node of a loaded workflow (``None``: it could)."""
    reasons = []
    loaded = node["loaded"]
    if not node["registered"]:
        reasons.append("its type is not registered in the frontend (LiteGraph.registered_node_types; "
                       "the server's /object_info does not offer it)")
    elif node["created"] is not None and node["created"] != "a node":
        reasons.append(f"LiteGraph.createNode gives {node['created']}")
    if loaded is None:
        reasons.append("the loaded graph has no node with this id")
    else:
        if loaded["placeholder"] and loaded["hasErrors"]:
            reasons.append("it was loaded as the frontend's has_errors placeholder for a node it cannot create")
        elif loaded["placeholder"]:
            reasons.append("it was loaded as the frontend's placeholder for a node it cannot create")
        elif loaded["hasErrors"]:
            reasons.append("it is marked has_errors after loading")
        if not loaded["virtual"] and not loaded["comfyClass"] and not loaded["placeholder"]:
            reasons.append("it has no comfyClass, so its API prompt would have no class_type")
    return "; ".join(reasons) or None


def unbuilt_nodes_message(loaded_workflows: dict[str, list[dict]], startup_log: str = "") -> str | None:
    """One message naming every node the frontend could not build (``None`` when there is none).

    ``loaded_workflows`` maps a workflow's name to the page's ``built`` list for it; lines of
    ComfyUI's start-up log about node modules that failed to import are quoted at the end.
    """
    lines, types = [], set()
    for name, nodes in loaded_workflows.items():
        for node in nodes:
            why = why_not_built(node)
            if why:
                lines.append(f"  {name}: node {node['id']}, {node['type']}, {why}")
                types.add(node["type"])
    if not lines:
        return None
    message = [f"the ComfyUI frontend cannot build {len(lines)} node(s) of the shipped workflows:", *lines]
    core = sorted(t for t in types if not t.startswith("Musubi"))
    if core:
        message.append(
            f"Core ComfyUI nodes among them ({', '.join(core)}): ComfyUI's optional requirements "
            f"({OPTIONAL_REQUIREMENTS}) may be missing from the Python that runs the server; without them "
            "core nodes such as UpscaleModelLoader do not load and loaders such as VAELoader cannot be "
            "built in the frontend. Install ComfyUI's requirements.txt into that Python."
        )
    ours = sorted(types - set(core))
    if ours:
        message.append(
            f"This pack's nodes among them ({', '.join(ours)}): the pack may have failed to import "
            "(see ComfyUI's log), or the workflow names a node the pack no longer has."
        )
    failures = [line.strip() for line in startup_log.splitlines() if "Cannot import" in line or "IMPORT FAILED" in line]
    if failures:
        message += ["ComfyUI's log reports:", *(f"  {line}" for line in failures[:20])]
    return "\n".join(message)


def _declared_inputs_only(prompt: dict, object_info: dict) -> dict:
    """The prompt without inputs its node does not declare: the frontend also sends the values of
    its own display widgets (PreviewAny's ``preview``), which the server ignores."""
    result = {}
    for node_id, node in prompt.items():
        declared = object_info[node["class_type"]]["input"]
        names = {*declared.get("required", {}), *declared.get("optional", {})}
        result[node_id] = {**node, "inputs": {k: v for k, v in node["inputs"].items() if k in names}}
    return result


def _differences(queued: dict, twin: dict) -> list[str]:
    found = [f"node {i}: only in the frontend's prompt" for i in queued.keys() - twin.keys()]
    found += [f"node {i}: only in the API twin" for i in twin.keys() - queued.keys()]
    for node_id in queued.keys() & twin.keys():
        ours, theirs = queued[node_id]["inputs"], twin[node_id]["inputs"]
        for name in ours.keys() | theirs.keys():
            if ours.get(name, "<absent>") != theirs.get(name, "<absent>"):
                found.append(f"node {node_id} ({twin[node_id]['class_type']}).{name}: frontend "
                             f"{ours.get(name, '<absent>')!r}, twin {theirs.get(name, '<absent>')!r}")
    return found


def test_the_unbuilt_node_message_names_an_unknown_type_and_points_core_loaders_at_optional_requirements():
    registered = {"registered": True, "created": None,
                  "loaded": {"type": "VAELoader", "hasErrors": False, "placeholder": False, "comfyClass": "VAELoader", "virtual": False}}
    placeholder = {"hasErrors": True, "placeholder": True, "comfyClass": None, "virtual": False}
    graph = [
        {"id": 3, "type": "VAELoader", **registered},
        {"id": 4, "type": "Note", "registered": True, "created": None,
         "loaded": {"type": "Note", "hasErrors": False, "placeholder": False, "comfyClass": None, "virtual": True}},
        {"id": 7, "type": UNKNOWN_TYPE, "registered": False, "created": None, "loaded": {"type": UNKNOWN_TYPE, **placeholder}},
    ]
    assert unbuilt_nodes_message({"demo": graph[:2]}) is None
    message = unbuilt_nodes_message({"demo": graph})
    assert f"demo: node 7, {UNKNOWN_TYPE}, its type is not registered" in message
    assert "has_errors placeholder" in message
    assert "node 3" not in message and "node 4" not in message
    assert "optional requirements" not in message

    upscaler = {"id": 12, "type": "UpscaleModelLoader", "registered": False, "created": None,
                "loaded": {"type": "UpscaleModelLoader", **placeholder}}
    thrower = {"id": 13, "type": THROWING_TYPE, "registered": True, "created": "nothing (its constructor throws Error: no)",
               "loaded": {"type": THROWING_TYPE, **placeholder}}
    log = "Cannot import /c/comfy_extras/nodes_upscale_model.py module for custom nodes: No module named 'spandrel'"
    message = unbuilt_nodes_message({"demo": graph[:2], "upscale": [upscaler], "other": [thrower]}, log)
    assert message.splitlines()[0].endswith("2 node(s) of the shipped workflows:")
    assert "upscale: node 12, UpscaleModelLoader, its type is not registered" in message
    assert f"other: node 13, {THROWING_TYPE}, LiteGraph.createNode gives nothing (its constructor throws" in message
    assert f"optional requirements ({OPTIONAL_REQUIREMENTS})" in message and "No module named 'spandrel'" in message


@pytest.mark.parametrize("control, node_id, node_type, why", [
    ("control", 9999, UNKNOWN_TYPE, "its type is not registered"),
    ("throwing_control", 9998, THROWING_TYPE, "LiteGraph.createNode gives nothing (its constructor throws"),
], ids=["unknown type", "constructor throws"])
@pytest.mark.comfyui
@pytest.mark.browser
def test_unbuilt_node_detector_fires_on_the_controls(browser_report, control, node_id, node_type, why):
    message = unbuilt_nodes_message({control: browser_report[control]["built"]})
    assert message is not None and f"{control}: node {node_id}, {node_type}, {why}" in message, message
    assert "placeholder" in message, message
    # ... and only that node: the rest of the workflow it was added to loads fine.
    assert sum(f"{control}: node " in line for line in message.splitlines()) == 1, message


@pytest.mark.comfyui
@pytest.mark.browser
def test_missing_node_detector_fires_on_an_unknown_node(browser_report):
    control = browser_report["control"]
    assert [node["type"] for node in control["built"] if not node["registered"]] == [UNKNOWN_TYPE]
    assert any(UNKNOWN_TYPE in text for text in control["dialogs"]), control["dialogs"]


@pytest.mark.comfyui
@pytest.mark.browser
def test_the_template_browser_lists_every_ui_workflow_with_its_thumbnail(browser_report):
    """Only loadable workflows are templates (no API twins), each with a thumbnail that draws."""
    cards = {card["name"]: card["thumbnail"] for card in browser_report["templates"]}
    assert sorted(cards) == sorted(path.stem for path in UI_WORKFLOWS)
    blank = [name for name, size in cards.items() if not size or size[0] < 200]
    assert blank == [], f"templates whose thumbnail does not draw: {blank}"


@pytest.mark.comfyui
@pytest.mark.browser
def test_the_help_panel_shows_every_pack_nodes_page(browser_report):
    """The frontend's node help opens each pack node's page (web/docs/<NodeId>.md) rendered,
    titled with the node's display name, with its Inputs and Outputs sections."""
    info = browser_report["object_info"]
    pack_nodes = sorted(name for name in info if name.startswith("Musubi"))
    assert sorted(browser_report["help"]) == pack_nodes
    problems = []
    for node_id, shown in browser_report["help"].items():
        if shown.get("error") or not shown.get("headings"):
            problems.append(f"{node_id}: {shown.get('error') or 'no headings rendered'}")
            continue
        display_name = info[node_id]["display_name"]
        if shown["headings"][0] != display_name:
            problems.append(f"{node_id}: the panel's title is {shown['headings'][0]!r}, not {display_name!r}")
        missing = [title for title in ("Inputs", "Outputs") if title not in shown["headings"]]
        if missing:
            problems.append(f"{node_id}: no {', '.join(missing)} section rendered")
    assert problems == []


@pytest.mark.comfyui
@pytest.mark.browser
def test_the_frontend_builds_every_node_of_every_workflow(browser_report):
    loaded = {name: report["built"] for name, report in browser_report["workflows"].items()}
    message = unbuilt_nodes_message(loaded, browser_report["startup_log"])
    if message:
        pytest.fail(message, pytrace=False)


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
@pytest.mark.comfyui
@pytest.mark.browser
def test_workflow_loads_without_missing_nodes_and_queues_its_api_twin(browser_report, browser_artifacts, path):
    loaded = browser_report["workflows"][path.stem]
    workflow = json.loads(path.read_text())
    # Nodes the frontend could not build have no class_type in the prompt: name them first.
    message = unbuilt_nodes_message({path.stem: loaded["built"]}, browser_report["startup_log"])
    if message:
        pytest.fail(message, pytrace=False)
    assert loaded["dialogs"] == [], "a dialog (other than the missing-models one) opened on loading"
    assert loaded["errorToasts"] == []
    assert loaded["nodeCount"] == len(workflow["nodes"])
    queued = _declared_inputs_only(loaded["prompt"], browser_report["object_info"])
    twin = json.loads(api_twin(path).read_text())
    assert _differences(queued, twin) == []
    assert (browser_artifacts / f"{path.stem}.png").stat().st_size > 10_000


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
@pytest.mark.comfyui
@pytest.mark.browser
def test_missing_models_dialog_offers_exactly_the_missing_files(browser_report, path):
    """The frontend reads each loader's properties.models: every file the server lacks is listed
    once, as "folder / name", with a download (no unknown folder, disallowed source or suffix)."""
    loaded = browser_report["workflows"][path.stem]
    server = browser_report["server_models"]
    missing = {model["url"]: f"{model['directory']} / {model['name']}"
               for model in embedded_models(json.loads(path.read_text())) if model["name"] not in server[model["directory"]]}
    listed = loaded["missingModels"]
    assert loaded["missingModelsDialogs"] == (1 if missing else 0), listed
    assert sorted(next((label for label in missing.values() if label in entry), entry) for entry in listed) == sorted(missing.values())
    errors = [entry for entry in listed if re.search(r"Invalid directory|not allowed|Only allowed suffixes", entry)]
    assert errors == []


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
@pytest.mark.comfyui
@pytest.mark.browser
def test_nodes_never_overlap_and_stay_in_their_groups(browser_report, path):
    problems = layout_problems(browser_report["layout"][path.stem])
    if problems:
        pytest.fail(f"{path.stem}, as the frontend lays it out (before, during and after a run):\n  "
                    + "\n  ".join(problems), pytrace=False)


def test_the_layout_check_names_overlaps_strays_and_nodes_outside_groups():
    group = {"title": "1 · Models", "box": [0, 0, 500, 400], "titleHeight": 33.6}
    def node(title, box, type_="VAELoader"):
        return {"title": title, "type": type_, "box": box}
    tidy = {"nodes": {"1": node("Load VAE", [20, 50, 400, 150]), "2": node("Load CLIP", [20, 180, 400, 300]),
                      "3": node("Read me", [600, 0, 900, 300], "Note")}, "groups": [group]}
    assert layout_problems(tidy) == []
    messy = {"nodes": {"1": node("Load VAE", [20, 50, 400, 200]), "2": node("Load CLIP", [20, 180, 400, 420]),
                       "3": node("Read me", [450, 0, 900, 300], "Note"), "4": node("Save Video", [1000, 0, 1300, 200]),
                       "5": node("Train LoRA", [20, 10, 400, 40])},
             "groups": [group, {"title": "2 · Data", "box": [480, 350, 700, 500], "titleHeight": 33.6}],
             "mediaNotShown": ["Save Video (node 4)"]}
    problems = layout_problems(messy)
    assert "the simulated output never showed in Save Video (node 4)" in problems
    assert "'Load VAE' (node 1) and 'Load CLIP' (node 2) overlap by 380×20 px" in problems
    assert any(p.startswith("'Load CLIP' (node 2) sticks out of group '1 · Models'") for p in problems)
    assert any(p.startswith("'Train LoRA' (node 5) sticks out of group '1 · Models'") for p in problems)  # under the title bar
    assert "'Read me' (node 3) reaches into group '1 · Models'" in problems
    assert "'Save Video' (node 4) is in no group" in problems
    assert "groups '1 · Models' and '2 · Data' overlap" in problems


@pytest.mark.comfyui
@pytest.mark.browser
def test_pack_extensions_add_their_widgets_without_errors(browser_report):
    assert browser_report["extension_errors"] == []
    ema = browser_report["workflows"]["post_hoc_ema_merge"]["widgets"]
    assert any(node["type"] == "MusubiPostHocEMAMerge" and "pick checkpoints…" in node["names"] for node in ema.values())
    trainers = [node for name, report in browser_report["workflows"].items() if name.endswith("_training")
                for node in report["widgets"].values() if node["type"] == "MusubiTrainLoRA"]
    assert trainers and all("loss_curve" in node["names"] for node in trainers)
