"""Doing less work per image on the CPU backend: DeepCache, NGMS / Skip Early CFG, TAESD, and lazy live previews,
on the full-size SD 1.5 architecture with random weights (sdrt only; speed does not depend on the weights' values).

Measures in one run, each stage in its own subprocess, configurations interleaved round by round (so a load that
drifts during the run touches each alike; ratios are per round, then the median):
  generate  txt2img end to end and UNet calls: plain, DeepCache intervals 2/3/5, NGMS, Skip Early CFG, TAESD decoder;
            each image's distance from the plain one (max and mean |difference| in /255)
  decode    VAE decoder vs TAESD decoder at --decode-sizes (one image)
  previews  txt2img with a preview decoded every step (Full, TAESD, Approx cheap: what the server's worker does
            for a client polling /progress each step) vs none (no poller: the worker decodes nothing)

    flock /tmp/sdrt-heavy.lock python -m sdrt.bench.speed [--size 256] [--steps 10] [--rounds 2]

Reuses `sdrt bench`'s random SD 1.5 build and export in --workdir; the model that gets the DeepCache graphs and a
random full-size TAESD is a hard-linked copy in --out.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from sdrt.bench import common
from sdrt.bench.cases import CASES
from sdrt.bench.controlnet_cpu import linked_copy
from sdrt.bench.machine import describe_machine
from sdrt.bench.random_model import prepare_model

MODULE = "sdrt.bench.speed"  # its subprocess workers: python -m MODULE --worker STAGE JOB
CONFIGS = {  # label -> generation options beside the common ones
    "plain": {},
    "deepcache 2": {"deepcache_interval": 2},
    "deepcache 3": {"deepcache_interval": 3},
    "deepcache 5": {"deepcache_interval": 5},
    "NGMS 2.0": {"s_min_uncond": 2.0},
    "Skip Early CFG 0.2": {"skip_early_cond": 0.2},
    "TAESD decoder": {"vae": "taesd"},
}
UNET_GRAPHS = ("unet", "unet_deepcache", "unet_shallow")


def worker_prepare(job: dict) -> dict:
    """DeepCache's graphs (branch 0) and a random full-size TAESD added to the model copy."""
    from sdrt.export.deepcache import add_deepcache

    start = time.perf_counter()
    add_deepcache(job["diffusers_dir"], job["model_dir"], job["branch"], progress=False)
    return {"deepcache_export_s": time.perf_counter() - start, **worker_prepare_taesd(job)}


def worker_prepare_taesd(job: dict) -> dict:
    """A random full-size TAESD (AutoencoderTiny's default config: 1.2 M decoder parameters) added to the copy."""
    import torch
    from diffusers import AutoencoderTiny

    from sdrt.export.taesd import add_taesd

    torch.manual_seed(0)
    taesd_dir = Path(job["out"]) / "taesd"
    AutoencoderTiny().save_pretrained(taesd_dir)
    add_taesd(str(taesd_dir), job["model_dir"], progress=False)
    return {"taesd_decoder_parameters": 1_222_531}


def worker_prepare_approx(job: dict) -> dict:
    """A1111's Approx NN network with random weights (its file's layout: a state dict) added to the copy."""
    import torch

    from sdrt.export.vae_approx import add_vae_approx, approx_network

    torch.manual_seed(0)
    path = Path(job["out"]) / "vae-approx-random.pt"
    torch.save(approx_network(4).state_dict(), path)
    add_vae_approx(str(path), job["model_dir"], progress=False)
    return {"vae_approx_parameters": sum(p.numel() for p in approx_network(4).parameters())}


class Counter:
    """An engine's run(feeds), counted."""

    def __init__(self, engine):
        self.engine, self.calls, self.rows = engine, 0, 0

    def run(self, feeds):
        self.calls, self.rows = self.calls + 1, self.rows + len(feeds["sample"])  # rows: NGMS halves the batch
        return self.engine.run(feeds)

    def __getattr__(self, name):
        return getattr(self.engine, name)


class FullGraphAsUnet:
    """DeepCache's full graph standing in for the UNet: the same output (tests/test_deepcache.py), the feature
    dropped."""

    def __init__(self, full):
        self.full = full

    def run(self, feeds):
        return {"out_sample": self.full.run(feeds)["out_sample"]}

    def unload(self):
        """Nothing: the graph is DeepCache's, which the DeepCache runs use too."""

    def __getattr__(self, name):
        return getattr(self.full, name)


def generate_kwargs(job: dict) -> dict:
    return dict(negative_prompt=common.NEGATIVE_PROMPT, width=job["size"], height=job["size"], steps=job["steps"],
                cfg_scale=common.CFG_SCALE, sampler=common.SAMPLER, seed=job["seed"], progress=False)  # fmt: skip


