"""The real ComfyUI frontend, in headless Chromium, loads every shipped workflow.

Chromium (Debian's ``chromium`` package, or ``$MUSUBI_CHROMIUM``) is driven over the Chrome
DevTools Protocol with aiohttp, which ComfyUI itself needs — no browser download and no extra
Python package. For each UI workflow the page calls ``app.loadGraphData`` and the test checks
that no "missing nodes" dialog or error toast appears, that every node type is registered, and
that the frontend's own ``graphToPrompt`` gives exactly the workflow's ``.api.json`` twin. It
also checks that this pack's web extensions register and add their widgets without errors.

Screenshots (one per workflow) go to ``$MUSUBI_TEST_ARTIFACTS/browser/`` when that variable is
set, else to pytest's temporary folder; the folder is printed in the test's output.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from comfy_server import PACK_NAME, REPO_ROOT

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

BROWSER_SKIP_REASON = (
    "headless Chromium not found: install it (Debian: apt-get install -y chromium) or point "
    "MUSUBI_CHROMIUM at a Chromium/Chrome binary to run the browser test"
)
WORKFLOWS = REPO_ROOT / "workflows"
UI_WORKFLOWS = sorted(path for path in WORKFLOWS.glob("*.json") if not path.name.endswith(".api.json"))
EXTENSIONS = {"musubi.PostHocEMAMerge", "musubi.TrainLossCurve"}


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


# What the page reports after loading a graph: open dialogs, error toasts, the node types it does
# not know, and the API prompt the frontend itself would queue.
_INSPECT = """
(async () => {
  const visible = (selector) => [...document.querySelectorAll(selector)]
      .filter((e) => e.offsetParent !== null).map((e) => e.innerText.slice(0, 400));
  const workflow = %s;
  const unknown = workflow.nodes.map((n) => n.type).filter((t) => !(t in LiteGraph.registered_node_types));
  const prompt = (await app.graphToPrompt()).output;
  for (const node of Object.values(prompt)) delete node._meta;
  const widgets = {};
  for (const node of app.graph._nodes) widgets[node.id] = {type: node.type, names: (node.widgets || []).map((w) => w.name)};
  return {dialogs: visible(".p-dialog"), errorToasts: visible(".p-toast-message-error"), unknown,
          nodeCount: app.graph._nodes.length, prompt, widgets};
})()
"""

_CLOSE_DIALOGS = """
document.querySelectorAll('.p-dialog-close-button, .p-toast-close-button').forEach((b) => b.click())
"""


async def _load(page: DevToolsPage, workflow: dict, name: str) -> dict:
    await page.evaluate(_CLOSE_DIALOGS)
    await page.wait_for("document.querySelectorAll('.p-dialog').length === 0", timeout=10)
    await page.evaluate(f"app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(name)})")
    await asyncio.sleep(0.4)  # the missing-nodes dialog opens asynchronously after loading
    return await page.evaluate(_INSPECT % json.dumps(workflow))


async def _check_in_browser(chromium: str, url: str, profile: Path, artifacts: Path) -> dict:
    import aiohttp

    process = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=2000,1250", "about:blank"],
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
            # Skip the first-run template browser, which would cover the canvas, and draw node
            # text even when a whole workflow is fitted into the screenshot.
            for setting, value in (("Comfy.TutorialCompleted", True), ("LiteGraph.Canvas.LowQualityRenderingZoomThreshold", 0.1)):
                async with session.post(f"{url}/api/settings/{setting}", json=value) as answer:
                    assert answer.status == 200
            async with session.get(f"http://{endpoint}/json/list") as answer:
                [target] = [t for t in await answer.json() if t["type"] == "page"][:1]
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as socket:
                page = DevToolsPage(socket)
                reader = asyncio.create_task(page.read())
                try:
                    return await _inspect_workflows(page, url, artifacts)
                finally:
                    reader.cancel()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _inspect_workflows(page: DevToolsPage, url: str, artifacts: Path) -> dict:
    for domain in ("Runtime", "Page", "Log"):
        await page.send(f"{domain}.enable")
    await page.send("Emulation.setDeviceMetricsOverride", width=2000, height=1250, deviceScaleFactor=1, mobile=False)
    await page.send("Page.navigate", url=url)
    await page.wait_for("window.app?.graph && window.LiteGraph && Object.keys(LiteGraph.registered_node_types).length > 50")
    await page.wait_for(f"{json.dumps(sorted(EXTENSIONS))}.every((n) => app.extensions.some((e) => e.name === n))", timeout=20)
    report = {"workflows": {}, "ready_at": time.monotonic()}
    for path in UI_WORKFLOWS:
        workflow = json.loads(path.read_text())
        report["workflows"][path.stem] = await _load(page, workflow, path.name)
        await page.evaluate("app.extensionManager?.command?.execute?.('Comfy.Canvas.FitView')")
        await asyncio.sleep(0.3)
        await page.screenshot(artifacts / f"{path.stem}.png")
    # The detector itself: a graph with an unknown node type must raise the missing-nodes dialog.
    broken = json.loads(UI_WORKFLOWS[0].read_text())
    broken["nodes"].append({**broken["nodes"][0], "id": 9999, "type": "MusubiNoSuchNode", "inputs": [], "outputs": []})
    report["control"] = await _load(page, broken, "broken.json")
    report["extension_errors"] = page.errors_from(f"/extensions/{PACK_NAME}/")
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
    started = time.monotonic()
    report = asyncio.run(_check_in_browser(chromium, comfy.url, tmp_path_factory.mktemp("chromium-profile"), browser_artifacts))
    report["seconds"] = time.monotonic() - started
    report["object_info"] = comfy.object_info()
    return report


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


def test_missing_node_detector_fires_on_an_unknown_node(browser_report):
    control = browser_report["control"]
    assert control["unknown"] == ["MusubiNoSuchNode"]
    assert any("MusubiNoSuchNode" in text for text in control["dialogs"]), control["dialogs"]


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_without_missing_nodes_and_queues_its_api_twin(browser_report, browser_artifacts, path):
    loaded = browser_report["workflows"][path.stem]
    workflow = json.loads(path.read_text())
    assert loaded["unknown"] == []
    assert loaded["dialogs"] == [], "a dialog opened on loading"
    assert loaded["errorToasts"] == []
    assert loaded["nodeCount"] == len(workflow["nodes"])
    queued = _declared_inputs_only(loaded["prompt"], browser_report["object_info"])
    twin = json.loads(path.with_name(path.stem + ".api.json").read_text())
    assert _differences(queued, twin) == []
    assert (browser_artifacts / f"{path.stem}.png").stat().st_size > 10_000


def test_pack_extensions_add_their_widgets_without_errors(browser_report):
    assert browser_report["extension_errors"] == []
    ema = browser_report["workflows"]["post_hoc_ema_merge"]["widgets"]
    assert any(node["type"] == "MusubiPostHocEMAMerge" and "pick checkpoints…" in node["names"] for node in ema.values())
    trainers = [node for name, report in browser_report["workflows"].items() if name.endswith("_training")
                for node in report["widgets"].values() if node["type"] == "MusubiTrainLoRA"]
    assert trainers and all("loss_curve" in node["names"] for node in trainers)
