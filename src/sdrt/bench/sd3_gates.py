"""The cost of SD 3's block gates (export/sd3_gates.py) on the normal path: one random SD3Transformer2DModel exported
twice, with and without the `block_gates` input, both run by ONNX Runtime on the same inputs (every gate open), the
two graphs timed in alternation so that a shared machine's load falls on both alike.

    python -m sdrt.bench.sd3_gates [--blocks 4] [--width 1536] [--size 512] [--runs 6]

The width and head size default to SD 3.5 Medium's (1536 = 24 heads x 64; 24 blocks there, fewer here: each block
costs the same, so the ratio does not depend on the count; the position-embedding grid is 96 patches, not 384, which
changes no block). Writes benchmarks/results/sd3-gates-<machine>.json.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build(blocks: int, width: int):
    """A random SD3Transformer2DModel shaped like SD 3.5 Medium's, BLOCKS blocks of WIDTH channels."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=blocks,
                                 attention_head_dim=64, num_attention_heads=width // 64, joint_attention_dim=4096,
                                 caption_projection_dim=width, pooled_projection_dim=2048, out_channels=16,
                                 pos_embed_max_size=96, qk_norm="rms_norm").eval()  # fmt: skip


def ungated_forward(held, hidden_states, timestep, encoder_hidden_states, pooled_projections):
    return held.inner(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                      pooled_projections=pooled_projections, return_dict=False)[0]  # fmt: skip


def export_both(transformer, folder: Path, latent: int) -> dict[str, Path]:
    """{"ungated": graph, "gated": graph} of TRANSFORMER, traced at LATENT x LATENT latents."""
    import torch

    from sdrt.export import sd3
    from sdrt.export.flow_parts import Held
    from sdrt.export.sd3_gates import gate_blocks
    from sdrt.export.to_onnx import export_onnx
    from sdrt.runtime.flow_specs import sd3_transformer_spec

    config = transformer.config
    inputs = (torch.randn(1, 16, latent, latent), torch.tensor([500.0]), torch.randn(1, 333, 4096),
              torch.randn(1, 2048))  # fmt: skip
    files = {"ungated": folder / "ungated" / "model.onnx", "gated": folder / "gated" / "model.onnx"}
    spec = sd3_transformer_spec(16, 4096, 2048)
    export_onnx(Held(transformer), ungated_forward, spec, inputs, files["ungated"])
    held = Held(transformer)
    held.gates = gate_blocks(transformer)
    spec = sd3_transformer_spec(16, 4096, 2048, config.num_layers)
    export_onnx(held, sd3.sd3_forward, spec, (*inputs, torch.ones(config.num_layers)), files["gated"])
    return files


def time_both(files: dict[str, Path], latent: int, blocks: int, runs: int) -> dict:
    """Per-call seconds of each graph (median of RUNS, alternating), and the largest output difference."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = {"hidden_states": rng.standard_normal((1, 16, latent, latent), dtype=np.float32),
             "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 333, 4096), dtype=np.float32),
             "pooled_projections": rng.standard_normal((1, 2048), dtype=np.float32)}  # fmt: skip
    sessions = {name: ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for name, f in files.items()}
    extra = {"ungated": {}, "gated": {"block_gates": np.ones(blocks, np.float32)}}
    outputs = {name: s.run(None, {**feeds, **extra[name]})[0] for name, s in sessions.items()}  # warm-up
    times = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {**feeds, **extra[name]})
            times[name].append(time.perf_counter() - start)
    median = {name: float(np.median(t)) for name, t in times.items()}
    return {"seconds_per_call": median, "gated_over_ungated": round(median["gated"] / median["ungated"], 4),
            "max_abs_output_difference": float(np.abs(outputs["gated"] - outputs["ungated"]).max()),
            "all_seconds": times}  # fmt: skip


def main(argv=None) -> int:
    from sdrt.bench.machine import report_head

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--size", type=int, default=512, help="image pixels (latents: size / 8)")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    latent = args.size // 8
    with tempfile.TemporaryDirectory() as folder:
        files = export_both(build(args.blocks, args.width), Path(folder), latent)
        figures = time_both(files, latent, args.blocks, args.runs)
    settings = f"--blocks {args.blocks} --width {args.width} --size {args.size} --runs {args.runs}"
    result = {
        **report_head("sd3_gates", [settings]),
        "model": {"blocks": args.blocks, "width": args.width, "image_tokens": (latent // 2) ** 2, "text_tokens": 333},
        **figures,
        "note": "shared machine (other agents' jobs running); the two graphs timed in alternation, fp32, ONNX Runtime "
        "CPU",
    }
    output = (
        args.output or Path("benchmarks/results") / f"sd3-gates-{result['machine']['slug'].removeprefix('cpu-')}.json"
    )
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(output, figures["seconds_per_call"], figures["gated_over_ungated"], figures["max_abs_output_difference"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