def worker_generate(job: dict) -> dict:
    import numpy as np

    from sdrt.runtime.manifest import Manifest
    from sdrt.runtime.pipeline import Pipeline

    if job.get("plain_through_deepcache"):  # the plain UNet never loaded: one UNet's weights in memory, not two
        pipe = Pipeline(Manifest.load(job["model_dir"]), job.get("backend", "cpu"))  # engines load when first run
        pipe.engines["unet"] = FullGraphAsUnet(pipe.engines["unet_deepcache"])
        pipe.model.denoiser_kinds.update({"plain", "deepcache"})  # one graph serves both: nothing to release
    else:
        pipe = Pipeline.load(job["model_dir"], backend=job.get("backend", "cpu"))
    counters = {name: Counter(pipe.engines[name]) for name in UNET_GRAPHS}
    pipe.engines.update(counters)
    configs = {label: CONFIGS[label] for label in job.get("configs") or CONFIGS}
    times = {label: [] for label in configs}
    calls, images = {}, {}

    def run(label: str, record: bool, **override) -> float:
        """One image of configuration LABEL, timed; with RECORD its image and UNet calls kept."""
        for c in counters.values():
            c.calls = c.rows = 0
        start = time.perf_counter()
        out = pipe.generate(common.PROMPT, **{**generate_kwargs(job), **configs[label], **override})
        elapsed = time.perf_counter() - start
        if record:
            images[label] = np.asarray(out[0]).astype(np.int16)
            calls[label] = {name: c.calls for name, c in counters.items()}
            calls[label]["rows"] = sum(c.rows for c in counters.values())
        return elapsed

    short = job.get("warmup_steps")  # warm-up of that many steps (the graphs loaded), calls counted in round 1
    for label in configs:  # warm-up: every graph loaded
        if short:
            cached = "deepcache_interval" in configs[label]  # 2 steps at least: the shallow graph's first call
            run(label, False, steps=max(short, 2) if cached else short,
                **({} if label in ("plain", "TAESD decoder") else {"output_type": "latent"}))  # fmt: skip
        else:
            run(label, True)
    for r in range(job["rounds"]):
        for label in configs:
            times[label].append(run(label, bool(short) and r == 0))
        common.log(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()))
    plain = images["plain"]
    return {
        label: {
            "times_s": times[label],
            "median_s": statistics.median(times[label]),
            "speedup": statistics.median(p / t for p, t in zip(times["plain"], times[label], strict=True)),
            "unet_calls": calls[label],
            "max_diff_255": int(np.abs(images[label] - plain).max()),
            "mean_diff_255": float(np.abs(images[label] - plain).mean()),
        }
        for label in configs
    }


def worker_decode(job: dict) -> dict:
    import numpy as np

    from sdrt.runtime.manifest import Manifest
    from sdrt.runtime.pipeline import Pipeline

    pipe = Pipeline(Manifest.load(job["model_dir"]), job.get("backend", "cpu"))  # engines load when first run
    rng = np.random.default_rng(0)
    out = {}
    for size in job["decode_sizes"]:
        latents = rng.standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
        decoders = {"full VAE": lambda z=latents: pipe.decode(z), "TAESD": lambda z=latents: pipe.decode(z, "taesd"),
                    "Approx cheap": lambda z=latents: pipe.preview(z, "Approx cheap")}  # fmt: skip
        if "vae_approx" in pipe.manifest.models:
            decoders["Approx NN"] = lambda z=latents: pipe.preview(z, "Approx NN")
        for fn in decoders.values():
            fn()  # warm-up
        times = {name: [] for name in decoders}
        for _ in range(job["rounds"]):
            for name, fn in decoders.items():
                times[name].append(common.timed(fn))
        out[str(size)] = {name: {"times_s": t, "median_s": statistics.median(t)} for name, t in times.items()}
        out[str(size)]["full/taesd"] = statistics.median(
            a / b for a, b in zip(times["full VAE"], times["TAESD"], strict=True)
        )
        common.log(f"  decode {size}: " + ", ".join(f"{n} {statistics.median(t):.3f} s" for n, t in times.items()))
    return out


def worker_previews(job: dict) -> dict:
    """The cost of live previews: txt2img whose progress callback decodes the step's x0 with each method at every
    step (what the server's worker does when a client polls /progress at least once a step with
    show_progress_every_n_steps 1), against the same run with no poller (the worker decodes nothing then)."""
    from sdrt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(job["model_dir"], backend=job.get("backend", "cpu"))
    cases = {"no poller": None, "poller Full": "Full", "poller TAESD": "TAESD", "poller Approx cheap": "Approx cheap"}

    def run(method):
        def callback(step, total, denoised):
            if method is not None:
                pipe.preview(denoised[:1], method)

        pipe.generate(common.PROMPT, callback=callback, **generate_kwargs(job))

    for method in cases.values():
        run(method)  # warm-up
    times = {label: [] for label in cases}
    for _ in range(job["rounds"]):
        for label, method in cases.items():
            times[label].append(common.timed(lambda m=method: run(m)))
    return {
        label: {"times_s": t, "median_s": statistics.median(t), "previews": 0 if cases[label] is None else job["steps"],
                "vs_no_poller": statistics.median(a / b for a, b in zip(t, times["no poller"], strict=True))}
        for label, t in times.items()
    }  # fmt: skip


