"""Render ``workflows/<name>.jpg``: the thumbnail ComfyUI's template browser shows for each workflow.

    python3 tests/render_thumbnails.py            # every UI workflow in workflows/
    python3 tests/render_thumbnails.py wan21_t2v_training calibrate_magcache

It starts ComfyUI (``$COMFYUI_PATH`` or ``~/comfy/ComfyUI``) with this pack in a temporary base
folder and the system's headless Chromium (``$MUSUBI_CHROMIUM``, else ``chromium`` on the PATH),
the way ``tests/test_browser.py`` does; loads each workflow with ``app.loadGraphData``, hides the
interface (focus mode, no minimap, canvas menu or missing-models dialog), fits the graph's nodes
and groups into a view of the graph's own proportions (between 1:1 and ``WIDEST``:1), takes a
screenshot and writes a small JPEG (``THUMBNAIL_WIDTH`` wide, at most ``THUMBNAIL_MAX_BYTES``).
The JPEG's comment records the SHA-256 of the workflow file it shows; ``tests/test_workflows.py``
fails when a workflow changed after its thumbnail was rendered.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_server import ComfyServer, find_comfyui
from test_browser import UI_WORKFLOWS, WORKFLOWS, find_chromium, frontend_page

THUMBNAIL_WIDTH, THUMBNAIL_MAX_BYTES = 512, 100_000
VIEW_WIDTH, WIDEST = 1600, 2.0  # the template browser shows the picture whole in a square card
MARGIN = 24  # graph units around the nodes and groups
SETTINGS = {
    "Comfy.Workflow.ShowMissingModelsWarning": False,  # the files are missing here: no dialog over the canvas
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1,  # titles and widgets drawn even when fitted
}

_SHOW = """
(async () => {
  await app.loadGraphData(%s, true, true, %s);
  const frames = async (count) => {
    for (let i = 0; i < count; i++) {
      app.canvas.draw(true, true);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  };
  const [x0, y0, x1, y1] = %s;
  await frames(5);  // the canvas takes the new window size
  // Fit [x0, y0, x1, y1] into the canvas, again until it holds: the view fit that loading schedules may come later.
  for (let i = 0, scale = 0; i < 10 && app.canvas.ds.scale !== scale; i++) {
    const [width, height] = [app.canvas.canvas.clientWidth, app.canvas.canvas.clientHeight];
    scale = Math.min(width / (x1 - x0), height / (y1 - y0));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [(width / scale - (x1 - x0)) / 2 - x0, (height / scale - (y1 - y0)) / 2 - y0];
    await frames(5);
  }
  app.canvas.deselectAll?.();
  await frames(5);
})()
"""


def graph_bounds(workflow: dict) -> list[float]:
    """[x0, y0, x1, y1] around every node (title bar included) and group, plus MARGIN."""
    boxes = [[n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]] for n in workflow["nodes"]]
    boxes += [[x, y, x + w, y + h] for x, y, w, h in (g["bounding"] for g in workflow.get("groups", []))]
    return [min(b[0] for b in boxes) - MARGIN, min(b[1] for b in boxes) - MARGIN,
            max(b[2] for b in boxes) + MARGIN, max(b[3] for b in boxes) + MARGIN]


def workflow_digest(path: Path) -> str:
    """What a thumbnail records of the workflow it shows (its JPEG comment)."""
    return "musubi-workflow-sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def jpeg(png: bytes, digest: str) -> bytes:
    """The screenshot as a THUMBNAIL_WIDTH-wide JPEG whose comment is ``digest``, under THUMBNAIL_MAX_BYTES."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as shot:
        image = shot.convert("RGB")
    height = round(image.height * THUMBNAIL_WIDTH / image.width)
    image = image.resize((THUMBNAIL_WIDTH, height), Image.Resampling.LANCZOS)
    for quality in (85, 80, 75, 70, 60, 50, 40):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality, optimize=True, progressive=True, comment=digest.encode())
        if buffer.tell() <= THUMBNAIL_MAX_BYTES:
            return buffer.getvalue()
    raise RuntimeError(f"no JPEG quality keeps the thumbnail under {THUMBNAIL_MAX_BYTES} bytes")


async def render(paths: list[Path], chromium: str, url: str, profile: Path) -> None:
    async with frontend_page(chromium, url, profile, VIEW_WIDTH, VIEW_WIDTH, settings=SETTINGS) as page:
        await page.evaluate("app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
        await page.evaluate("document.head.append(Object.assign(document.createElement('style'), "
                            "{textContent: '.comfy-menu-hamburger { display: none !important; }'}))")  # focus mode's way out
        await page.wait_for("document.querySelectorAll('.p-dialog').length === 0", timeout=10)
        for path in paths:
            workflow = json.loads(path.read_text())
            bounds = graph_bounds(workflow)
            aspect = min(max((bounds[2] - bounds[0]) / (bounds[3] - bounds[1]), 1.0), WIDEST)
            await page.send("Emulation.setDeviceMetricsOverride", width=VIEW_WIDTH, height=round(VIEW_WIDTH / aspect),
                            deviceScaleFactor=1, mobile=False)
            await page.evaluate(_SHOW % (json.dumps(workflow), json.dumps(path.name), json.dumps(bounds)))
            shot = await page.send("Page.captureScreenshot", format="png")
            target = path.with_suffix(".jpg")
            target.write_bytes(jpeg(base64.b64decode(shot["data"]), workflow_digest(path)))
            print(f"{target.relative_to(WORKFLOWS.parent)}: {target.stat().st_size // 1024} KB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (file stems in workflows/); all when none")
    args = parser.parse_args()
    known = {path.stem: path for path in UI_WORKFLOWS}
    unknown = sorted(set(args.names) - set(known))
    if unknown:
        parser.error(f"no such workflow in workflows/: {', '.join(unknown)}")
    paths = [known[name] for name in args.names] or UI_WORKFLOWS
    comfy_path, chromium = find_comfyui(), find_chromium()
    if comfy_path is None or chromium is None:
        print("needs ComfyUI (COMFYUI_PATH or ~/comfy/ComfyUI) and Chromium (chromium, or MUSUBI_CHROMIUM)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="musubi-thumbnails-") as base:
        server = ComfyServer(comfy_path, Path(base)).start()
        try:
            asyncio.run(render(paths, chromium, server.url, Path(base) / "chromium-profile"))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
