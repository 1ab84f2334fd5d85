"""Peak RSS per graph and backend: each exported graph of MODEL_DIR loaded alone in its own process, run once at the
bench's shapes, and its memory read back (peak RSS from wait4, RSS after the run split into anonymous memory and
mapped files). What issue 25's "weights held once" is measured with.

    python -m sdrt.bench.graph_memory MODEL_DIR [--backends cpu,openvino-f32,openvino-bf16] [--size 256]
        [--graphs text_encoder,unet,vae_decoder,vae_encoder] [--output benchmarks/results/graph-memory.json]

Each child process starts with an empty OpenVINO model cache (SDRT_CACHE in a fresh folder) unless --warm-cache,
which compiles once in a first process and measures a second one that imports from the cache.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30


def feeds_for(graph: str, size: int, manifest) -> dict:
    """Inputs like the bench's at SIZE x SIZE, from the manifest's input specs: the UNet at batch 2 (cond + uncond),
    the others at batch 1; float inputs random, integer ones (eos_index) small."""
    import numpy as np

    rng = np.random.default_rng(0)
    latent = size // manifest.latent_downsample
    axes = {"batch": 2 if graph.startswith("unet") else 1, "tokens": manifest.text_max_length,
            "latent_height": latent, "latent_width": latent, "height": size, "width": size}  # fmt: skip
    feeds = {}
    for spec in manifest.models[graph]["inputs"]:
        shape = tuple(axes[d] if isinstance(d, str) else d for d in spec["shape"])
        if spec["dtype"].startswith("int"):
            feeds[spec["name"]] = np.full(shape, 5, dtype=spec["dtype"])
        elif spec["name"] == "timestep":
            feeds[spec["name"]] = np.full(shape, 900.0, np.float32)
        else:
            feeds[spec["name"]] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def memory_status() -> dict:
    """RSS now, split: {'rss': bytes, 'anon': bytes, 'file': bytes} from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[{"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}[key]] = int(value.split()[0]) * 1024
    return fields


def child(model_dir: str, graph: str, backend: str, size: int) -> None:
    from sdrt.engines import create_engine
    from sdrt.runtime.manifest import Manifest

    manifest = Manifest.load(Path(model_dir))
    options = {"keep_f32": False} if backend.startswith("openvino") else {}
    engine = create_engine(manifest.model_path(graph), backend, **options)
    feeds = feeds_for(graph, size, manifest)
    start = time.perf_counter()
    engine.load()
    feeds = {name: feeds[name] for name in engine.input_names}
    engine.run(feeds)
    first = time.perf_counter() - start
    after_first = memory_status()
    start = time.perf_counter()
    engine.run(feeds)
    second = time.perf_counter() - start
    print(json.dumps({"first_call_s": first, "second_call_s": second, "after_run": after_first,
                      "after_second_run": memory_status()}))  # fmt: skip


def measure(model_dir: Path, graph: str, backend: str, size: int, cache: str) -> dict:
    command = [sys.executable, "-m", "sdrt.bench.graph_memory", "--child", str(model_dir), graph, backend, str(size)]
    env = dict(os.environ, SDRT_CACHE=cache)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{graph} on {backend}: the child failed (status {status})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_bytes": usage.ru_maxrss * 1024}


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5], int(sys.argv[5]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--backends", default="cpu,openvino-f32,openvino-bf16")
    p.add_argument("--graphs", default="text_encoder,unet,vae_decoder,vae_encoder")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--warm-cache", action="store_true", help="measure a second process that imports from the cache")
    p.add_argument("--label", default="", help="a name for this code state (before/after)")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    rows = []
    for backend in args.backends.split(","):
        for graph in args.graphs.split(","):
            with tempfile.TemporaryDirectory(prefix="sdrt-graph-memory-") as cache:
                if args.warm_cache and backend.startswith("openvino"):
                    measure(args.model_dir, graph, backend, args.size, cache)
                row = measure(args.model_dir, graph, backend, args.size, cache)
            weights = sum(f.stat().st_size for f in (args.model_dir / graph).glob("model.onnx*"))
            row.update(graph=graph, backend=backend, weights_bytes=weights, warm_cache=args.warm_cache)
            rows.append(row)
            print(f"{args.label} {backend:14s} {graph:13s} weights {weights / GiB:5.2f} GiB  peak "
                  f"{row['peak_rss_bytes'] / GiB:5.2f} GiB  after run {row['after_run']['rss'] / GiB:5.2f} GiB "
                  f"(anon {row['after_run']['anon'] / GiB:5.2f}, files {row['after_run']['file'] / GiB:5.2f})  "
                  f"first call {row['first_call_s']:6.1f} s, second {row['second_call_s']:6.2f} s",
                  flush=True)  # fmt: skip
    if args.output:
        old = json.loads(args.output.read_text()) if args.output.is_file() else {}
        old[args.label or "run"] = {"model_dir": str(args.model_dir), "size": args.size, "rows": rows}
        args.output.write_text(json.dumps(old, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
