"""LoRA switching on OpenVINO beside ONNX Runtime's CPU engine, on the full-size SD 1.5 architecture (random weights):
the switch times of each engine (the same LoRAs and sequence), OpenVINO's compile count, and what weights-as-inputs
cost per UNet call against OpenVINO with the weights as constants (alternated, the same inputs).

    python -m sdrt.bench.lora_engines MODEL_DIR [--loras /tmp/sdrt-lora-bench/loras --size 256 --rounds 3]
    python -m sdrt.bench.lora_engines MODEL_DIR --pipelines cuda:fused,cuda   # a GPU: benchmarks/gpu_check.sh

--pipelines BACKEND[:fused],...: instead, for each, a Pipeline loaded with the LoRA folder (fused: on the fused
graph variant, `sdrt optimize`): the switch times, and UNet calls (a step) with and without LoRA a, alternated.

The LoRA files a and b are sdrt.bench.lora_switch's (rank 32 on every layer), made in --loras when absent.

Writes benchmarks/results/lora-engines-<machine>.json. Every figure is a wall-clock time: run it on a quiet machine.
"""

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

SEQUENCE = [("none -> a (first use)", "<lora:a:0.8>"), ("a -> b", "<lora:b:0.8>"), ("b -> a", "<lora:a:0.8>"),
            ("a -> a + b", "<lora:a:0.8><lora:b:0.5>"), ("a + b -> none", "")]  # fmt: skip


def engines_for(manifest, backend: str) -> dict:
    """The text encoder and UNet engines of MANIFEST on BACKEND (what LoRAs change), loaded."""
    from sdrt.engines import create_engine

    engines = {name: create_engine(manifest.model_path(name), backend) for name in ("text_encoder", "unet")}
    for engine in engines.values():
        engine.load()
    return engines


