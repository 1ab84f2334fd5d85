"""Hires fix and an upscaler on the CPU, sdrt against PyTorch, each stage in its own subprocess of one run.

1. Hires fix on the full-size SD 1.5 architecture (random weights, `sdrt bench`'s build and export in --workdir):
   txt2img at --size, "Latent" (bilinear) x2, img2img at twice the size; sdrt's `hires=True` against diffusers
   doing the same two passes (StableDiffusionPipeline latents -> F.interpolate -> StableDiffusionImg2ImgPipeline).
   Time of each pass, peak RSS of each process, and the images' max difference (same weights and noise).
2. A Real-ESRGAN x4plus-sized RRDBNet (16.7 M parameters, random weights): the exported graph (ONNX Runtime)
   against the torch module on --tile px inputs: output megapixels per second.

    flock /tmp/sdrt-heavy.lock python -m sdrt.bench.hires_cpu [--size 256] [--steps 2] [--hires-steps 2]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from sdrt.bench import common
from sdrt.bench.machine import describe_machine

REPO = Path(__file__).resolve().parents[3]
MODULE = "sdrt.bench.hires_cpu"  # its subprocess workers: python -m MODULE --worker KIND JOB


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker_sdrt(job: dict) -> dict:
    import numpy as np

    from sdrt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(job["onnx_dir"])
    rounds = [_sdrt_round(pipe, job) for _ in range(job.get("rounds", 1))]  # the first: each size's first run
    images = [r.pop("image") for r in rounds]
    np.save(job["out"], images[-1])
    unet_graph = str(getattr(pipe.engines["unet"], "model_file", "?"))  # model.cpu.onnx: `sdrt optimize` variant
    return {**rounds[-1], "earlier_rounds": rounds[:-1], "unet_graph": unet_graph}


def _sdrt_round(pipe, job: dict) -> dict:
    import numpy as np

    marks = {}
    start = time.perf_counter()

    def callback(step, total, _):
        if step == job["steps"]:
            marks["first"] = time.perf_counter() - start

    size = job["size"]
    image = pipe.generate(common.PROMPT, negative_prompt=common.NEGATIVE_PROMPT, width=size, height=size,
                          steps=job["steps"], cfg_scale=common.CFG_SCALE, sampler="Euler", seed=job["seed"],
                          rng="torch", hires=True, hires_scale=2, hires_upscaler="Latent",
                          hires_steps=job["hires_steps"], strength=job["strength"], callback=callback,
                          progress=False)[0]  # fmt: skip
    total = time.perf_counter() - start
    return {"first_pass_s": marks["first"], "second_pass_s": total - marks["first"], "total_s": total,
            "image": np.asarray(image)}  # fmt: skip


def worker_diffusers(job: dict) -> dict:
    import diffusers
    import numpy as np
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(job["diffusers_dir"], torch_dtype=torch.float32,
                                                             safety_checker=None)  # fmt: skip
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rounds = [_diffusers_round(diffusers, pipe, job) for _ in range(job.get("rounds", 1))]
    images = [r.pop("image") for r in rounds]
    np.save(job["out"], images[-1])
    return {**rounds[-1], "earlier_rounds": rounds[:-1]}


def _diffusers_round(diffusers, pipe, job: dict) -> dict:
    import numpy as np
    import torch

    kw = dict(negative_prompt=common.NEGATIVE_PROMPT, guidance_scale=common.CFG_SCALE)
    start = time.perf_counter()
    with torch.no_grad():
        seeded = torch.Generator().manual_seed(job["seed"])
        latents = pipe(common.PROMPT, num_inference_steps=job["steps"], height=job["size"], width=job["size"],
                       output_type="latent", generator=seeded, **kw).images  # fmt: skip
        first = time.perf_counter() - start
        side = job["size"] * 2 // 8
        up = torch.nn.functional.interpolate(latents, size=(side, side), mode="bilinear")
        img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
        img2img.set_progress_bar_config(disable=True)
        hr, total = job["hires_steps"], int(job["hires_steps"] / min(job["strength"], 0.999))
        out = img2img(common.PROMPT, image=up, strength=(hr + 0.5) / total, num_inference_steps=total,
                      generator=torch.Generator().manual_seed(job["seed"]), output_type="np", **kw).images  # fmt: skip
    elapsed = time.perf_counter() - start
    return {"first_pass_s": first, "second_pass_s": elapsed - first, "total_s": elapsed,
            "image": (out[0] * 255).round().astype(np.uint8)}  # fmt: skip


def worker_upscaler(job: dict) -> dict:
    """The x4plus-sized RRDBNet: torch module and exported graph, interleaved rounds on the same input."""
    import numpy as np
    import torch

    from sdrt.export.upscaler import export_upscaler
    from sdrt.export.upscaler_arch import Arch, build
    from sdrt.runtime.upscale import UpscalerModel

    torch.manual_seed(0)
    model = build(Arch("ESRGAN", 4, 3, 3, features=64, blocks=23, growth=32)).eval()
    weights = Path(job["workdir"]) / "RealESRGAN_x4plus_random.pth"
    torch.save({"params_ema": model.state_dict()}, weights)
    folder = Path(job["workdir"]) / "RealESRGAN_x4plus_random"
    export_upscaler(weights, folder, overwrite=True)
    graph = UpscalerModel(folder)
    pixels = np.random.default_rng(0).random((job["tile"], job["tile"], 3), dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(pixels[..., ::-1].transpose(2, 0, 1)))[None]
    graph.run(pixels)  # warm-up (session creation)
    times = {"sdrt": [], "torch": []}
    for _ in range(job["runs"]):
        times["sdrt"].append(common.timed(lambda: graph.run(pixels)))
        with torch.no_grad():
            times["torch"].append(common.timed(lambda: model(x)))
    out_mp = (job["tile"] * 4) ** 2 / 1e6
    with torch.no_grad():
        ref = model(x)[0].numpy().transpose(1, 2, 0)[..., ::-1].clip(0, 1)
    return {
        "tile": job["tile"],
        "seconds": times,
        "megapixels_per_s": {k: out_mp / min(v) for k, v in times.items()},
        "max_abs_difference": float(np.abs(graph.run(pixels) - ref).max()),
    }


WORKERS = {"sdrt": worker_sdrt, "diffusers": worker_diffusers, "upscaler": worker_upscaler}


def child(kind: str, job: dict) -> dict:
    """Run WORKERS[KIND](JOB) in a fresh interpreter; its result plus wall time and peak RSS."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", MODULE, "--worker", kind, json.dumps(job)], capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return {**json.loads(line[len("RESULT") :]), "wall_s": time.perf_counter() - start}


