"""T5 export memory, whole against part by part (export/t5.py): a T5-XXL-wide encoder (d_model 4096, d_ff 10240,
64 heads, T5's 32128-token vocabulary: SD 3.5's and FLUX's text_encoder_3 / text_encoder_2) with fewer blocks than
its 24, random weights stored in bf16 as the published files are, exported once as one graph and once one part per
block; each run in its own process, its peak RSS read from the kernel.

    python -m sdrt.bench.t5_parts [--blocks 4] [--output benchmarks/results/t5-parts-<machine>.json]

Each part's graph is deleted once measured (the disk need is one part, ~4 GB, not the whole 19 GB).
Every block of T5-XXL is the same size, so the peak of a part-by-part export is the stored model plus about one
part; the whole export holds the whole model in fp32 beside the exporter's copy and the verification's session.
Run under `flock /tmp/sdrt-heavy.lock` on a shared machine.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sdrt.bench.load_memory import memory_status, reset_peak

XXL = {"d_model": 4096, "d_ff": 10240, "num_heads": 64, "d_kv": 64, "vocab_size": 32128, "blocks": 24}


def build(blocks: int):
    """A T5-XXL-wide T5EncoderModel of BLOCKS blocks, created in bf16 (never a full fp32 copy)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=XXL["vocab_size"], d_model=XXL["d_model"], d_kv=XXL["d_kv"], d_ff=XXL["d_ff"],
                      num_layers=blocks, num_heads=XXL["num_heads"], feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        return T5EncoderModel(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def run_one(blocks: int, part_bytes: int) -> dict:
    """Export in this process; its figures, with each part's time, peak RSS and error against torch."""
    from sdrt.export import t5

    encoder = build(blocks)
    built_rss = memory_status()["VmHWM"]
    params = sum(p.numel() for p in encoder.parameters())
    start = time.perf_counter()
    parts = []
    with tempfile.TemporaryDirectory() as folder:
        steps = t5.t5_steps(encoder, "text_encoder_3", part_bytes=part_bytes)
        for step in steps:
            reset_peak()
            began = time.perf_counter()
            blocks_range = step.manifest_entry["blocks"]
            error = step.run(Path(folder), "fp32")
            out = Path(folder) / step.spec.name
            parts.append({"blocks": blocks_range, "seconds": round(time.perf_counter() - began, 1),
                          "peak_rss_bytes": memory_status()["VmHWM"], "max_relative_error": error,
                          "onnx_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())})  # fmt: skip
            shutil.rmtree(out)  # measured and verified: a full T5-XXL's 19 GB of graphs never sit on disk at once
            print(f"part {len(parts) - 1} {parts[-1]}", file=sys.stderr, flush=True)
        del steps
    return {
        "blocks": blocks,
        "parameters": params,
        "parts": len(parts),
        "max_relative_error": max(p["max_relative_error"] for p in parts),
        "peak_rss_after_build_bytes": built_rss,
        "peak_rss_bytes": max([built_rss] + [p["peak_rss_bytes"] for p in parts]),
        "export_seconds": round(time.perf_counter() - start, 1),
        "per_part": parts,
    }


def markdown_table(report: dict) -> str:
    """The report as Markdown: one row per export, then one per part of the runs that list them."""
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    lines = ["| export | blocks | parameters | parts | peak RSS | after the build | time | max relative error |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, run in report["runs"].items():
        lines.append(f"| {label} | {run['blocks']} | {run['parameters'] / 1e9:.2f} B | {run['parts']} | "
                     f"{gb(run['peak_rss_bytes'])} | {gb(run['peak_rss_after_build_bytes'])} | "
                     f"{run['export_seconds']:.0f} s | {run['max_relative_error']:.2g} |")  # fmt: skip
    for label, run in report["runs"].items():
        if run.get("per_part"):
            lines += ["", f"Each part of \"{label}\" (peak RSS while it was exported, verified and dropped):", "",
                      "| part | blocks | ONNX files | peak RSS | time | max relative error |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            for index, part in enumerate(run["per_part"]):
                start, stop = part["blocks"]
                lines.append(f"| {index} | {start}-{stop - 1} | {gb(part['onnx_bytes'])} | "
                             f"{gb(part['peak_rss_bytes'])} | {part['seconds']:.0f} s | "
                             f"{part['max_relative_error']:.2g} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    from sdrt.bench.machine import report_head

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--parts-only",
        action="store_true",
        help="only the part-by-part export at export/t5.py's PART_BYTES (the whole one cannot fit)",
    )
    parser.add_argument("--one", nargs=2, type=int, metavar=("BLOCKS", "PART_BYTES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # the child: one export
        print(json.dumps(run_one(*args.one)))
        return 0
    per_block = 4 * (4 * XXL["d_model"] * XXL["d_kv"] * XXL["num_heads"] + 3 * XXL["d_model"] * XXL["d_ff"])
    runs = {}
    from sdrt.export.t5 import PART_BYTES

    plans = (("whole", 1 << 62), ("one block a part", per_block))
    if args.parts_only:
        plans = ((f"PART_BYTES {PART_BYTES / 1e9:g} GB", PART_BYTES),)
    for label, part_bytes in plans:
        child = [sys.executable, "-m", "sdrt.bench.t5_parts", "--one", str(args.blocks), str(part_bytes)]
        done = subprocess.run(child, stdout=subprocess.PIPE, text=True, check=True)  # stderr: each part as it ends
        runs[label] = json.loads(done.stdout.strip().splitlines()[-1])
        print(label, runs[label], file=sys.stderr)
    result = {
        **report_head("t5_parts", [f"--blocks {args.blocks}"] + ["--parts-only"] * args.parts_only),
        "model": {**XXL, "blocks_built": args.blocks, "stored_dtype": "bfloat16"},
        "runs": runs,
        "note": "shared machine (other agents' jobs running); peak RSS per process",
    }
    output = (
        args.output or Path("benchmarks/results") / f"t5-parts-{result['machine']['slug'].removeprefix('cpu-')}.json"
    )
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
