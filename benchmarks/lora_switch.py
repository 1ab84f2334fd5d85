"""LoRA switching on the full-size SD 1.5 architecture (random weights), CPU backend: how long applying, switching
and removing a rank-32 LoRA over every attention and conv layer takes, what dominates, and the generation time
with a LoRA merged against without.

    sdrt bench --model sd15 --workdir /tmp/sdrt-bench   # builds and exports the random model once (or reuse one)
    python benchmarks/lora_switch.py /tmp/sdrt-bench/sd15/onnx [--size 256 --steps 10 --runs 2]

Writes benchmarks/results/lora-<machine>.json. Run it on a quiet machine: every figure is a wall-clock time.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

RANK = 32
ALPHA = 16.0


def random_lora(manifest, path: Path, seed: int) -> int:
    """A kohya LoCon file of rank RANK on every layer of the model's weight maps (UNet and text encoder)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for part, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for name, layer in manifest.weight_map(part).items():
            shape = layer["shape"]
            key = prefix + name.replace(".", "_")
            kernel = tuple(shape[2:])
            down = rng.standard_normal((RANK, shape[1], *kernel)) * 0.01
            tensors[f"{key}.lora_down.weight"] = down.astype(np.float16)
            tensors[f"{key}.lora_up.weight"] = (rng.standard_normal((shape[0], RANK, *((1, 1) if kernel else ())))
                                                * 0.01).astype(np.float16)  # fmt: skip
            tensors[f"{key}.alpha"] = np.array(ALPHA, np.float16)
    save_file(tensors, str(path))
    return len(tensors) // 3


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, help="an exported SD 1.5-architecture folder (fp32)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--runs", type=int, default=2, help="generations per state (base / LoRA), alternated")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sdrt-lora-bench"))
    args = p.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sdrt import Pipeline
    from sdrt.bench.common import describe_machine, log
    from sdrt.runtime.manifest import Manifest

    load_average = [round(os.getloadavg()[0], 2)]  # other processes' share of the CPU: timings are wall-clock
    manifest = Manifest.load(args.model)
    loras = args.workdir / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    layers = {name: random_lora(manifest, loras / f"{name}.safetensors", seed) for name, seed in (("a", 1), ("b", 2))}
    log(f"LoRAs a and b: rank {RANK} on {layers['a']} layers each")

    Pipeline.load(args.model)  # fills the per-machine optimised-graph cache, so the load below is the usual one
    start = time.perf_counter()
    pipe = Pipeline.load(args.model, loras=loras)
    load_s = time.perf_counter() - start
    log(f"load (from the optimised-graph cache): {load_s:.2f} s")

    timings = {"merge_s": 0.0, "engine_s": 0.0}
    for engine in pipe.engines.values():  # time the two halves of a switch: numpy merge, engine session rebuild
        original = engine.set_weights

        def timed_set(weights, original=original):
            t = time.perf_counter()
            original(weights)
            timings["engine_s"] += time.perf_counter() - t

        engine.set_weights = timed_set
    merged = pipe.loras.merged

    def timed_merged(part, signature):
        t = time.perf_counter()
        out = merged(part, signature)
        timings["merge_s"] += time.perf_counter() - t
        return out

    pipe.loras.merged = timed_merged

    def switch(label, prompt):
        timings.update(merge_s=0.0, engine_s=0.0)
        from sdrt.runtime.lora import parse_prompt

        t = time.perf_counter()
        pipe.loras.apply(parse_prompt(prompt)[1])
        total = time.perf_counter() - t
        row = {"switch": label, "total_s": round(total, 3), "merge_s": round(timings["merge_s"], 3),
               "engine_s": round(timings["engine_s"], 3), "peak_rss_gib": round(peak_rss_gib(), 2)}  # fmt: skip
        log(f"{label}: {row}")
        return row

    def generate(prompt):
        t = time.perf_counter()
        pipe.generate(prompt, width=args.size, height=args.size, steps=args.steps, seed=1, progress=False)
        return time.perf_counter() - t

    def generations(prompt):
        generate(prompt)  # warm-up
        return [generate(prompt) for _ in range(args.runs)]

    timed_runs = {"base, before any LoRA (sessions with prepacked weights)": generations("a photo")}
    switches = [
        switch("none -> a (first: reads the base layers, finds their places, builds the sessions)", "<lora:a:0.8>"),
        switch("a -> b", "<lora:b:0.8>"),
        switch("b -> a", "<lora:a:0.8>"),
        switch("a -> a + b", "<lora:a:0.8><lora:b:0.5>"),
        switch("a + b -> none (base)", ""),
        switch("none -> b", "<lora:b:0.8>"),
        switch("b -> a", "<lora:a:0.8>"),
    ]
    timed_runs["LoRA a at 0.8"] = generations("a photo <lora:a:0.8>")
    switches.append(switch("a -> none (base)", ""))
    timed_runs["base, after LoRAs (in-place sessions, no prepacking)"] = generations("a photo")
    report = {
        "machine": describe_machine(),
        "model": str(args.model),
        "rank": RANK,
        "layers_per_lora": layers["a"],
        "load_s": round(load_s, 2),
        "switches": switches,
        "generation": {
            "size": args.size,
            "steps": args.steps,
            "runs_s": {state: [round(x, 2) for x in runs] for state, runs in timed_runs.items()},
            "median_s": {state: round(statistics.median(runs), 2) for state, runs in timed_runs.items()},
        },
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "load_average_1min": [*load_average, round(os.getloadavg()[0], 2)],  # at start and end
        "command": " ".join(sys.argv),
    }
    out = Path(__file__).parent / "results" / f"lora-{report['machine'].get('slug', 'machine')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out}")
    print(json.dumps(report["generation"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