WORKERS = {"prepare": worker_prepare, "prepare_taesd": worker_prepare_taesd, "prepare_approx": worker_prepare_approx,
           "generate": worker_generate, "decode": worker_decode, "previews": worker_previews}  # fmt: skip


def markdown(report: dict, part: str) -> str:
    """One part of a speed report as a Markdown table (sdrt.bench.tables renders it in the docs)."""
    if part == "generate":
        rows = ["| configuration | txt2img (s) | speed-up | UNet calls: full / shallow (images) | diff from plain: max "
                "/ mean |", "|---|---|---|---|---|"]  # fmt: skip
        for label, r in report["generate"].items():
            c = r["unet_calls"]
            calls = f"{c.get('unet', 0) + c.get('unet_deepcache', 0)} / {c.get('unet_shallow', 0)} ({c.get('rows')})"
            diff = f"{r['max_diff_255']} / {r['mean_diff_255']:.1f}"
            rows.append(f"| {label} | {r['median_s']:.1f} | {r['speedup']:.2f}x | {calls} | {diff} |")
        return "\n".join(rows)
    if part == "decode":
        rows = ["| size | full VAE (s) | TAESD (s) | Approx NN (s) | Approx cheap (s) | full / TAESD |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        for size, r in report["decode"].items():
            nn = f"{r['Approx NN']['median_s']:.3f}" if "Approx NN" in r else "-"
            rows.append(f"| {size} | {r['full VAE']['median_s']:.3f} | {r['TAESD']['median_s']:.3f} | {nn} | "
                        f"{r['Approx cheap']['median_s']:.4f} | {r['full/taesd']:.1f}x |")  # fmt: skip
        return "\n".join(rows)
    rows = ["| previews | txt2img (s) | previews decoded | vs no poller |", "|---|---|---|---|"]
    for label, r in report["previews"].items():
        rows.append(f"| {label} | {r['median_s']:.1f} | {r['previews']} | {r['vs_no_poller']:.2f}x |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdrt.bench.speed", description=__doc__.splitlines()[0])
    common.add_stage_arguments(p, "/tmp/sdrt-speed-bench")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--branch", type=int, default=0, help="DeepCache's skip branch (0: the paper's default)")
    p.add_argument("--decode-sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--stages", nargs="+", default=["prepare", "generate", "previews", "decode"])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="the generate stage's configurations (default "
                   "all; plain is always measured, as the reference)")  # fmt: skip
    p.add_argument("--warmup-steps", type=int, help="warm up each configuration with this many steps (default: a whole "
                   "image, which also counts the calls); the calls and images are then round 1's")
    p.add_argument("--plain-through-deepcache", action="store_true", help="run the plain images through DeepCache's "
                   "full graph (same output), so the plain UNet is never loaded: full-size SDXL in half the memory")
    p.add_argument("--backend", default="cpu", help="the engines' backend (cuda, tensorrt, openvino...)")
    p.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/speed-<machine>.json)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        job = json.loads(Path(args.worker[1]).read_text())
        Path(job["result_file"]).write_text(json.dumps(WORKERS[args.worker[0]](job), indent=2))
        return 0
    machine = describe_machine()
    sd_dir = args.workdir / CASES[args.model].name
    jobs = args.out / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    args.rebuild = False
    prepare_model(args, CASES[args.model].configs(), sd_dir, jobs)
    model_dir = args.out / "model"
    if {"prepare", "prepare_taesd"} & set(args.stages):
        linked_copy(sd_dir / "onnx", model_dir)
    job = {"diffusers_dir": str(sd_dir / "diffusers"), "model_dir": str(model_dir), "out": str(args.out),
           "size": args.size, "steps": args.steps, "rounds": args.rounds, "seed": args.seed, "branch": args.branch,
           "decode_sizes": args.decode_sizes, "backend": args.backend,
           "configs": ["plain", *[c for c in args.configs or CONFIGS if c != "plain"]],
           "plain_through_deepcache": args.plain_through_deepcache, "warmup_steps": args.warmup_steps}  # fmt: skip
    command = " ".join(["python -m sdrt.bench.speed", *(argv if argv is not None else sys.argv[1:])])
    report = {"benchmark": "speed", "date": common.now_iso(), "machine": machine, "model": args.model,
              "shared_machine": True, "sampler": common.SAMPLER, "cfg_scale": common.CFG_SCALE,
              "settings": {k: job[k] for k in ("size", "steps", "rounds", "seed", "branch", "decode_sizes", "backend",
                                              "configs", "plain_through_deepcache", "warmup_steps")},
              "command": command}  # fmt: skip
    output = args.output or common.RESULTS_DIR / f"speed-{machine['slug']}.json"
    for stage in args.stages:
        common.log(f"stage {stage}")
        report[stage], wall, peak = common.run_child(stage, job, jobs, module=MODULE)
        common.log(f"stage {stage}: {wall:.0f} s, peak RSS {common.gib(peak)}")
        output.write_text(json.dumps(report, indent=2) + "\n")  # after each stage: a long run keeps what it has
    common.log(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
