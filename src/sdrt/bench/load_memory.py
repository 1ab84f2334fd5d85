"""Host memory per engine load: which load of a model folder makes the process's peak (full-size SDXL with DeepCache's
graphs was killed for memory at its first load; this says where the memory goes).

    python -m sdrt.bench.load_memory MODEL_DIR GRAPH [GRAPH ...] [--unload] [--repeat N] [--output FILE.json]

Loads each GRAPH's engine (ONNX Runtime CPU unless --backend) in this one process, in the order given, and logs after
each load: RSS before, RSS after, and the load's own peak (the kernel's high-water mark, reset before each load
through /proc/self/clear_refs), with the graph's bytes on disk. --unload frees each engine after its load (each peak
alone); --repeat loads each graph N times (the first load fills ONNX Runtime's optimised-graph cache, the next ones
read it; SDRT_NO_ORT_CACHE=1: every load optimises in memory). Linux only (/proc).
"""

import argparse
import json
import sys
import time
from pathlib import Path

from sdrt.bench import common


def memory_status() -> dict:
    """{VmRSS, VmHWM, RssAnon, RssFile: bytes} of this process."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def sample_rss_split(peaks: dict, stop, status: str = "/proc/self/status") -> None:
    """Record in PEAKS the largest RssAnon and RssFile (bytes, keyed by those names) of the process whose STATUS file
    is read, every 0.2 s until STOP (a threading.Event) is set or the process is gone: mapped weight files
    (safetensors, ONNX external data) apart from the process's own memory."""
    while not stop.wait(0.2):
        try:
            lines = Path(status).read_text().splitlines()
        except OSError:
            return
        for line in lines:
            if line.startswith(("RssAnon:", "RssFile:")):
                name, value = line.split(":")
                peaks[name] = max(peaks.get(name, 0), int(value.split()[0]) * 1024)


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS (Linux's clear_refs "5"); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def graph_bytes(manifest, name: str) -> int:
    path = manifest.model_path(name)
    return sum(f.stat().st_size for f in (path, path.with_name(path.name + ".data")) if f.is_file())


def markdown(report: dict, part: str = "all") -> str:
    """A load_memory report (one run or several under "runs") as a Markdown table (sdrt.bench.tables renders it)."""
    gib = 2**30
    rows = ["| run | graph | load | on disk (GiB) | load time (s) | RSS before (GiB) | RSS after (GiB) | load's peak "
            "(GiB) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in report.get("runs", [report]):
        label = run.get("name", "").split(":")[0]
        for r in run["loads"]:
            sizes = " | ".join(f"{r[k] / gib:.2f}" for k in ("rss_before", "vmrss", "vmhwm"))
            disk = f"{r['bytes_on_disk'] / gib:.3f}"
            rows.append(f"| {label} | {r['graph']} | {r['load']} | {disk} | {r['load_s']:.1f} | {sizes} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    from sdrt.engines import create_engine
    from sdrt.runtime.manifest import Manifest

    p = argparse.ArgumentParser(prog="python -m sdrt.bench.load_memory", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("graphs", nargs="+")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--unload", action="store_true", help="free each engine after its load")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    manifest = Manifest.load(args.model_dir)
    rows, held = [], []
    for name in args.graphs:
        for attempt in range(args.repeat):
            engine = create_engine(manifest.model_path(name), args.backend)
            before = memory_status()
            exact = reset_peak()
            start = time.perf_counter()
            engine.load()
            row = {"graph": name, "load": attempt + 1, "bytes_on_disk": graph_bytes(manifest, name),
                   "load_s": round(time.perf_counter() - start, 1), "rss_before": before["VmRSS"],
                   **{k.lower(): v for k, v in memory_status().items()}, "peak_is_this_load": exact}  # fmt: skip
            rows.append(row)
            common.log(f"{name} load {attempt + 1}: {row['load_s']} s, {common.gib(row['bytes_on_disk'])} on disk; RSS "
                       f"{common.gib(before['VmRSS'])} -> {common.gib(row['vmrss'])}, peak "
                       f"{common.gib(row['vmhwm'])}{'' if exact else ' (process peak: no reset)'}, anonymous "
                       f"{common.gib(row['rssanon'])}, file-backed {common.gib(row['rssfile'])}")  # fmt: skip
            if args.unload or attempt + 1 < args.repeat:
                engine.unload()
            else:
                held.append(engine)
    if args.output:
        from sdrt.bench.machine import describe_machine

        report = {"benchmark": "load_memory", "date": common.now_iso(), "machine": describe_machine(),
                  "command": " ".join(["python -m sdrt.bench.load_memory", *(argv or sys.argv[1:])]),
                  "model_dir": str(args.model_dir), "backend": args.backend, "unload": args.unload,
                  "loads": rows}  # fmt: skip
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
