"""Soak test of `sdrt serve` (issue 24): thousands of tiny-model requests from concurrent clients, on loopback only.

    python -m sdrt.bench.soak --requests 3000 --clients 8 --output benchmarks/results/soak.json

Clients mix txt2img, img2img, interrupts, progress polls and bad requests (NaN, sizes off the grid, bad images,
malformed JSON, unknown samplers). Checked: no 5xx and no dropped connection; every 200 carries images made with
its own seed (the PNG's infotext and `info` both say so); the server's RSS over the run (least-squares slope over
the second half, after warm-up); the queue empty at the end and the server still answering. Bounded: a request
count, a per-request timeout, a wall-clock limit. Without --model it builds and exports the benchmark's tiny random
model (`sdrt bench --model small`'s architecture) into --workdir once.
"""

import argparse
import base64
import io
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from sdrt.bench.common import log, now_iso
from sdrt.bench.machine import describe_machine

SIZE = 64  # pixels: the tiny model's native size
REQUEST_TIMEOUT_S = 120.0
# kind -> share of the requests
MIX = {"txt2img": 0.4, "img2img": 0.2, "progress": 0.15, "interrupt": 0.05, "bad": 0.2}
BAD_BODIES = [  # (route, raw JSON text): each must be a 4xx
    ("/sdapi/v1/txt2img", '{"prompt": "x", "cfg_scale": NaN}'),
    ("/sdapi/v1/txt2img", '{"prompt": "x", "steps": Infinity}'),
    ("/sdapi/v1/txt2img", '{"prompt": "x", "width": 100}'),
    ("/sdapi/v1/txt2img", '{"prompt": "x", "steps": -1}'),
    ("/sdapi/v1/txt2img", '{"prompt": "x", "sampler_name": "No Such Sampler"}'),
    ("/sdapi/v1/txt2img", '{"prompt": "x", "seed": 1e999}'),
    ("/sdapi/v1/txt2img", '{"prompt": ["not", "text"]}'),
    ("/sdapi/v1/txt2img", '{"prompt": "x", "batch_size": 100000}'),
    ("/sdapi/v1/txt2img", '{"prompt": "unclosed'),
    ("/sdapi/v1/img2img", '{"prompt": "x", "init_images": ["not base64!"]}'),
    ("/sdapi/v1/img2img", '{"prompt": "x", "init_images": []}'),
    ("/sdapi/v1/img2img", '{"prompt": "x", "init_images": ["aGVsbG8="], "denoising_strength": -Infinity}'),
    ("/sdapi/v1/png-info", '{"image": 12}'),
    ("/sdapi/v1/options", '{"sd_model_checkpoint": NaN}'),
]


def tiny_model(workdir: Path) -> Path:
    """The benchmark's tiny random SD model, built and exported into WORKDIR once."""
    from sdrt.bench.cases import CASES
    from sdrt.bench.common import WEIGHTS_SEED
    from sdrt.bench.random_model import build_sd, onnx_is_current

    onnx_dir = workdir / "small" / "onnx"
    if not onnx_is_current(onnx_dir):
        from sdrt.export import export

        diffusers_dir = workdir / "small" / "diffusers"
        build_sd({"diffusers_dir": str(diffusers_dir), "weights_seed": WEIGHTS_SEED, **CASES["small"].configs()})
        export(str(diffusers_dir), onnx_dir, overwrite=True, progress=False)
    return onnx_dir


