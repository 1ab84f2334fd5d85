"""Images/s of `sdrt serve` against `sdrt serve --ray` (with and without batching) on one model, in one run.

Each server is a real process on loopback; CLIENTS threads send REQUESTS txt2img requests (one image each, other
prompt and seed each, the same size/steps/sampler/cfg: batchable), after a warm-up. Each configuration's images
are checked against `sdrt serve`'s for the same prompt and seed (they must be identical, pixel for pixel).

    python -m sdrt.bench.ray_throughput --model /path/to/exported [--width 64 --steps 8 --requests 64 --clients 8]

Writes benchmarks/results/ray-throughput-<name>.json and prints a markdown table.
"""

import argparse
import base64
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from sdrt.bench.common import RESULTS_DIR, now_iso

START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, args: list[str], log_dir: str) -> tuple[subprocess.Popen, str]:
    import requests

    port = free_port()
    log = open(os.path.join(log_dir, f"server-{port}.log"), "w")  # noqa: SIM115 - lives with the process
    cmd = [sys.executable, "-m", "sdrt.cli", "serve", "-m", model, "--port", str(port), *args]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"server exited: {' '.join(cmd)}; log {log.name}")
        try:
            if requests.get(url + "/sdapi/v1/sd-models", timeout=5).status_code == 200:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    sys.exit(f"server did not start: {' '.join(cmd)}")


def stop(process: subprocess.Popen) -> None:
    import psutil

    family = [process, *psutil.Process(process.pid).children(recursive=True)]
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    for p in family:  # Ray's processes, if any outlived the cluster's shutdown
        try:
            p.kill()
        except psutil.Error:
            pass


def post(url: str, request: dict) -> dict:
    import requests

    for _ in range(100):
        res = requests.post(url + "/sdapi/v1/txt2img", json=request, timeout=3600)
        if res.status_code == 429:
            time.sleep(float(res.headers.get("Retry-After", 1)))
            continue
        res.raise_for_status()
        return res.json()
    raise RuntimeError("still 429 after 100 tries")


def load(url: str, options: dict, requests_n: int, clients: int, first_seed: int) -> tuple[float, dict]:
    """(seconds for REQUESTS_N requests from CLIENTS threads, {seed: pixels})."""
    import numpy as np
    from PIL import Image

    def one(i):
        seed = first_seed + i
        body = post(url, {**options, "prompt": f"a lighthouse, picture {seed}", "seed": seed})
        image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
        return seed, np.asarray(image.convert("RGB"))

    start_t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        images = dict(pool.map(one, range(requests_n)))
    return time.perf_counter() - start_t, images


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdrt.bench.ray_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True)
    p.add_argument("--name", default="tiny", help="results file name part")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="--ray-batch-size of the batching configurations")
    p.add_argument("--replicas", default="1,2", help="replica counts of the batching configurations")
    return p


def configurations(args) -> list[tuple[str, list[str]]]:
    """(label, `sdrt serve` arguments) of each server measured: one process first (the reference), then Ray."""
    queue = str(args.requests + args.clients)
    ray = ["--max-queue", queue, "--cpus-per-replica", "0.5", "--max-batch-size", "8"]
    configs = [("sdrt serve", ["--max-queue", queue])]
    configs.append(("ray, 1 replica, no batching", ["--ray", "--replicas", "1", "--ray-batch-size", "1", *ray]))
    for replicas in args.replicas.split(","):
        configs.append((f"ray, {replicas} replica(s), batch {args.batch}",
                        ["--ray", "--replicas", replicas, "--ray-batch-size", str(args.batch), *ray]))  # fmt: skip
    return configs


def markdown_table(report: dict) -> str:
    """One row per configuration: images/s, against `sdrt serve`, and whether its images were identical."""
    rows, o = report["rows"], report["options"]
    base = rows[0]["images_per_s"]
    lines = [f"{o['width']}x{o['height']}, {o['steps']} steps, {report['requests']} requests from "
             f"{report['clients']} clients; {report['cpu']}, {report['cores']} cores", "",
             "| configuration | images/s | vs sdrt serve | images identical to `sdrt serve`'s |",
             "| --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| {row['config']} | {row['images_per_s']:.3f} | {row['images_per_s'] / base:.2f}x | "
              f"{'yes' if row['identical_to_sdrt_serve'] else 'NO'} |" for row in rows]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    import numpy as np

    args = build_parser().parse_args(argv)
    options = {"width": args.width, "height": args.height or args.width, "steps": args.steps, "cfg_scale": 7,
               "sampler_name": "Euler"}  # fmt: skip
    rows, reference = [], None
    log_dir = tempfile.mkdtemp(prefix="sdrt-ray-bench-")
    for label, extra in configurations(args):
        print(f"{label}: starting", file=sys.stderr, flush=True)
        process, url = start(args.model, extra, log_dir)
        try:
            load(url, options, args.warmup, args.clients, 10_000_000)  # sessions, thread pools, allocator
            seconds, images = load(url, options, args.requests, args.clients, 1)
        finally:
            stop(process)
        if reference is None:
            reference = images
        identical = all(np.array_equal(images[s], reference[s]) for s in reference)
        rows.append({"config": label, "args": extra, "seconds": seconds, "images_per_s": args.requests / seconds,
                     "identical_to_sdrt_serve": identical, "load_average_1min_after": os.getloadavg()[0]})  # fmt: skip
        print(f"{label}: {args.requests / seconds:.3f} images/s, identical {identical}", file=sys.stderr, flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())  # fmt: skip
    result = {"benchmark": "ray_throughput", "date": now_iso(), "model": args.model, "options": options,
              "requests": args.requests, "clients": args.clients, "cpu": cpu, "cores": os.cpu_count(),
              "rows": rows}  # fmt: skip
    out = RESULTS_DIR / f"ray-throughput-{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(result))
    return 0 if all(row["identical_to_sdrt_serve"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