def run_worker(kind: str, job: dict) -> dict:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return {**WORKERS[kind](job), "peak_rss_bytes": peak_rss()}


def hires_part(args) -> dict:
    """sdrt's hires fix and diffusers' two passes, each in its own process, and their images' max difference."""
    import numpy as np

    sd = args.workdir / "sd15"
    if not (sd / "onnx" / "model.json").is_file():
        sys.exit(f"no SD 1.5 export in {sd}: run `sdrt bench` (or python -m sdrt.bench.controlnet_cpu) once first")
    job = {"onnx_dir": str(sd / "onnx"), "diffusers_dir": str(sd / "diffusers"), "size": args.size,
           "steps": args.steps, "hires_steps": args.hires_steps, "strength": args.strength, "seed": 7,
           "rounds": args.rounds}  # fmt: skip
    report = {"job": job}
    for kind in ("sdrt", "diffusers"):
        common.log(f"hires fix: {kind}")
        report[kind] = child(kind, {**job, "out": str(args.workdir / f"hires-{kind}.npy")})
        common.log(f"  {report[kind]}")
    a, b = (np.load(args.workdir / f"hires-{k}.npy").astype(np.int16) for k in ("sdrt", "diffusers"))
    report["images_max_difference_255"] = int(np.abs(a - b).max())
    return report


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        print("RESULT" + json.dumps(run_worker(sys.argv[2], json.loads(sys.argv[3]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sdrt-bench"), help="sdrt bench's model folders")
    p.add_argument("--size", type=int, default=256, help="first-pass size (the second pass is twice it)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--hires-steps", type=int, default=2)
    p.add_argument("--strength", type=float, default=0.5)
    p.add_argument("--tile", type=int, default=64, help="upscaler input side in pixels")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--parts", default="hires,upscaler", help="hires, upscaler or both (default)")
    p.add_argument("--rounds", type=int, default=2, help="hires calls per process; the last is reported (default 2)")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "hires-cpu.json")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    report = {"machine": describe_machine(), "date": common.now_iso(), "command": sys.argv}
    if "hires" in parts:
        report |= hires_part(args)
    if "upscaler" in parts:
        common.log("upscaler: x4plus-sized RRDBNet")
        report["upscaler"] = child("upscaler", {"workdir": str(args.workdir), "tile": args.tile, "runs": args.runs})
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    common.log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
