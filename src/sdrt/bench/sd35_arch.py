#!/usr/bin/env python
"""The full-size SD 3.5 Medium architecture (2.5 B-parameter MMDiT-X, CLIP-L, OpenCLIP bigG, optional T5-XXL,
16-channel VAE) with random weights: built lean, exported by `sdrt export` (time, peak RSS), and txt2img at a small
size with sdrt and with diffusers on the same weights and seed, each in its own process, in one run.

    python -m sdrt.bench.sd35_arch all /tmp/sd35m [--t5] [--size 256 --steps 4 --runs 1] [--output X.json]
    python -m sdrt.bench.sd35_arch build|export|txt2img /tmp/sd35m --output X.json   # one stage (one queue job each)

Each stage adds its figures to the --output JSON, so the stages can run as separate jobs on the same folder.

Speed and memory do not depend on the weights' values. Each part is built in bf16 (its own init, no fp32 copy),
saved and freed before the next; the tokenizers are the tiny test vocabularies (their ids only index the full
embedding tables). Without --t5 the folder has no text_encoder_3, as diffusers allows (zeros in T5's place).
Peak RSS is each child's getrusage (with RssAnon / RssFile sampled apart: safetensors and ONNX external data are
mapped files); the machine may be shared: only the ratios inside one run mean anything.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sdrt.bench.cases import CLIP_VIT_L, OPEN_CLIP_BIGG
from sdrt.bench.common import log
from sdrt.bench.fixtures import write_tiny_clip_tokenizer
from sdrt.bench.flow_arch import (
    SD3_VAE,
    SD35M_TRANSFORMER,
    TINY_CLIP_G,
    TINY_CLIP_L,
    TINY_FLOW_VAE,
    TINY_SD3_TRANSFORMER,
    TINY_T5,
)
from sdrt.bench.flow_arch import T5_XXL as T5_XXL_BASE
from sdrt.bench.load_memory import sample_rss_split

# SD 3.5 Medium's transformer, VAE and T5-XXL: the bench's one definition (flow_arch.py)
SD35_MEDIUM_TRANSFORMER, SD35_VAE = SD35M_TRANSFORMER, SD3_VAE
T5_XXL = dict(T5_XXL_BASE, is_encoder_decoder=False, use_cache=False)
TINY_SD3_VAE = dict(TINY_FLOW_VAE, scaling_factor=SD3_VAE["scaling_factor"], shift_factor=SD3_VAE["shift_factor"])
SD35_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
PROMPT = "a photograph of an astronaut riding a horse"


def build_folder(folder, with_t5: bool = False, seed: int = 0, tiny: bool = False) -> Path:
    """Write a random-weight SD 3.5 Medium diffusers folder (weights stored in bf16) to FOLDER (TINY: the same parts
    at the tests' sizes, a smoke test of the stages)."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    index = {"_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder_3": [None, None], "tokenizer_3": [None, None]}  # fmt: skip
    transformer, vae = (TINY_SD3_TRANSFORMER, TINY_SD3_VAE) if tiny else (SD35_MEDIUM_TRANSFORMER, SD35_VAE)
    clip_l, clip_g = (TINY_CLIP_L, TINY_CLIP_G) if tiny else (CLIP_VIT_L, OPEN_CLIP_BIGG)
    t5 = dict(TINY_T5, vocab_size=T5_XXL["vocab_size"], is_encoder_decoder=False, use_cache=False) if tiny else T5_XXL
    parts = [("transformer", lambda: SD3Transformer2DModel(**transformer), torch.bfloat16),
             ("vae", lambda: AutoencoderKL(**vae), torch.bfloat16)]  # fmt: skip
    for name, config, pad in (("text_encoder", clip_l, "<|endoftext|>"), ("text_encoder_2", clip_g, "!")):
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        vocab = write_tiny_clip_tokenizer(folder / (tokenizer_name + "_src"), pad_token=pad)
        tokenizer = CLIPTokenizer.from_pretrained(folder / (tokenizer_name + "_src"))
        tokenizer.save_pretrained(folder / tokenizer_name)
        shutil.rmtree(folder / (tokenizer_name + "_src"))
        text_config = CLIPTextConfig(**config, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                     pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        parts.append((name, lambda c=text_config: CLIPTextModelWithProjection(c), torch.bfloat16))
        index[name], index[tokenizer_name] = (
            ["transformers", "CLIPTextModelWithProjection"],
            ["transformers", "CLIPTokenizer"],
        )
    if with_t5:
        from transformers import T5Config, T5EncoderModel, T5TokenizerFast

        from sdrt.bench.flow_arch import write_tiny_t5_tokenizer

        write_tiny_t5_tokenizer(folder / "tokenizer_3")
        parts.append(("text_encoder_3", lambda: T5EncoderModel(T5Config(**t5)), torch.bfloat16))
        index["text_encoder_3"], index["tokenizer_3"] = (
            ["transformers", "T5EncoderModel"],
            ["transformers", T5TokenizerFast.__name__],
        )
    for name, build, dtype in parts:
        start = time.perf_counter()
        torch.set_default_dtype(dtype)  # built in the stored dtype: never a full fp32 copy
        try:
            module = build().eval()
        finally:
            torch.set_default_dtype(torch.float32)
        count = sum(p.numel() for p in module.parameters())
        module.save_pretrained(folder / name)
        log(f"{name}: {count / 1e6:.1f} M parameters, built and saved in {time.perf_counter() - start:.0f} s")
        del module
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD35_SCHEDULER, indent=2))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def child(cmd: list[str]) -> dict:
    """Run CMD; its wall seconds, exit status, peak RSS (GiB, the kernel's, getrusage), the largest anonymous and
    file-backed RSS sampled apart, and the JSON its last stdout line prints, if any."""
    import threading

    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peaks, stop = {}, threading.Event()
    sampler = threading.Thread(target=sample_rss_split, args=(peaks, stop, f"/proc/{process.pid}/status"),
                               daemon=True)  # fmt: skip
    sampler.start()
    stdout, _ = process.communicate()
    stop.set()
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far: children run in turn
    # RssAnon -> peak_rss_anon_gib, RssFile -> peak_rss_file_gib
    split = {f"peak_rss_{name[3:].lower()}_gib": round(value / 2**30, 2) for name, value in peaks.items()}
    out = {"rc": process.returncode, "seconds": round(seconds, 1), "peak_rss_gib_so_far": round(usage / 2**20, 2),
           **split}  # fmt: skip
    lines = stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        out.update(json.loads(lines[-1]))
    return out


