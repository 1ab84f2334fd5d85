"""ControlNet on the CPU backend: the full-size SD 1.5 UNet and an SD 1.5 ControlNet (random weights), sdrt only.

Measures, in one run on one machine: the export of the two extra graphs (`sdrt export-controlnet` and the model's
`unet_controlnet`: wall time, peak RSS, size on disk) and txt2img time with 0, 1 and 2 ControlNets (the median of
--runs after a warm-up), each stage in its own subprocess. Speed does not depend on the weights' values.

    flock /tmp/sdrt-heavy.lock python benchmarks/controlnet_cpu.py [--size 256] [--steps 10] [--runs 2]

Reuses `sdrt bench`'s random SD 1.5 build and export in --workdir (built and exported there if missing); the model
copy that gets the unet_controlnet graph is a hard-linked copy in --out (the shared export stays as it is).
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from sdrt.bench import common  # noqa: E402
from sdrt.bench.cases import CASES  # noqa: E402


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and ".ort-cache" not in p.parts)


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker_build_controlnet(job: dict) -> dict:
    """An SD 1.5 ControlNet (ControlNetModel.from_unet of the random UNet: 361 M parameters) as a diffusers folder."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(job["diffusers_dir"], subfolder="unet", torch_dtype=torch.float32)
    controlnet = ControlNetModel.from_unet(unet)
    controlnet.save_pretrained(job["controlnet_diffusers"])
    return {"parameters": sum(p.numel() for p in controlnet.parameters())}


def worker_export_controlnet(job: dict) -> dict:
    from sdrt.export.controlnet import export_controlnet

    start = time.perf_counter()
    export_controlnet(job["controlnet_diffusers"], job["controlnet_dir"], overwrite=True)
    return {"call_s": time.perf_counter() - start}


def worker_add_unet(job: dict) -> dict:
    from sdrt.export.controlnet import add_unet_controlnet

    start = time.perf_counter()
    add_unet_controlnet(job["diffusers_dir"], job["model_dir"])
    return {"call_s": time.perf_counter() - start}


def worker_generate(job: dict) -> dict:
    """txt2img with 0, 1 and 2 ControlNets (the second: the same ControlNet again, the same work as another)."""
    import numpy as np

    from sdrt import Pipeline
    from sdrt.runtime.controlnet import ControlNetUnit

    pipe = Pipeline.load(job["model_dir"])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (job["size"], job["size"], 3), dtype=np.uint8)
    unit = ControlNetUnit(job["controlnet_dir"], image, module="canny", resize_mode="Just Resize")
    results = {}
    for n in (0, 1, 2):

        def run(n=n):
            pipe.generate(common.PROMPT, negative_prompt=common.NEGATIVE_PROMPT, width=job["size"], height=job["size"],
                          steps=job["steps"], cfg_scale=common.CFG_SCALE, sampler=common.SAMPLER, seed=job["seed"],
                          progress=False, controlnets=[unit] * n or None)  # fmt: skip

        results[str(n)] = common.measure(f"{n} ControlNet(s)", run, job["runs"])
    results["peak_rss_bytes"] = peak_rss()
    return results