def unet_feeds(manifest, size: int) -> dict:
    rng = np.random.default_rng(0)
    side = size // manifest.latent_downsample
    hidden = (2, manifest.text_max_length, manifest.text_hidden_size)
    return {"sample": rng.standard_normal((2, manifest.latent_channels, side, side)).astype(np.float32),
            "timestep": np.array([500.0, 500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal(hidden).astype(np.float32)}  # fmt: skip


def switches(manifest, engines: dict, loras: Path, feeds: dict) -> list[dict]:
    """Seconds per switch of SEQUENCE (the LoRA files parsed before: their reading is not the engine's)."""
    from sdrt.bench.common import log
    from sdrt.runtime.lora import Loras, parse_prompt

    index = Loras(manifest, engines).load_dir(loras)
    index.prepare_engines()
    index.file("a"), index.file("b")
    engines["unet"].run(feeds)  # the base model compiled (OpenVINO) before the first switch
    rows = []
    for label, prompt in SEQUENCE:
        t = time.perf_counter()
        index.apply(parse_prompt(prompt)[1])
        row = {"switch": label, "s": round(time.perf_counter() - t, 3)}
        t = time.perf_counter()
        engines["unet"].run(feeds)  # the first call after the switch (a compile would show here)
        row["next_unet_call_s"] = round(time.perf_counter() - t, 3)
        row["compiles"] = getattr(engines["unet"], "compiles", None)
        log(f"{engines['unet'].__class__.__name__} {row}")
        rows.append(row)
    return rows


def zero_terms(model_file: Path, names) -> dict:
    """{initializer: [a rank-1 LowRank of zeros]}: a merge that makes NAMES inputs of OpenVINO's LoRA model."""
    from sdrt.engines.onnx_weights import OnnxWeights
    from sdrt.engines.weight_merge import LowRank

    graph = OnnxWeights(model_file)
    shapes = {name: graph.initializers[name].shape for name in names}
    graph.close()
    return {name: [LowRank(np.zeros((s[0], 1), np.float32), np.zeros((1, int(np.prod(s[1:]))), np.float32))]
            for name, s in shapes.items()}  # fmt: skip


def per_call(manifest, feeds: dict, rounds: int, precisions=("f32",)) -> dict:
    """UNet call seconds, alternated: ONNX Runtime's CPU engine (a plain, prepacked session), then on OpenVINO at each
    of PRECISIONS: weights as constants, the Linear layers' weights as inputs (what a kohya LoRA of attention layers
    touches) and every mapped weight as an input (a LoCon on every layer)."""
    from sdrt.engines import create_engine

    layers = manifest.weight_map("unet").values()
    linear = sorted({layer["initializer"] for layer in layers if len(layer["shape"]) == 2})
    every = sorted({layer["initializer"] for layer in layers})
    path = manifest.model_path("unet")
    engines = {"ONNX Runtime CPU": create_engine(path, "cpu")}
    for precision in precisions:
        backend = f"openvino-{precision}"
        engines[f"{backend}, weights as constants"] = create_engine(path, backend)
        for label, names in ((f"{len(linear)} Linear weights", linear), (f"all {len(every)} weights", every)):
            engines[f"{backend}, {label} as inputs"] = create_engine(path, backend)
            engines[f"{backend}, {label} as inputs"].merge_weights(zero_terms(path, names))
    times = {state: [] for state in engines}
    for engine in engines.values():
        engine.run(feeds)  # compile + warm-up
    for _ in range(rounds):
        for state, engine in engines.items():
            t = time.perf_counter()
            engine.run(feeds)
            times[state].append(round(time.perf_counter() - t, 3))
    return times


def pipeline_lora(model: Path, spec: str, loras: Path, feeds: dict, rounds: int) -> dict:
    """SPEC "BACKEND[:fused]": switch times of SEQUENCE and UNet call seconds (base, LoRA a at 0.8, alternated) of a
    Pipeline on BACKEND loaded with the LoRA folder."""
    from sdrt.bench.common import log
    from sdrt.runtime.lora import parse_prompt
    from sdrt.runtime.pipeline import Pipeline

    backend, _, variant = spec.partition(":")
    t = time.perf_counter()
    pipe = Pipeline.load(model, backend=backend, fused=variant == "fused", loras=loras)
    result = {"load_s": round(time.perf_counter() - t, 3), "unet_file": pipe.engines["unet"].model_file.name}
    unet = pipe.engines["unet"]
    unet.run(feeds)  # warm-up
    for name in ("a", "b"):
        pipe.loras.file(name)  # read before the switches: the file's parse is not the engine's
    rows = []
    for label, prompt in SEQUENCE:
        t = time.perf_counter()
        pipe.loras.apply(parse_prompt(prompt)[1])
        row = {"switch": label, "s": round(time.perf_counter() - t, 3)}
        t = time.perf_counter()
        unet.run(feeds)
        row["next_unet_call_s"] = round(time.perf_counter() - t, 3)
        log(f"{spec} {row}")
        rows.append(row)
    result["switches"] = rows
    calls = {"base": [], "LoRA a at 0.8": []}
    for _ in range(rounds):
        for state, prompt in (("base", ""), ("LoRA a at 0.8", "<lora:a:0.8>")):
            pipe.loras.apply(parse_prompt(prompt)[1])
            unet.run(feeds)  # warm-up (ONNX Runtime CPU: starts the prepacked session's build)
            if hasattr(unet, "_swap"):
                unet._swap.wait()
            unet.run(feeds)
            t = time.perf_counter()
            unet.run(feeds)
            calls[state].append(round(time.perf_counter() - t, 4))
    result["unet_call_s"] = calls
    log(f"{spec} UNet call: {calls}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdrt.bench.lora_engines", description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, help="an exported SD 1.5-architecture folder (fp32)")
    p.add_argument("--loras", type=Path, default=Path("/tmp/sdrt-lora-bench/loras"), help="folder with a and b")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pipelines", help="BACKEND[:fused],...: Pipelines with the LoRA folder instead (a GPU's)")
    p.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/lora-engines-<machine>.json)")
    p.add_argument("--precisions", default="f32", help="OpenVINO precisions of the per-call timing (f32,bf16)")
    p.add_argument("--per-call-only", action="store_true", help="the UNet call timing only (no switches)")
    args = p.parse_args(argv)
    from sdrt.bench.common import RESULTS_DIR, log, now_iso
    from sdrt.bench.lora_switch import random_lora
    from sdrt.bench.machine import describe_machine
    from sdrt.runtime.manifest import Manifest

    load_average = [round(os.getloadavg()[0], 2)]
    manifest = Manifest.load(args.model)
    feeds = unet_feeds(manifest, args.size)

    args.loras.mkdir(parents=True, exist_ok=True)
    for name, seed in (("a", 1), ("b", 2)):
        if not (args.loras / f"{name}.safetensors").is_file():
            random_lora(manifest, args.loras / f"{name}.safetensors", seed)
    report = {"benchmark": "lora_engines", "date": now_iso(), "machine": describe_machine(), "model": str(args.model),
              "size": args.size}  # fmt: skip
    for spec in args.pipelines.split(",") if args.pipelines else ():
        try:
            report[f"pipeline_{spec}"] = pipeline_lora(args.model, spec, args.loras, feeds, args.rounds)
        except Exception as e:  # recorded: the next spec still runs
            report[f"pipeline_{spec}"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"{spec}: {type(e).__name__}: {e}")
        gc.collect()
    if not args.pipelines:
        report["openvino_unet_call_s"] = per_call(manifest, feeds, args.rounds, args.precisions.split(","))
        log(f"OpenVINO UNet call: {report['openvino_unet_call_s']}")
        gc.collect()
    for backend in ("openvino-f32", "cpu") if not (args.pipelines or args.per_call_only) else ():
        engines = engines_for(manifest, backend)
        report[f"switches_{backend}"] = switches(manifest, engines, args.loras, feeds)
        del engines
        gc.collect()
    report["load_average_1min"] = [*load_average, round(os.getloadavg()[0], 2)]
    report["command"] = " ".join(sys.argv)
    out = args.output or RESULTS_DIR / f"lora-engines-{report['machine'].get('slug', 'machine')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