def generate_one(runtime: str, folder: str, size: int, steps: int, image_out: str) -> None:
    """The child of one txt2img: load, one image, its timings as a JSON line; the image as .npy."""
    import numpy as np

    start = time.perf_counter()
    if runtime == "sdrt":
        from sdrt.runtime.pipeline import Pipeline

        pipe = Pipeline.load(Path(folder) / "onnx")
        loaded = time.perf_counter()
        image = pipe.generate(PROMPT, seed=0, steps=steps, width=size, height=size, cfg_scale=5.0, progress=False)[0]
        pixels = np.asarray(image, dtype=np.uint8)
    else:
        import torch
        from diffusers import StableDiffusion3Pipeline

        folder = Path(folder) / "diffusers"
        no_t5 = {} if (folder / "text_encoder_3").is_dir() else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, torch_dtype=torch.float32, **no_t5)
        pipe.set_progress_bar_config(disable=True)
        loaded = time.perf_counter()
        out = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(0), output_type="np").images[0]  # fmt: skip
        pixels = (out * 255).round().clip(0, 255).astype(np.uint8)
    done = time.perf_counter()
    np.save(image_out, pixels)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"load_seconds": round(loaded - start, 1), "generate_seconds": round(done - loaded, 1),
                      "peak_rss_gib": round(peak, 2)}))  # fmt: skip


