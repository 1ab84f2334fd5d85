"""`sdrt serve` as a real process on loopback for the server tests: start, wait until it answers, stop."""

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import requests
from PIL import Image

START_TIMEOUT = 60.0  # seconds for import + model load on a busy 2-core machine
CLI = ("-m", "sdrt.cli")  # what python runs: sdrt's CLI
SMALL = {"width": 64, "height": 64, "steps": 4}  # fast on the tiny model (~0.1 s per image)


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: str
    auth: tuple[str, str] | None = None

    def get(self, path, **kwargs):
        return requests.get(self.url + path, auth=self.auth, timeout=60, **kwargs)

    def post(self, path, json=None, **kwargs):
        return requests.post(self.url + path, json=json, auth=self.auth, timeout=60, **kwargs)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, log_dir, *args, auth=None, timeout=START_TIMEOUT, entry=CLI) -> RunningServer:
    """Run `python -m sdrt.cli serve [-m MODEL_DIR] --port P ARGS...` and wait until /sdapi/v1/sd-models answers
    (ENTRY: what python runs in place of `-m sdrt.cli`, e.g. tests/ray_gate.py)."""
    port = free_port()
    log_path = os.path.join(log_dir, f"server-{port}.log")
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    model = () if model_dir is None else ("-m", str(model_dir))  # None: ARGS name the models (--models-dir)
    cmd = [sys.executable, *entry, "serve", *model, "--port", str(port), *args]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path, auth)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"sdrt serve exited with {process.returncode}:\n{server.log()}")
            try:
                requests.get(server.url + "/sdapi/v1/sd-models", timeout=2)
                return server
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or (Ray Serve) deploying
                time.sleep(0.2)
        raise RuntimeError(f"sdrt serve did not answer within {timeout} s:\n{server.log()}")
    except BaseException:
        stop_server_tree(server)
        raise


def stop_server_tree(server: RunningServer) -> None:
    """stop_server, then kill what it started and left (`--ray`: Ray's own processes), by process id."""
    try:
        import psutil

        started = psutil.Process(server.process.pid).children(recursive=True)
    except Exception:  # no psutil, or the process is gone
        started = []
    stop_server(server)
    for p in started:
        try:
            p.kill()
        except Exception:
            pass


def stop_server(server: RunningServer) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@contextlib.contextmanager
def running_server(model_dir, log_dir, *args, auth=None):
    """A started server for the `with` block, stopped after it."""
    server = start_server(model_dir, log_dir, *args, auth=auth)
    try:
        yield server
    finally:
        stop_server(server)


# The options of conftest's `sdrt_server`: small limits, so that their errors are testable.
TEST_SERVER_ARGS = ("--max-body-mb", "2", "--max-steps", "200")


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode_b64(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def gradient(width: int = 64, height: int = 64) -> Image.Image:
    """A smooth RGB test image: red across, green down."""
    import numpy as np

    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8), "RGB")