def init_image() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.radial_gradient("L").resize((SIZE, SIZE)).convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class Soak:
    """The shared state of the clients: the next request number, what each kind got, the failures."""

    def __init__(self, url: str, total: int, deadline: float, seed: int):
        self.url, self.total, self.deadline = url, total, deadline
        self.next, self.lock = 0, threading.Lock()
        self.statuses: dict[str, Counter] = {kind: Counter() for kind in MIX}
        self.failures: list[str] = []
        self.images_checked = 0
        self.latencies: dict[str, list[float]] = {kind: [] for kind in MIX}
        self.kinds = random.Random(seed).choices(list(MIX), weights=list(MIX.values()), k=total)
        self.init_image = init_image()

    def take(self) -> int | None:
        with self.lock:
            if self.next >= self.total or time.monotonic() > self.deadline:
                return None
            self.next += 1
            return self.next - 1

    def fail(self, message: str) -> None:
        with self.lock:
            if len(self.failures) < 50:
                self.failures.append(message)

    def client(self) -> None:
        import requests

        session = requests.Session()
        while (i := self.take()) is not None:
            kind = self.kinds[i]
            start = time.perf_counter()
            try:
                status = self.send(session, kind, i)
            except requests.RequestException as e:
                status = "transport error"
                self.fail(f"request {i} ({kind}): {type(e).__name__}: {e}")
            with self.lock:
                self.statuses[kind][str(status)] += 1
                self.latencies[kind].append(time.perf_counter() - start)

    def send(self, session, kind: str, i: int):
        """Request I of KIND; its status (checked: no 5xx, and a 200's images carry its seed)."""
        if kind == "progress":
            response = session.get(self.url + "/sdapi/v1/progress?skip_current_image=true", timeout=REQUEST_TIMEOUT_S)
        elif kind == "interrupt":
            response = session.post(self.url + "/sdapi/v1/interrupt", timeout=REQUEST_TIMEOUT_S)
        elif kind == "bad":
            route, body = BAD_BODIES[i % len(BAD_BODIES)]
            response = session.post(self.url + route, data=body, headers={"content-type": "application/json"},
                                    timeout=REQUEST_TIMEOUT_S)  # fmt: skip
            if not 400 <= response.status_code < 500:
                self.fail(f"request {i}: bad body {body[:60]!r} to {route} got {response.status_code}")
            return response.status_code
        else:
            seed = 10_000 + 7 * i
            body = {"prompt": f"a grey squirrel {i}", "seed": seed, "width": SIZE, "height": SIZE,
                    "steps": 2 + i % 3, "batch_size": 1 + i % 2, "sampler_name": ("Euler", "DDIM", "Euler a")[i % 3]}
            if kind == "img2img":
                body |= {"init_images": [self.init_image], "denoising_strength": 0.6}
            response = session.post(f"{self.url}/sdapi/v1/{kind}", json=body, timeout=REQUEST_TIMEOUT_S)
            if response.status_code == 200:
                self.check_seeds(i, response.json(), seed, body["batch_size"])
        if response.status_code >= 500:
            self.fail(f"request {i} ({kind}): {response.status_code} {response.text[:200]}")
        return response.status_code

    def check_seeds(self, i: int, answer: dict, seed: int, batch_size: int) -> None:
        """Each image of request I says it was made with SEED + its index (an interrupted job may return fewer)."""
        from PIL import Image

        info = json.loads(answer["info"])
        images = answer.get("images") or []
        expected = [seed + k for k in range(len(images))]
        if info.get("all_seeds", [])[: len(images)] != expected or len(images) > batch_size:
            self.fail(f"request {i}: seeds {info.get('all_seeds')} for seed {seed} x{batch_size}")
        for k, data in enumerate(images):
            parameters = Image.open(io.BytesIO(base64.b64decode(data))).info.get("parameters", "")
            if f"Seed: {seed + k}," not in parameters:
                self.fail(f"request {i}: image {k} infotext {parameters[-120:]!r} lacks Seed: {seed + k}")
        with self.lock:
            self.images_checked += len(images)


