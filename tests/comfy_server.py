"""Drive a real ComfyUI server from tests: start it, post API-format graphs, read results.

The server runs ``main.py --cpu`` on 127.0.0.1 with its own temporary base directory,
this pack linked into ``custom_nodes`` and every other custom node disabled.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import safetensors.torch
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "musubi-lora-trainer"


def find_comfyui() -> Path | None:
    """ComfyUI's source folder from $COMFYUI_PATH or ~/comfy/ComfyUI, if it is there."""
    candidates = [os.environ.get("COMFYUI_PATH"), os.path.expanduser("~/comfy/ComfyUI")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "main.py").is_file():
            return Path(candidate).resolve()
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyExecutionError(RuntimeError):
    """A prompt that ComfyUI rejected or that failed while executing."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class ComfyServer:
    def __init__(self, comfy_path: Path, base_dir: Path, extra_args: tuple[str, ...] = ()):
        self.comfy_path = Path(comfy_path)
        self.base_dir = Path(base_dir)
        self.extra_args = extra_args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "comfyui.log"
        self.process: subprocess.Popen | None = None
        self.startup_log = ""
        self.client_id = uuid.uuid4().hex

    # --- folders -------------------------------------------------------------------
    def models_dir(self, folder: str) -> Path:
        path = self.base_dir / "models" / folder
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    def saved_latent(self, folder: str, prefix: str) -> torch.Tensor:
        """The one latent core SaveLatent wrote as ``<folder>/<prefix>_NNNNN_.latent``."""
        [path] = sorted((self.output_dir / folder).glob(f"{prefix}_[0-9]*_.latent"))
        return safetensors.torch.load_file(path)["latent_tensor"]

    # --- life cycle ----------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        for folder in ("custom_nodes", "input", "output", "temp", "user"):
            (self.base_dir / folder).mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        command = [
            sys.executable, "main.py", "--cpu",
            "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir),
            "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_NAME,
            "--disable-auto-launch", "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}",
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            command, cwd=self.comfy_path, stdout=self._log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at start-up:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                self.startup_log = self.log_text()
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        self.process = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # --- HTTP ----------------------------------------------------------------------
    def get_json(self, route: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as response:
            return json.loads(response.read())

    def post_json(self, route: str, payload: dict, timeout: float = 30):
        request = urllib.request.Request(
            self.url + route, data=json.dumps(payload).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            body = error.read()
            raise ComfyExecutionError(f"POST {route} → HTTP {error.code}: {body[:4000]!r}", _json_or_none(body)) from None
        return json.loads(body) if body else None

    def object_info(self, node: str | None = None) -> dict:
        return self.get_json("/object_info" + (f"/{node}" if node else ""))

    # --- prompts -------------------------------------------------------------------
    def queue(self, graph: dict) -> str:
        answer = self.post_json("/prompt", {"prompt": graph, "client_id": self.client_id})
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """Poll /history until the prompt finished; return its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") == "error":
                    return entry
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 300) -> dict:
        """Queue a graph, wait, and return ``{node_id: ui_output}``; raise on any error."""
        entry = self.wait(self.queue(graph), timeout)
        status = entry.get("status", {})
        if status.get("status_str") == "error":
            raise ComfyExecutionError(_execution_error_text(status), status)
        return entry.get("outputs", {})

    def run_error(self, graph: dict, timeout: float = 300) -> str:
        """Run a graph that must fail; return the error text that ComfyUI reported."""
        try:
            outputs = self.run(graph, timeout)
        except ComfyExecutionError as error:
            return str(error)
        raise AssertionError(f"the graph was expected to fail but returned {outputs}")

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    # --- websocket clients ---------------------------------------------------------
    def listen(self, client_id: str | None = None) -> "EventListener":
        """A websocket client of this server (like a browser tab) that keeps every message it gets."""
        return EventListener(self.url, client_id)

    def queue_from(self, client_id: str | None, graph: dict) -> str:
        """Queue a graph as the client ``client_id`` does (None: no client id, as an API script may)."""
        payload = {"prompt": graph} if client_id is None else {"prompt": graph, "client_id": client_id}
        return self.post_json("/prompt", payload)["prompt_id"]


