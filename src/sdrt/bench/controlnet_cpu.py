"""ControlNet on the CPU backend: the full-size SD 1.5 UNet and an SD 1.5 ControlNet (random weights), sdrt only.

Measures, in one run on one machine: the export of the two extra graphs (`sdrt export-controlnet` and the model's
`unet_controlnet`: wall time, peak RSS, size on disk) and txt2img time with 0, 1 and 2 ControlNets (the median of
--runs after a warm-up), each stage in its own subprocess. Speed does not depend on the weights' values.

    flock /tmp/sdrt-heavy.lock python -m sdrt.bench.controlnet_cpu [--size 256] [--steps 10] [--runs 2]
    python -m sdrt.bench.controlnet_cpu --calls-only --rounds 3   # one guided step's engine calls, interleaved

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

from sdrt.bench import common
from sdrt.bench.cases import CASES
from sdrt.bench.machine import describe_machine
from sdrt.bench.random_model import prepare_model

MODULE = "sdrt.bench.controlnet_cpu"  # its subprocess workers: python -m MODULE --worker STAGE JOB


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

    from sdrt.runtime.controlnet import ControlNetUnit
    from sdrt.runtime.pipeline import Pipeline

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


def markdown_table(report: dict) -> str:
    """The run's tables: txt2img with 0, 1, 2 ControlNets, the extra graphs' export, and (when measured) one guided
    step's engine calls relative to the plain UNet."""
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
    calls = report.get("calls")
    if calls:
        title = f"engine call, batch 2 ({calls['rounds']} interleaved rounds)"
        lines += ["", f"| {title} | median (s) | vs the plain UNet |", "|---|---|---|"]
        lines += [f"| {name} | {calls['median_s'][name]:.2f} | {calls['ratio_to_unet'][name]:.2f}x |"
                  for name in calls["median_s"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdrt.bench.controlnet_cpu", description=__doc__.splitlines()[0])
    common.add_stage_arguments(p, "/tmp/sdrt-controlnet-bench")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/controlnet-<machine>.json)")
    p.add_argument("--calls-only", action="store_true", help="only the interleaved per-call timing (models exported)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the per-call timing")
    return p


def add_calls(job: dict, jobs: Path, output: Path, rounds: int, command: str) -> None:
    """The per-call timing, added to an earlier run's report in OUTPUT."""
    common.log("timing one guided step's engine calls, interleaved")
    calls, _, _ = common.run_child("calls", job, jobs, module=MODULE)
    report = json.loads(output.read_text())
    report["calls"] = {**calls, "rounds": rounds, "load_average": common.busy_warning(), "command": command,
                       "date": common.now_iso()}  # fmt: skip
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["calls"]["ratio_to_unet"], indent=2))


def export_and_generate(args, job: dict, jobs: Path, sd_dir: Path, model_dir: Path) -> tuple[dict, dict, dict, float]:
    """The ControlNet built and exported, unet_controlnet added to a linked copy of the model, then txt2img with 0,
    1, 2 ControlNets: (the build's result, the exports, the generations, the load average before them)."""
    linked_copy(sd_dir / "onnx", model_dir)
    common.log("building the random-weight ControlNet")
    built, _, _ = common.run_child("build_controlnet", job, jobs, module=MODULE)
    export = {}
    for stage, name, folder in (("export_controlnet", "controlnet", args.out / "controlnet"),
                                ("add_unet", "unet_controlnet", model_dir / "unet_controlnet")):  # fmt: skip
        common.log(f"exporting {name}")
        result, wall, peak = common.run_child(stage, job, jobs, module=MODULE)
        export[name] = {"wall_s": wall, **result, "peak_rss_bytes": peak, "bytes": folder_bytes(folder)}
        common.log(f"{name}: {wall:.0f} s, peak RSS {common.gib(peak)}, {common.gib(export[name]['bytes'])}")
    busy = common.busy_warning()
    common.log("generating with 0, 1 and 2 ControlNets")
    generate, _, _ = common.run_child("generate", job, jobs, module=MODULE)
    return built, export, generate, busy


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        job = json.loads(Path(args.worker[1]).read_text())
        Path(job["result_file"]).write_text(json.dumps(WORKERS[args.worker[0]](job), indent=2))
        return 0
    machine = describe_machine()
    case = CASES[args.model]
    sd_dir = args.workdir / case.name
    jobs = args.out / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    args.rebuild = False
    prepare_model(args, case.configs(), sd_dir, jobs)
    model_dir = args.out / "model"
    job = {"diffusers_dir": str(sd_dir / "diffusers"), "controlnet_diffusers": str(args.out / "controlnet-diffusers"),
           "controlnet_dir": str(args.out / "controlnet"), "model_dir": str(model_dir), "size": args.size,
           "steps": args.steps, "runs": args.runs, "seed": args.seed, "rounds": args.rounds}  # fmt: skip
    output = args.output or common.RESULTS_DIR / f"controlnet-{machine['slug']}.json"
    command = " ".join(["python -m sdrt.bench.controlnet_cpu", *(argv if argv is not None else sys.argv[1:])])
    if args.calls_only:
        add_calls(job, jobs, output, args.rounds, command)
        return 0
    built, export, generate, busy = export_and_generate(args, job, jobs, sd_dir, model_dir)
    report = {
        "benchmark": "controlnet_cpu",
        "date": common.now_iso(),
        "machine": machine,
        "load_average_before_generation": busy,
        "settings": {"size": args.size, "steps": args.steps, "runs": args.runs, "cfg_scale": common.CFG_SCALE,
                     "sampler": common.SAMPLER, "module": "canny", "command": command},  # fmt: skip
        "controlnet_parameters": built["parameters"],
        "export": export,
        "generate": generate,
    }
    output.write_text(json.dumps(report, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown_table(report))
    print(markdown_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
