"""FLUX transformer export memory, one graph against block-wise parts (export/flux_parts.py): a FLUX.1-wide
transformer (width 3072, 24 heads of 128, T5 width 4096, CLIP pooled 768, guidance input: FLUX.1 [dev]'s) with fewer
blocks than its 19 double- and 38 single-stream ones, random weights stored in bf16 as the published files are,
read lazily from the saved folder and exported once as one graph and once in parts of PART_BYTES; each run in its
own process, its peak RSS read from the kernel.

    python -m sdrt.bench.flux_parts [--double 2 --single 4] [--part-bytes 4e9] [--output benchmarks/results/X.json]

Every block of a kind has the same size, so a block-wise export's peak is about one part plus what every export
holds (the interpreter, torch, ONNX Runtime's check session); the one-graph export holds the whole model in fp32.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sdrt.bench.load_memory import sample_rss_split

FLUX_DEV = {"num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
            "joint_attention_dim": 4096, "pooled_projection_dim": 768, "in_channels": 64, "guidance_embeds": True,
            "axes_dims_rope": [16, 56, 56]}  # fmt: skip


def build(folder: Path, double: int, single: int) -> int:
    """Save a FLUX-wide FluxTransformer2DModel of DOUBLE + SINGLE blocks, built in bf16, to FOLDER; its parameters."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = FluxTransformer2DModel(**{**FLUX_DEV, "num_layers": double, "num_single_layers": single})
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run_one(folder: str, part_bytes: int) -> dict:
    """Export the transformer saved in FOLDER in this process (weights read lazily); its figures."""
    from sdrt.export import lazy_weights as lazy
    from sdrt.export.flux import transformer_steps
    from sdrt.export.flux_parts import empty_transformer, part_bounds

    config = json.loads((Path(folder) / "config.json").read_text())
    model = empty_transformer(config)
    bounds = part_bounds(model, part_bytes)
    source = lazy.WeightSource.direct(lazy.SafetensorsFiles(lazy.diffusers_files(Path(folder))), folder)
    import threading

    peaks, stop = {}, threading.Event()
    sampler = threading.Thread(target=sample_rss_split, args=(peaks, stop), daemon=True)
    sampler.start()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        errors = [step.run(Path(out), "fp32") for step in transformer_steps(model, source, bounds)]
        onnx_bytes = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    stop.set()
    return {
        "parts": len(bounds),
        "blocks_per_part": [stop - begin for begin, stop in bounds],
        "max_relative_error": max(errors),
        "onnx_bytes": onnx_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_anon_bytes": peaks.get("RssAnon"),  # sampled every 0.2 s
        "peak_rss_file_bytes": peaks.get("RssFile"),
        "export_seconds": round(time.perf_counter() - start, 1),
    }


def main(argv=None) -> int:
    from sdrt.bench.machine import report_head

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--part-bytes", type=float, action="append", help="a parts run per value (default: 4e9)")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--one", nargs=2, metavar=("FOLDER", "PART_BYTES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # the child: one export
        print(json.dumps(run_one(args.one[0], int(float(args.one[1])))))
        return 0
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        params = build(Path(folder), args.double, args.single)
        print(f"built {params / 1e9:.2f} B parameters in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        plans = [("one graph", 1 << 62)] + [(f"parts of {p / 1e9:g} GB", p) for p in args.part_bytes or [4e9]]
        for label, part_bytes in plans:
            child = [sys.executable, "-m", "sdrt.bench.flux_parts", "--one", folder, str(part_bytes)]
            done = subprocess.run(child, capture_output=True, text=True)
            if done.returncode:
                runs[label] = {"rc": done.returncode, "stderr_tail": done.stderr[-2000:]}
            else:
                runs[label] = json.loads(done.stdout.strip().splitlines()[-1])
            print(label, runs[label], file=sys.stderr)
    result = {
        **report_head("flux_parts", argv if argv is not None else sys.argv[1:]),
        "model": {
            **FLUX_DEV,
            "num_layers": args.double,
            "num_single_layers": args.single,
            "parameters": params,
            "stored_dtype": "bfloat16",
        },  # fmt: skip
        "runs": runs,
        "note": "shared machine (other agents' work running); peak RSS per process (getrusage)",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