def worker_calls(job: dict) -> dict:
    """One guided step's engine calls at the job's size, interleaved round by round (so a load that drifts during the
    run touches every kind alike): the plain UNet, the unet_controlnet graph, and the ControlNet, each at batch 2.
    Returns each call's times and the per-round ratios to the plain UNet."""
    import statistics

    import numpy as np

    from sdrt.engines import create_engine
    from sdrt.runtime.controlnet import ControlNetInfo
    from sdrt.runtime.manifest import Manifest

    manifest = Manifest.load(job["model_dir"])
    info = ControlNetInfo.load(job["controlnet_dir"])
    engines = {name: create_engine(manifest.model_path(name), "cpu") for name in ("unet", "unet_controlnet")}
    engines["controlnet"] = create_engine(info.model_file, "cpu")
    for engine in engines.values():
        engine.load()
    rng = np.random.default_rng(0)
    h = w = job["size"] // 8
    base = {"sample": rng.standard_normal((2, 4, h, w), dtype=np.float32), "timestep": np.full(2, 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}  # fmt: skip
    control = engines["controlnet"].run({**base, "controlnet_cond": rng.random((2, 3, h * 8, w * 8), np.float32)})
    feeds = {"unet": base, "unet_controlnet": {**base, **control},
             "controlnet": {**base, "controlnet_cond": rng.random((2, 3, h * 8, w * 8), np.float32)}}  # fmt: skip
    for name, engine in engines.items():  # warm-up
        engine.run(feeds[name])
    times = {name: [] for name in engines}
    for r in range(job["rounds"]):
        for name, engine in engines.items():
            times[name].append(common.timed(lambda e=engine, n=name: e.run(feeds[n])))
        common.log(f"  round {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))
    ratio = {n: statistics.median(a / b for a, b in zip(times[n], times["unet"], strict=True)) for n in times}
    return {"times_s": times, "median_s": {n: statistics.median(t) for n, t in times.items()}, "ratio_to_unet": ratio}


WORKERS = {
    "calls": worker_calls,
    "build_controlnet": worker_build_controlnet,
    "export_controlnet": worker_export_controlnet,
    "add_unet": worker_add_unet,
    "generate": worker_generate,
}


def linked_copy(src: Path, dst: Path) -> None:
    """DST: SRC's files hard-linked (no extra disk), model.json a real copy (it is rewritten)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=os.link)
    (dst / "model.json").unlink()
    shutil.copy2(src / "model.json", dst / "model.json")


def markdown(report: dict) -> str:
    gen = report["generate"]
    base = gen["0"]["median_s"]
    steps = report["settings"]["steps"]
    m, size = report["machine"], report["settings"]["size"]
    lines = [
        f"ControlNet on the CPU backend: SD 1.5 UNet + SD 1.5 ControlNet (random weights), {m['cpu_model']}"
        f" ({m['physical_cores']} cores), txt2img {size}x{size}, {steps} Euler steps, cfg {common.CFG_SCALE}, "
        f"median of {report['settings']['runs']} runs",
        "",
        "| ControlNets | txt2img (s) | per step (s) | vs none |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for n in ("0", "1", "2"):
        t = gen[n]["median_s"]
        lines.append(f"| {n} | {t:.2f} | {t / steps:.2f} | {t / base:.2f}x |")
    ex = report["export"]
    lines += [
        "",
        "| extra graph | export wall (s) | peak RSS | size on disk |",
        "|---|---|---|---|",
        f"| controlnet ({report['controlnet_parameters'] / 1e6:.1f} M parameters) | {ex['controlnet']['wall_s']:.0f} | "
        f"{common.gib(ex['controlnet']['peak_rss_bytes'])} | {common.gib(ex['controlnet']['bytes'])} |",
        f"| unet_controlnet | {ex['unet_controlnet']['wall_s']:.0f} | "
        f"{common.gib(ex['unet_controlnet']['peak_rss_bytes'])} | {common.gib(ex['unet_controlnet']['bytes'])} |",
        "",
        f"Generation peak RSS (one process, all three runs): {common.gib(gen['peak_rss_bytes'])}.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, metavar=("STAGE", "JOB"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sdrt-bench"), help="sdrt bench's model folders")
    p.add_argument("--out", type=Path, default=Path("/tmp/sdrt-controlnet-bench"), help="this benchmark's folders")
    p.add_argument("--model", default="sd15", choices=("sd15", "small"), help="small: a smoke test of this script")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/controlnet-<machine>.json)")
    p.add_argument("--calls-only", action="store_true", help="only the interleaved per-call timing (models exported)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the per-call timing")
    args = p.parse_args()
    if args.worker:
        job = json.loads(Path(args.worker[1]).read_text())
        Path(job["result_file"]).write_text(json.dumps(WORKERS[args.worker[0]](job), indent=2))
        return 0
    machine = common.describe_machine()
    case = CASES[args.model]
    sd_dir = args.workdir / case.name
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = args.out / "jobs"
    jobs.mkdir(exist_ok=True)
    args.rebuild = False
    common.prepare_model(args, case.configs(), sd_dir, jobs)
    model_dir = args.out / "model"
    job = {
        "diffusers_dir": str(sd_dir / "diffusers"),
        "controlnet_diffusers": str(args.out / "controlnet-diffusers"),
        "controlnet_dir": str(args.out / "controlnet"),
        "model_dir": str(model_dir),
        "size": args.size,
        "steps": args.steps,
        "runs": args.runs,
        "seed": args.seed,
    }
    job["rounds"] = args.rounds
    script = Path(__file__).resolve()
    output = args.output or common.RESULTS_DIR / f"controlnet-{machine['slug']}.json"
    if args.calls_only:  # add the per-call timing to an earlier run's report
        common.log("timing one guided step's engine calls, interleaved")
        calls, _, _ = common.run_child("calls", job, jobs, script=script)
        report = json.loads(output.read_text())
        report["calls"] = {**calls, "rounds": args.rounds, "load_average": common.busy_warning(),
                           "command": " ".join(sys.argv), "date": common.now_iso()}  # fmt: skip
        output.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["calls"]["ratio_to_unet"], indent=2))
        return 0
    linked_copy(sd_dir / "onnx", model_dir)
    common.log("building the random-weight ControlNet")
    built, _, _ = common.run_child("build_controlnet", job, jobs, script=script)
    export = {}
    for stage, name, folder in (("export_controlnet", "controlnet", args.out / "controlnet"),
                                ("add_unet", "unet_controlnet", model_dir / "unet_controlnet")):  # fmt: skip
        common.log(f"exporting {name}")
        result, wall, peak = common.run_child(stage, job, jobs, script=script)
        export[name] = {"wall_s": wall, **result, "peak_rss_bytes": peak, "bytes": folder_bytes(folder)}
        common.log(f"{name}: {wall:.0f} s, peak RSS {common.gib(peak)}, {common.gib(export[name]['bytes'])}")
    busy = common.busy_warning()
    common.log("generating with 0, 1 and 2 ControlNets")
    generate, _, _ = common.run_child("generate", job, jobs, script=script)
    report = {
        "benchmark": "controlnet_cpu",
        "date": common.now_iso(),
        "machine": machine,
        "load_average_before_generation": busy,
        "settings": {
            "size": args.size,
            "steps": args.steps,
            "runs": args.runs,
            "cfg_scale": common.CFG_SCALE,
            "sampler": common.SAMPLER,
            "module": "canny",
            "command": " ".join(sys.argv),
        },  # fmt: skip
        "controlnet_parameters": built["parameters"],
        "export": export,
        "generate": generate,
    }
    output.write_text(json.dumps(report, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
