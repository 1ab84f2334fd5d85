"""LoRA switching on the full-size SD 1.5 architecture (random weights), CPU backend: how long applying, switching
and removing a rank-32 LoRA over every attention and conv layer takes, what dominates, and the generation time
with a LoRA merged against without (whole generations, and UNet calls on the same inputs).

    sdrt bench --model sd15 --workdir /tmp/sdrt-bench   # builds and exports the random model once (or reuse one)
    python -m sdrt.bench.lora_switch /tmp/sdrt-bench/sd15/onnx [--size 256 --steps 10 --runs 2]

Writes benchmarks/results/lora-<machine>.json. Run it on a quiet machine: every figure is a wall-clock time.
"""

import argparse
import gc
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
    """A kohya LoCon file of rank RANK on every layer of the model's weight maps (UNet and text encoders)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    two = "text_encoder_2" in manifest.models  # SDXL: kohya's lora_te1_ / lora_te2_
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if two else "lora_te_", "text_encoder_2": "lora_te2_"}
    for part, prefix in prefixes.items():
        if part not in manifest.models:
            continue
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


def unet_call_times(pipe, size: int, rounds: int, calls: int = 2) -> dict[str, list[float]]:
    """Seconds per UNet call on the same inputs (a generation's first step), with the base weights and with LoRA a
    merged, alternated: the cost of the merged weights themselves. A whole generation with a LoRA also runs on other
    data (the LoRA changes the text conditioning, hence every latent), which alone moves a CPU's kernel times."""
    from sdrt.runtime.lora import parse_prompt

    unet = pipe.engines["unet"]
    run, captured = unet.run, []

    def capture(feeds):
        captured.append({name: np.array(value, copy=True) for name, value in feeds.items()})
        return run(feeds)

    unet.run = capture
    pipe.generate("a photo", width=size, height=size, steps=1, seed=1, progress=False)
    unet.run = run
    times = {"base": [], "LoRA a at 0.8": []}
    for _ in range(rounds):
        for state, prompt in (("base", ""), ("LoRA a at 0.8", "<lora:a:0.8>")):
            pipe.loras.apply(parse_prompt(prompt)[1])
            run(captured[0])  # warm-up (in place; starts the prepacked session's build)
            unet._swap.wait()
            run(captured[0])  # the prepacked session swapped in
            for _ in range(calls):
                t = time.perf_counter()
                run(captured[0])
                times[state].append(time.perf_counter() - t)
    return times


def prepacking_cost(model: Path, size: int, rounds: int = 3) -> dict[str, list[float]]:
    """Seconds per UNet call at SIZE x SIZE (batch 2), alternated: a plain session (ONNX Runtime prepacks its
    weights), the in-place session of an engine that takes LoRAs (every mapped weight in a buffer rewritten in place,
    without prepacking) and the prepacked session that engine swaps in behind it (engines/prepacked_swap.py), over
    the same buffers."""
    from sdrt.bench.common import log
    from sdrt.engines.onnxruntime import OnnxRuntimeEngine
    from sdrt.runtime.manifest import Manifest

    manifest = Manifest.load(model)
    names = sorted({layer["initializer"] for layer in manifest.weight_map("unet").values()})
    plain = OnnxRuntimeEngine(manifest.model_path("unet"), ["CPUExecutionProvider"])
    in_place = OnnxRuntimeEngine(manifest.model_path("unet"), ["CPUExecutionProvider"])
    in_place.merge_weights({name: [] for name in names[:1]})  # makes the LoRA-capable session...
    in_place.merge_weights({name: [] for name in names})  # ...with every mapped weight in it
    plain.load()
    width = next(i.shape[-1] for i in plain.session.get_inputs() if i.name == "encoder_hidden_states")  # 768: SD 1.5
    rng = np.random.default_rng(0)
    side = size // 8
    feeds = {"sample": rng.standard_normal((2, 4, side, side)).astype(np.float32),
             "timestep": np.array([500.0, 500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, width)).astype(np.float32)}  # fmt: skip
    plain.run(feeds)  # warm-up
    in_place.run(feeds)  # warm-up in place; starts the prepacked session's build
    in_place._swap.wait()
    log(f"prepacked session behind the in-place one made in {in_place._swap.last_build_s:.2f} s")
    in_place.run(feeds)  # swaps it in
    assert in_place.session is not in_place._swap.live, "no prepacked session swapped in"
    runs = {"prepacked": lambda: plain.run(feeds),
            "in place, no prepacking": lambda: in_place._swap.live.run(in_place.output_names, feeds),
            "LoRA engine, prepacked session swapped in": lambda: in_place.run(feeds)}  # fmt: skip
    times = {state: [] for state in runs}
    for _ in range(rounds):
        for state, run in runs.items():
            t = time.perf_counter()
            run()
            times[state].append(time.perf_counter() - t)
    times["prepacked build (background)"] = [in_place._swap.last_build_s]
    return times


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def switching(args, loras: Path) -> dict:
    """Load with the LoRA folder, then time switches, generations per state and UNet calls on the same inputs (only
    the switches with --switches-only)."""
    from sdrt.bench.common import log
    from sdrt.runtime.pipeline import Pipeline

    Pipeline.load(args.model)  # fills the per-machine optimised-graph cache, so the load below is the usual one
    start = time.perf_counter()
    pipe = Pipeline.load(args.model, loras=loras)
    load_s = time.perf_counter() - start
    log(f"load (from the optimised-graph cache): {load_s:.2f} s")
    if args.switches_only:
        return {"load_s": load_s, "switches": switch_sequence(pipe), "peak_rss_gib": peak_rss_gib()}

    def generate(prompt):
        t = time.perf_counter()
        pipe.generate(prompt, width=args.size, height=args.size, steps=args.steps, seed=1, progress=False)
        return time.perf_counter() - t

    timed_runs, first_runs = {}, {}

    def generations(prompt, state):
        # the first after a change runs in place, beside the prepacked session's build; the rest run prepacked
        first_runs[state] = [generate(prompt)]
        for engine in pipe.engines.values():
            if hasattr(engine, "_swap"):
                engine._swap.wait()
        timed_runs[state] = [generate(prompt) for _ in range(args.runs)]

    generations("a photo", "base, before any LoRA")
    switches = switch_sequence(pipe, between=lambda: generations("a photo <lora:a:0.8>", "LoRA a at 0.8"))
    generations("a photo", "base, after LoRAs")
    unet_calls = unet_call_times(pipe, args.size, rounds=max(2, args.runs + 1))
    log(f"UNet call on the same inputs: {unet_calls}")
    return {"load_s": load_s, "switches": switches, "generations": timed_runs, "first_generations": first_runs,
            "unet_calls": unet_calls, "peak_rss_gib": peak_rss_gib()}  # fmt: skip


def switch_sequence(pipe, between=None) -> list[dict]:
    """Times of the switches none -> a -> b -> a -> a + b -> none -> b -> a -> none (BETWEEN called before the last
    one, with LoRA a merged), each one's LoRA terms and engines' merges timed apart."""
    from sdrt.bench.common import log
    from sdrt.runtime.lora import parse_prompt

    timings = {"terms_s": 0.0, "merge_s": 0.0}
    for engine in pipe.engines.values():  # time the two halves of a switch: the LoRA terms, the engines' merge
        original = engine.merge_weights

        def timed_merge(updates, original=original):
            t = time.perf_counter()
            original(updates)
            timings["merge_s"] += time.perf_counter() - t

        engine.merge_weights = timed_merge
    updates = pipe.loras.updates

    def timed_updates(part, signature):
        t = time.perf_counter()
        out = updates(part, signature)
        timings["terms_s"] += time.perf_counter() - t
        return out

    pipe.loras.updates = timed_updates

    def switch(label, prompt):
        timings.update(terms_s=0.0, merge_s=0.0)
        t = time.perf_counter()
        pipe.loras.apply(parse_prompt(prompt)[1])
        total = time.perf_counter() - t
        row = {"switch": label, "total_s": round(total, 3), "terms_s": round(timings["terms_s"], 3),
               "merge_s": round(timings["merge_s"], 3), "peak_rss_gib": round(peak_rss_gib(), 2)}  # fmt: skip
        log(f"{label}: {row}")
        return row

    sequence = [("none -> a (first use)", "<lora:a:0.8>"), ("a -> b", "<lora:b:0.8>"), ("b -> a", "<lora:a:0.8>"),
                ("a -> a + b", "<lora:a:0.8><lora:b:0.5>"), ("a + b -> none (base)", ""),
                ("none -> b", "<lora:b:0.8>"), ("b -> a", "<lora:a:0.8>")]  # fmt: skip
    rows = [switch(label, prompt) for label, prompt in sequence]
    if between is not None:
        between()
    rows.append(switch("a -> none (base)", ""))
    return rows


def summary(runs: dict[str, list[float]], digits: int) -> dict:
    """{"runs_s": ..., "median_s": ...} of RUNS {state: seconds}."""
    return {"runs_s": {state: [round(x, digits) for x in times] for state, times in runs.items()},
            "median_s": {state: round(statistics.median(times), digits) for state, times in runs.items()}}  # fmt: skip


def markdown_table(report: dict) -> str:
    """The run's tables: each switch (total and the engines' merge), then generation and UNet call times per state."""
    lines = [f"LoRAs of rank {report['rank']} on {report['layers_per_lora']} layers each; "
             f"load from the optimised-graph cache {report['load_s']:.2f} s; peak RSS {report['peak_rss_gib']:.2f} GiB",
             "", "| switch | total (s) | of which the engines' merge (s) |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {row['switch']} | {row['total_s']:.2f} | {row['merge_s']:.2f} |" for row in report["switches"]]
    gen = report["generation"]
    sections = [(f"whole generation, {gen['size']}x{gen['size']}, {gen['steps']} steps", gen)]
    sections.append(("first generation after a change (the prepacked build beside it)",
                     report.get("first_generation_after_change", {})))  # fmt: skip
    sections.append(("one UNet call on the same inputs", report.get("unet_call_same_inputs", {})))
    prepack = report.get("unet_call_prepacking") or {}
    if prepack.get("median_s"):
        sections.append((f"one UNet call, {prepack['size']}x{prepack['size']}, batch 2", prepack))
    for title, timed in [(title, timed) for title, timed in sections if timed.get("median_s")]:
        lines += ["", f"| {title} | runs (s) | median (s) |", "|---|---|---|"]
        lines += [f"| {state} | {', '.join(f'{t:.2f}' for t in runs)} | {timed['median_s'][state]:.2f} |"
                  for state, runs in timed["runs_s"].items()]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdrt.bench.lora_switch", description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, help="an exported SD 1.5-architecture folder (fp32)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--runs", type=int, default=2, help="generations per state (base / LoRA), alternated")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sdrt-lora-bench"))
    p.add_argument("--prepacking-size", type=int, default=512,
                   help="image size of the UNet calls timed with and without prepacking (0: skip)")  # fmt: skip
    p.add_argument("--switches-only", action="store_true", help="time the load and the switches only")
    p.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/lora-<machine>.json)")
    args = p.parse_args(argv)

    from sdrt.bench.common import RESULTS_DIR, log, now_iso
    from sdrt.bench.machine import describe_machine
    from sdrt.runtime.manifest import Manifest

    load_average = [round(os.getloadavg()[0], 2)]  # other processes' share of the CPU: timings are wall-clock
    manifest = Manifest.load(args.model)
    loras = args.workdir / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    layers = {name: random_lora(manifest, loras / f"{name}.safetensors", seed) for name, seed in (("a", 1), ("b", 2))}
    log(f"LoRAs a and b: rank {RANK} on {layers['a']} layers each")

    measured = switching(args, loras)
    gc.collect()  # the pipeline's memory back (its engines' timing wrappers make reference cycles)
    sized = args.prepacking_size and not args.switches_only
    prepacking = prepacking_cost(args.model, args.prepacking_size) if sized else {}
    log(f"UNet call at {args.prepacking_size}x{args.prepacking_size}, with and without prepacking: {prepacking}")
    report = {
        "benchmark": "lora_switch",
        "date": now_iso(),
        "machine": describe_machine(),
        "model": str(args.model),
        "rank": RANK,
        "layers_per_lora": layers["a"],
        "load_s": round(measured["load_s"], 2),
        "switches": measured["switches"],
        "generation": {"size": args.size, "steps": args.steps, **summary(measured.get("generations", {}), 2)},
        "first_generation_after_change": summary(measured.get("first_generations", {}), 2),
        "unet_call_same_inputs": summary(measured.get("unet_calls", {}), 3),
        "unet_call_prepacking": {"size": args.prepacking_size, **summary(prepacking, 3)},
        "peak_rss_gib": round(measured["peak_rss_gib"], 2),  # the LoRA pipeline's, before the prepacking check
        "load_average_1min": [*load_average, round(os.getloadavg()[0], 2)],  # at start and end
        "command": " ".join(["python -m sdrt.bench.lora_switch", *(argv if argv is not None else sys.argv[1:])]),
    }
    out = args.output or RESULTS_DIR / f"lora-{report['machine'].get('slug', 'machine')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out}")
    print(markdown_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
