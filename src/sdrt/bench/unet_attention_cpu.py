"""One UNet call at hires sizes on the CPU: the export's plain graph, its `sdrt optimize --target cpu` variant
(flash-tiled MultiHeadAttention) and diffusers' UNet (PyTorch SDPA), each in its own process: wall time of the
call, peak RSS, the outputs' difference from PyTorch's, and ONNX Runtime's time per operator type (its profiler).

    python -m sdrt.bench.unet_attention_cpu --onnx DIR --diffusers DIR [--case plain:768:1 --case cpu:1024:1 ...]

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

    from sdrt.runtime.manifest import Manifest

    manifest = Manifest.load(Path(job["onnx_dir"]))
    path = manifest.graph_path("unet", None if job["graph"] == "plain" else job["graph"])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(job["out"]).with_suffix(""))
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - start
    inputs = feeds(job["onnx_dir"], job["size"], job["batch"])
    start = time.perf_counter()
    out = session.run(None, inputs)[0]
    call = time.perf_counter() - start
    np.save(job["out"], out)
    return {"graph": str(path.name), "load_s": load, "call_s": call, "op_time_s": _op_times(session.end_profiling())}


def _op_times(profile: str) -> dict:
    """{op type: seconds} of the profiled run's node events, the largest first (the first ten)."""
    totals = collections.Counter()
    for event in json.loads(Path(profile).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1e6
    Path(profile).unlink()
    return {op: round(s, 2) for op, s in totals.most_common(10)}


def worker_torch(job: dict) -> dict:
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    start = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(job["diffusers_dir"], subfolder="unet", torch_dtype=torch.float32)
    unet.eval()
    load = time.perf_counter() - start
    inputs = {k: torch.from_numpy(v) for k, v in feeds(job["onnx_dir"], job["size"], job["batch"]).items()}
    start = time.perf_counter()
    with torch.no_grad():
        out = unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"]).sample
    call = time.perf_counter() - start
    np.save(job["out"], out.numpy())
    return {"graph": "diffusers UNet2DConditionModel (SDPA)", "load_s": load, "call_s": call}


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
    result = (worker_torch if job["graph"] == "torch" else worker_ort)(job)
    status = Path("/proc/self/status").read_text().splitlines()
    hwm = next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")), 0)
    return {**result, "peak_rss_gib": round(hwm / 2**30, 2)}


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        print("RESULT" + json.dumps(run_worker(json.loads(sys.argv[2]))))
        return 0
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True)
    p.add_argument("--diffusers", required=True)
    p.add_argument("--case", action="append", required=True, help="GRAPH:SIZE:BATCH, GRAPH plain, cpu or torch")
    p.add_argument("--workdir", type=Path, default=Path("/tmp"))
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args()
    from sdrt.bench.machine import describe_machine

    report = {"machine": describe_machine(), "command": sys.argv, "cases": []}
    for case in args.case:
        graph, size, batch = case.split(":")
        out = args.workdir / f"unet-{graph}-{size}-{batch}.npy"
        job = {"graph": graph, "size": int(size), "batch": int(batch), "onnx_dir": args.onnx,
               "diffusers_dir": args.diffusers, "out": str(out)}  # fmt: skip
        result = {"case": case, **child(job)}
        for other in ("torch", "plain"):  # the outputs' difference from PyTorch's and the plain graph's, same inputs
            other_out = args.workdir / f"unet-{other}-{size}-{batch}.npy"
            if graph != other and out.is_file() and other_out.is_file():
                result[f"max_abs_vs_{other}"] = float(np.abs(np.load(out) - np.load(other_out)).max())
        print(json.dumps(result), flush=True)
        report["cases"].append(result)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
