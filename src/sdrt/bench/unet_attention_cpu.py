"""One UNet call at hires sizes on the CPU: the export's plain graph as exported ("plain") and as sdrt's CPU engine
runs it ("tiled": engines/ort_attention.py's MultiHeadAttention), its `sdrt optimize --target cpu` variant ("cpu")
and diffusers' UNet (PyTorch SDPA, "torch"), each in its own process: wall time of the
call, peak RSS, the outputs' difference from PyTorch's, and ONNX Runtime's time per operator type (its profiler).

    python -m sdrt.bench.unet_attention_cpu --onnx DIR --diffusers DIR [--case plain:512+768:1 --case cpu:1024:1 ...]

Each case is one process: one session (or module), then one call per size, smallest first (the peak RSS after each
call is the high-water mark so far: that size's peak).

DIR (--onnx) must hold the cpu variant (`sdrt optimize DIR --target cpu --models unet`) for "cpu" cases.
"""

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

MODULE = "sdrt.bench.unet_attention_cpu"


def feeds(onnx_dir: str, size: int, batch: int) -> dict:
    from sdrt.export.optimize import check_feeds
    from sdrt.runtime.manifest import Manifest

    return check_feeds(Manifest.load(Path(onnx_dir)), "unet", batch=batch, latent=size // 8, seed=0)


def worker_ort(job: dict) -> dict:
    import numpy as np
    import onnxruntime as ort

    from sdrt.engines.ort_attention import tiled_attention
    from sdrt.runtime.manifest import Manifest

    manifest = Manifest.load(Path(job["onnx_dir"]))
    path = manifest.graph_path("unet", None if job["graph"] in ("plain", "tiled") else job["graph"])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(job["out"]).with_suffix(""))
    start = time.perf_counter()
    model = tiled_attention(path, options) if job["graph"] == "tiled" else str(path)
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - start
    origin = session.get_profiling_start_time_ns()
    calls, spans = [], []
    for size in job["sizes"]:  # ascending: the high-water RSS after each call is that size's peak
        inputs = feeds(job["onnx_dir"], size, job["batch"])
        begin = time.time_ns()
        out = session.run(None, inputs)[0]
        end = time.time_ns()
        spans.append(((begin - origin) / 1e3, (end - origin) / 1e3))  # microseconds since profiling began (wall clock)
        calls.append({"size": size, "call_s": (end - begin) / 1e9, "peak_rss_gib": _hwm_gib()})
        np.save(_out(job, size), out)
    events = json.loads(Path(session.end_profiling()).read_text())
    for call, span in zip(calls, spans, strict=True):
        call["op_time_s"] = _op_times(events, span)
    return {"graph": str(path.name), "load_s": load, "calls": calls}


def _out(job: dict, size: int) -> str:
    return str(Path(job["out"]) / f"unet-{job['graph']}-{size}-{job['batch']}.npy")


def _hwm_gib() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return round(next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0) / 2**20, 2)


def _op_times(events: list, span: tuple) -> dict:
    """{op type: seconds} of the node events inside SPAN (a run), the largest first (the first eight)."""
    totals = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and span[0] <= event["ts"] <= span[1]:
            totals[event["args"]["op_name"]] += event["dur"] / 1e6
    return {op: round(s, 2) for op, s in totals.most_common(8)}


def worker_torch(job: dict) -> dict:
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    start = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(job["diffusers_dir"], subfolder="unet", torch_dtype=torch.float32)
    unet.eval()
    load = time.perf_counter() - start
    calls = []
    for size in job["sizes"]:
        inputs = {k: torch.from_numpy(v) for k, v in feeds(job["onnx_dir"], size, job["batch"]).items()}
        begin = time.perf_counter()
        with torch.no_grad():
            out = unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"])
        calls.append({"size": size, "call_s": time.perf_counter() - begin, "peak_rss_gib": _hwm_gib()})
        np.save(_out(job, size), out.sample.numpy())
    return {"graph": "diffusers UNet2DConditionModel (SDPA)", "load_s": load, "calls": calls}


def child(job: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", MODULE, "--worker", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "returncode": proc.returncode, "wall_s": time.perf_counter() - start}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return {**json.loads(line[len("RESULT") :]), "wall_s": time.perf_counter() - start}


def run_worker(job: dict) -> dict:
    import os

    import torch  # noqa: F401  (both workers: the same libraries loaded, comparable RSS)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return (worker_torch if job["graph"] == "torch" else worker_ort)(job)


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        print("RESULT" + json.dumps(run_worker(json.loads(sys.argv[2]))))
        return 0
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True)
    p.add_argument("--diffusers", required=True)
    p.add_argument("--case", action="append", required=True,
                   help="GRAPH:SIZES:BATCH: GRAPH plain, tiled, cpu or torch; SIZES in px, joined by + (one process)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp"))
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args()
    from sdrt.bench.machine import describe_machine

    report = {"machine": describe_machine(), "command": sys.argv, "cases": []}
    for case in args.case:
        graph, sizes, batch = case.split(":")
        job = {"graph": graph, "sizes": sorted(int(x) for x in sizes.split("+")), "batch": int(batch),
               "onnx_dir": args.onnx, "diffusers_dir": args.diffusers, "out": str(args.workdir)}  # fmt: skip
        result = {"case": case, **child(job)}
        for call in result.get("calls", []):
            for other in ("torch", "plain"):  # the outputs' difference from PyTorch's and the plain graph's
                mine, theirs = _out(job, call["size"]), _out({**job, "graph": other}, call["size"])
                if graph != other and Path(theirs).is_file():
                    call[f"max_abs_vs_{other}"] = float(np.abs(np.load(mine) - np.load(theirs)).max())
        print(json.dumps(result), flush=True)
        report["cases"].append(result)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
