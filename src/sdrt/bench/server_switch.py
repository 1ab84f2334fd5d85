"""Model switching in `sdrt serve --models-dir` on the full-size SD 1.5 architecture (random weights), CPU backend:
how long POST /sdapi/v1/options {"sd_model_checkpoint": ...} takes when the model must be loaded (cold) and when the
LRU still holds it (warm, --max-loaded-models 2), and the server's resident memory with one and two models loaded
(each after one 1-step 256x256 generation, so that its weights are resident: ONNX Runtime maps them lazily).

    sdrt bench --model sd15 --workdir /tmp/sdrt-bench   # builds and exports the random model once (or reuse one)
    python -m sdrt.bench.server_switch /tmp/sdrt-bench/sd15/onnx [--rounds 3]

The models folder holds the one export under two names (two Pipelines, as two checkpoints would be). Writes
benchmarks/results/server-switch-<machine>.json. Every figure is a wall-clock time: run it on a quiet machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

START_TIMEOUT_S = 600


def start(models: Path, max_loaded: int, log: Path):
    """`sdrt serve --models-dir MODELS` on a free port; returns (process, url) once it answers."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sdrt.cli", "serve", "--models-dir", str(models), "-m", "a", "--port", str(port),
           "--max-loaded-models", str(max_loaded)]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            requests.get(url + "/sdapi/v1/sd-models", timeout=2)
            return process, url
        except requests.RequestException:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")


def switch(url: str, name: str) -> float:
    """Seconds POST /sdapi/v1/options {"sd_model_checkpoint": NAME} takes (it answers once the model is loaded)."""
    start_time = time.perf_counter()
    res = requests.post(url + "/sdapi/v1/options", json={"sd_model_checkpoint": name}, timeout=START_TIMEOUT_S)
    res.raise_for_status()
    return time.perf_counter() - start_time


def touch(url: str) -> None:
    """One 1-step 256x256 generation: every engine runs once, so its weights are resident before RSS is read."""
    body = {"prompt": "a cat", "steps": 1, "width": 256, "height": 256, "seed": 1}
    requests.post(url + "/sdapi/v1/txt2img", json=body, timeout=START_TIMEOUT_S).raise_for_status()


def rss_gib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**30


def run(export: Path, rounds: int) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        for name in ("a", "b"):
            (models / name).symlink_to(export.resolve(), target_is_directory=True)
        for max_loaded in (1, 2):
            process, url = start(models, max_loaded, Path(tmp) / f"server-{max_loaded}.log")
            try:
                first = switch(url, "a")  # waits for the start's own load of "a"
                touch(url)
                one_model = rss_gib(process.pid)
                cold_b = switch(url, "b")
                touch(url)
                two_models = rss_gib(process.pid)
                times = [switch(url, name) for _ in range(rounds) for name in ("a", "b")]
                results[f"lru{max_loaded}"] = {
                    "first_load_s": round(first, 2),
                    "first_switch_s": round(cold_b, 2),
                    "switch_s": [round(t, 3) for t in times],
                    "switch_median_s": round(statistics.median(times), 3),
                    "rss_gib_one_model": round(one_model, 2),
                    "rss_gib_after_second": round(two_models, 2),
                    "loads_logged": (Path(tmp) / f"server-{max_loaded}.log").read_text().count("sdrt serve: loading"),
                }
                print(json.dumps({f"lru{max_loaded}": results[f"lru{max_loaded}"]}), flush=True)
            finally:
                process.terminate()
                process.wait(timeout=60)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.bench.server_switch", description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="an exported full-size model folder")
    parser.add_argument("--rounds", type=int, default=3, help="switches a->b->a per round")
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/server-switch-<machine>.json")
    args = parser.parse_args(argv)

    from sdrt.bench.common import RESULTS_DIR, now_iso
    from sdrt.bench.machine import describe_machine

    load_average = [round(os.getloadavg()[0], 2)]  # other processes' share of the CPU: timings are wall-clock
    figures = run(args.export, args.rounds)
    record = {
        "benchmark": "server_switch",
        "date": now_iso(),
        "what": "POST /sdapi/v1/options sd_model_checkpoint between two full-size SD 1.5 exports (random weights), "
        "CPU backend; --max-loaded-models 1 (every switch loads) and 2 (the LRU keeps both)",
        "machine": describe_machine(),
        "command": " ".join(["python -m sdrt.bench.server_switch", *(argv if argv is not None else sys.argv[1:])]),
        "note": "shared machine (other agents running): compare figures within this run only",
        "load_average_1min": [*load_average, round(os.getloadavg()[0], 2)],
        **figures,
    }
    out = args.output or RESULTS_DIR / f"server-switch-{record['machine'].get('slug', 'machine')}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