class EventListener:
    """One websocket client with its own clientId, reading in a thread: ``events(kind)`` are the
    ``data`` of the JSON messages of that type received so far. Binary messages (previews) are
    skipped. Use as a context manager, or call ``close``."""

    def __init__(self, url: str, client_id: str | None = None, timeout: float = 30):
        self.client_id = client_id or uuid.uuid4().hex
        self.messages: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._error: BaseException | None = None
        self._socket = None
        self._loop = asyncio.new_event_loop()
        ws_url = url.replace("http://", "ws://", 1) + f"/ws?clientId={self.client_id}"
        self._thread = threading.Thread(target=self._run, args=(ws_url,), daemon=True)
        self._thread.start()
        if not self._connected.wait(timeout):
            raise TimeoutError(f"no websocket connection to {ws_url}: {self._error!r}")
        if self._error is not None:
            raise RuntimeError(f"websocket {ws_url}: {self._error!r}")

    def _run(self, ws_url: str) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._read(ws_url))
        except BaseException as error:  # noqa: BLE001 — reported to the waiting test
            self._error = error
            self._connected.set()
        finally:
            self._loop.close()

    async def _read(self, ws_url: str) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(ws_url, max_msg_size=0) as socket_:
                self._socket = socket_
                async for message in socket_:
                    if message.type != aiohttp.WSMsgType.TEXT:
                        continue
                    data = json.loads(message.data)
                    with self._lock:
                        self.messages.append((data.get("type"), data.get("data")))
                    if data.get("type") == "status":
                        self._connected.set()  # the server now addresses this client id

    def events(self, kind: str | None = None, prefix: str | None = None) -> list[dict]:
        with self._lock:
            return [data for type_, data in self.messages
                    if (kind is None or type_ == kind) and (prefix is None or str(type_).startswith(prefix))]

    def types(self) -> list[str]:
        with self._lock:
            return [type_ for type_, _ in self.messages]

    def wait_for(self, predicate, timeout: float = 120, what: str = "a message") -> dict:
        """The first message ``data`` for which ``predicate(type, data)`` holds, waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for type_, data in self.messages:
                    if predicate(type_, data):
                        return data
            time.sleep(0.05)
        raise TimeoutError(f"client {self.client_id} never received {what}; it got {self.types()[-20:]}")

    def close(self) -> None:
        if self._socket is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._socket.close(), self._loop).result(10)
        self._thread.join(10)

    def __enter__(self) -> "EventListener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_or_none(body: bytes):
    try:
        return json.loads(body)
    except ValueError:
        return None


def _execution_error_text(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message')}"
    return json.dumps(status)[:4000]


class Graph:
    """Builds an API-format graph: ``model = g.add("UNETLoader", unet_name=…)`` then ``model[0]``."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> "NodeRef":
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return NodeRef(node_id)

    def to_dict(self) -> dict:
        return self.nodes


class NodeRef(str):
    """A node id whose items are links to its outputs: ``ref[0]`` is ``[id, 0]``."""

    def __getitem__(self, index: int) -> list:
        return [str(self), index]


def load_script(path: Path, module_name: str):
    """Yields the script at ``path`` (a bench, say) imported as the module ``module_name``, and
    takes it out of ``sys.modules`` afterwards; a fixture does ``yield from load_script(…)``. It
    is registered while in use because dataclasses look their module up there."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(module_name, None)


def adamw_constant(g: Graph, learning_rate: float) -> NodeRef:
    """Optimizer + LR Schedule as most tests train: AdamW at a constant ``learning_rate``, no
    warmup, no gradient clipping."""
    return g.add("MusubiOptimizerSettings", optimizer_type="AdamW", custom_optimizer="", learning_rate=learning_rate,
                 optimizer_args="", lr_scheduler="constant", lr_warmup_steps="0", lr_scheduler_num_cycles=1.0,
                 lr_scheduler_power=1.0, lr_scheduler_min_lr_ratio=0.0, lr_scheduler_args="", max_grad_norm=0.0)


def preview_text(outputs: dict, node) -> str:
    """The text a node showed (PreviewAny, or a node's own text preview) in a run's outputs."""
    return "".join(outputs[str(node)]["text"])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())