class RssSampler(threading.Thread):
    """The server process's RSS every INTERVAL seconds: (seconds since start, requests done, bytes)."""

    def __init__(self, pid: int, soak: Soak, interval: float = 0.5):
        super().__init__(daemon=True)
        import psutil

        self.process, self.soak, self.interval = psutil.Process(pid), soak, interval
        self.samples: list[tuple[float, int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop.wait(self.interval):
            try:
                self.samples.append((time.monotonic() - start, self.soak.next, self.process.memory_info().rss))
            except Exception:  # the process is gone: the run reports it
                return


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of Y over X."""
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx if sxx else 0.0


def rss_report(samples: list[tuple[float, int, int]]) -> dict:
    """RSS at the start, peak and end, and its slope over the second half of the run (after warm-up)."""
    if len(samples) < 4:
        return {"samples": len(samples)}
    half = samples[len(samples) // 2 :]
    mib = 2**20
    return {
        "samples": len(samples),
        "start_mib": round(samples[0][2] / mib, 1),
        "peak_mib": round(max(s[2] for s in samples) / mib, 1),
        "end_mib": round(samples[-1][2] / mib, 1),
        "second_half_slope_mib_per_1000_requests": round(slope([(s[1], s[2]) for s in half]) * 1000 / mib, 3),
        "second_half_slope_mib_per_minute": round(slope([(s[0], s[2]) for s in half]) * 60 / mib, 3),
    }


def start_server(model: Path, port: int, log_file) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sdrt.cli", "serve", "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--max-queue", "64", "--max-steps", "8", "--max-pixels", str(SIZE * SIZE), "--max-batch-size", "2"]
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sdrt serve exited with {process.returncode}")
        try:
            requests.get(url + "/sdapi/v1/sd-models", timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.3)
    raise RuntimeError(f"sdrt serve did not answer within {timeout} s")


def drained(url: str, timeout: float = 60.0) -> dict:
    """Once the clients are done: the queue empty (progress idle) and a last txt2img answered."""
    import requests

    deadline = time.monotonic() + timeout
    state = {}
    while time.monotonic() < deadline:
        state = requests.get(url + "/sdapi/v1/progress?skip_current_image=true", timeout=10).json()
        if state["state"]["job"] == "" and state["progress"] == 0:
            break
        time.sleep(0.2)
    last = requests.post(url + "/sdapi/v1/txt2img", json={"prompt": "after", "seed": 1, "steps": 2, "width": SIZE,
                                                          "height": SIZE}, timeout=REQUEST_TIMEOUT_S)  # fmt: skip
    return {"idle": state.get("state", {}).get("job") == "", "progress_after": state.get("progress"),
            "last_txt2img_status": last.status_code}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_soak(model: Path, requests_total: int, clients: int, limit_s: float, seed: int, log_path: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log_file:
        process = start_server(model, port, log_file)
        try:
            wait_until_up(url, process)
            soak = Soak(url, requests_total, time.monotonic() + limit_s, seed)
            sampler = RssSampler(process.pid, soak)
            sampler.start()
            start = time.monotonic()
            threads = [threading.Thread(target=soak.client) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - start
            end = drained(url)
            sampler.stop.set()
            sampler.join()
            alive = process.poll() is None
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    return report(soak, sampler, wall, end, alive, requests_total, clients)


def report(soak: Soak, sampler: RssSampler, wall: float, end: dict, alive: bool, total: int, clients: int) -> dict:
    statuses = {kind: dict(sorted(c.items())) for kind, c in soak.statuses.items()}
    sent = sum(sum(c.values()) for c in soak.statuses.values())
    server_errors = sum(n for c in soak.statuses.values() for s, n in c.items() if not s.isdigit() or int(s) >= 500)
    p95 = {kind: round(sorted(v)[int(0.95 * (len(v) - 1))], 3) for kind, v in soak.latencies.items() if v}
    passed = (not soak.failures and server_errors == 0 and alive and end["idle"] and end["last_txt2img_status"] == 200
              and sent == total)  # fmt: skip
    return {
        "requests_planned": total, "requests_sent": sent, "clients": clients, "wall_s": round(wall, 1),
        "requests_per_s": round(sent / wall, 1), "statuses": statuses, "server_errors_or_dropped": server_errors,
        "images_checked_for_their_seed": soak.images_checked, "failures": soak.failures, "latency_p95_s": p95,
        "rss": rss_report(sampler.samples), "end": end, "server_alive": alive, "passed": passed,
    }  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an exported model folder (default: the tiny random model, built once)")
    parser.add_argument("--workdir", default="/tmp/sdrt-soak", help="where the tiny model and the server log go")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--limit-s", type=float, default=1800, help="stop sending after this many seconds")
    parser.add_argument("--seed", type=int, default=0, help="the mix of request kinds")
    parser.add_argument("--output", help="results JSON (e.g. benchmarks/results/soak.json)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else tiny_model(workdir)
    log(f"soak: {args.requests} requests from {args.clients} clients against sdrt serve -m {model}")
    result = run_soak(model, args.requests, args.clients, args.limit_s, args.seed, workdir / "server.log")
    command = "python -m sdrt.bench.soak " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"benchmark": "soak", "date": now_iso(), "machine": describe_machine(), "model": str(model),
              "mix": MIX, "command": command, **result}  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