def stage_build(root: Path, with_t5: bool, tiny: bool) -> dict:
    """Build the random-weight diffusers folder ROOT/diffusers; what was built and how long it took."""
    start = time.perf_counter()
    build_folder(root / "diffusers", with_t5=with_t5, tiny=tiny)
    transformer = TINY_SD3_TRANSFORMER if tiny else SD35_MEDIUM_TRANSFORMER
    built = {"model": {"transformer": transformer, "t5": with_t5, "tiny": tiny, "stored_dtype": "bfloat16"},
             "build_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    log(f"built in {built['build_seconds']} s")
    return built


def stage_export(root: Path) -> dict:
    """`sdrt export ROOT/diffusers -o ROOT/onnx` in a child process: its time, peak memory and output size."""
    shutil.rmtree(root / "onnx", ignore_errors=True)
    export = child([sys.executable, "-m", "sdrt.cli", "export", str(root / "diffusers"), "-o", str(root / "onnx")])
    export["peak_rss_gib"] = export.pop("peak_rss_gib_so_far")
    export["onnx_bytes"] = sum(f.stat().st_size for f in (root / "onnx").rglob("*") if f.is_file())
    log(f"export: {export}")
    return {"export": export}


def stage_txt2img(root: Path, size: int, steps: int, runs: int) -> dict:
    """txt2img with sdrt and diffusers in turn (RUNS rounds, each run its own process), on the same weights and
    seed; the timings, each side's median and the images' largest difference (uint8)."""
    import numpy as np

    timings = {"sdrt": [], "diffusers": []}
    for round_index in range(runs):
        for runtime in timings:
            image = root / f"{runtime}.npy"
            run = child([sys.executable, "-m", "sdrt.bench.sd35_arch", "one", runtime, str(root), str(size),
                         str(steps), str(image)])  # fmt: skip
            run.pop("peak_rss_gib_so_far")
            log(f"{runtime} run {round_index + 1}: {run}")
            timings[runtime].append(run)
    result = {"txt2img": {"size": size, "steps": steps, "cfg_scale": 5.0, "sampler": "Euler", "runs": timings}}
    if all(r["rc"] == 0 for side in timings.values() for r in side):
        a, b = (np.load(root / f"{r}.npy").astype(np.int16) for r in timings)
        median = {side: round(float(np.median([r["generate_seconds"] for r in rs])), 2) for side, rs in timings.items()}
        result["max_diff_255"] = int(np.abs(a - b).max())
        result["mean_diff_255"] = round(float(np.abs(a - b).mean()), 3)
        result["median_generate_seconds"] = median
        result["speedup_generate"] = round(median["diffusers"] / median["sdrt"], 2)
    return result


STAGES = ("build", "export", "txt2img")


def markdown_table(report: dict) -> str:
    """The report as Markdown: a row per stage that ran (build, export, each txt2img run), the images' difference."""
    gib = lambda n: "-" if n is None else f"{n:.2f} GiB"  # noqa: E731
    lines = ["| stage | wall time | peak RSS | of it anonymous | of it mapped files | details |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    if "build_seconds" in report:
        lines.append(f"| build (random weights, bf16) | {report['build_seconds']:.0f} s | | | | |")
    export = report.get("export")
    if export:
        lines.append(f"| `sdrt export` (fp32) | {export['seconds']:.0f} s | {gib(export.get('peak_rss_gib'))} | "
                     f"{gib(export.get('peak_rss_anon_gib'))} | {gib(export.get('peak_rss_file_gib'))} | "
                     f"exit {export['rc']}, {export['onnx_bytes'] / 1e9:.1f} GB of ONNX |")  # fmt: skip
    txt2img = report.get("txt2img")
    for side, runs in (txt2img or {}).get("runs", {}).items():
        for index, run in enumerate(runs):
            timing = (f"load {run['load_seconds']:.0f} s, generate {run['generate_seconds']:.0f} s"
                      if run["rc"] == 0 else f"exit {run['rc']}")  # fmt: skip
            memory = " | ".join(gib(run.get(f"peak_rss{kind}_gib")) for kind in ("", "_anon", "_file"))
            lines.append(f"| txt2img {txt2img['size']} px, {txt2img['steps']} steps: {side} (run {index + 1}) | "
                         f"{run['seconds']:.0f} s | {memory} | {timing} |")  # fmt: skip
    if "max_diff_255" in report:
        lines += ["", f"Images: sdrt against diffusers max {report['max_diff_255']}/255 (mean "
                      f"{report['mean_diff_255']}/255); generate time diffusers / sdrt "
                      f"{report['speedup_generate']}x."]  # fmt: skip
    return "\n".join(lines)


def _command(stage: str, args) -> str:
    """The command line that runs STAGE alone with ARGS' settings."""
    words = ["python -m sdrt.bench.sd35_arch", stage, str(args.root)]
    if stage == "build":
        words += ["--t5"] * args.t5 + ["--tiny"] * args.tiny
    if stage == "txt2img":
        words += [f"--size {args.size} --steps {args.steps} --runs {args.runs}"]
    return " ".join(words)


def run_stages(args) -> int:
    """Run ARGS.command's stages (all: the three in turn), each merged into ARGS.output (kept between jobs)."""
    from sdrt.bench.machine import report_head

    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    output = args.output
    result = json.loads(output.read_text()) if output and output.exists() else {}
    head = report_head("sd35_arch", [])
    del head["command"]  # one per stage: the stages may run as separate jobs
    result.update(head)
    commands = result.setdefault("commands", {})
    rc = 0
    for stage in STAGES if args.command == "all" else (args.command,):
        commands[stage] = _command(stage, args)
        if stage == "build":
            result.update(stage_build(root, args.t5, args.tiny))
        elif stage == "export":
            result.update(stage_export(root))
            rc = rc or result["export"]["rc"]
        else:
            result.update(stage_txt2img(root, args.size, args.steps, args.runs))
            rc = rc or max(r["rc"] for side in result["txt2img"]["runs"].values() for r in side)
        if output:
            output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return rc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in ("all",) + STAGES:
        a = sub.add_parser(stage)
        a.add_argument("root", type=Path, help="the bench folder: ROOT/diffusers, ROOT/onnx, the images")
        a.add_argument("--output", type=Path, help="the JSON report (each stage adds its figures to it)")
        if stage in ("all", "build"):
            a.add_argument("--t5", action="store_true", help="with a random T5-XXL (4.7 B parameters, 9.5 GB bf16)")
            a.add_argument("--tiny", action="store_true", help="tiny configs of the same parts: a smoke test")
        if stage in ("all", "txt2img"):
            a.add_argument("--size", type=int, default=256)
            a.add_argument("--steps", type=int, default=4)
            a.add_argument("--runs", type=int, default=1, help="rounds of sdrt then diffusers, each its own process")
    o = sub.add_parser("one")
    o.add_argument("runtime", choices=("sdrt", "diffusers"))
    o.add_argument("root")
    o.add_argument("size", type=int)
    o.add_argument("steps", type=int)
    o.add_argument("image")
    args = parser.parse_args(argv)
    if args.command == "one":
        generate_one(args.runtime, args.root, args.size, args.steps, args.image)
        return 0
    return run_stages(args)


if __name__ == "__main__":
    sys.exit(main())
