#!/usr/bin/env python
"""The full-size SD 3.5 Medium architecture (2.5 B-parameter MMDiT-X, CLIP-L, OpenCLIP bigG, optional T5-XXL,
16-channel VAE) with random weights: built lean, exported by `sdrt export` (time, peak RSS), and txt2img at a small
size with sdrt and with diffusers on the same weights and seed, each in its own process, in one run.

    python -m sdrt.bench.sd35_arch all /tmp/sd35m [--t5] [--size 256 --steps 4] [--output benchmarks/results/X.json]

Speed and memory do not depend on the weights' values. Each part is built in bf16 (its own init, no fp32 copy),
saved and freed before the next; the tokenizers are the tiny test vocabularies (their ids only index the full
embedding tables). Without --t5 the folder has no text_encoder_3, as diffusers allows (zeros in T5's place).
Peak RSS is each child's getrusage; the machine may be shared: only the ratios inside one run mean anything.
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
from sdrt.bench.fixtures import write_tiny_clip_tokenizer
from sdrt.bench.flow_arch import SD3_VAE, SD35M_TRANSFORMER
from sdrt.bench.flow_arch import T5_XXL as T5_XXL_BASE
from sdrt.bench.sdxl_arch import log

# SD 3.5 Medium's transformer, VAE and T5-XXL: the bench's one definition (flow_arch.py)
SD35_MEDIUM_TRANSFORMER, SD35_VAE = SD35M_TRANSFORMER, SD3_VAE
T5_XXL = dict(T5_XXL_BASE, is_encoder_decoder=False, use_cache=False)
SD35_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
PROMPT = "a photograph of an astronaut riding a horse"


def build_folder(folder, with_t5: bool = False, seed: int = 0) -> Path:
    """Write a random-weight SD 3.5 Medium diffusers folder (weights stored in bf16) to FOLDER."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    index = {"_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder_3": [None, None], "tokenizer_3": [None, None]}  # fmt: skip
    parts = [("transformer", lambda: SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER), torch.bfloat16),
             ("vae", lambda: AutoencoderKL(**SD35_VAE), torch.bfloat16)]  # fmt: skip
    for name, config, pad in (("text_encoder", CLIP_VIT_L, "<|endoftext|>"), ("text_encoder_2", OPEN_CLIP_BIGG, "!")):
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
        parts.append(("text_encoder_3", lambda: T5EncoderModel(T5Config(**T5_XXL)), torch.bfloat16))
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
    """Run CMD; its wall seconds, exit status, peak RSS (GiB) and the JSON its last stdout line prints, if any."""
    start = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far: children run in turn
    out = {
        "rc": done.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_gib_so_far": usage / 2**20,
    }
    lines = done.stdout.strip().splitlines()
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

        torch.set_num_threads(torch.get_num_threads())
        pipe = StableDiffusion3Pipeline.from_pretrained(Path(folder) / "diffusers", torch_dtype=torch.float32)
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


def run_all(root: Path, with_t5: bool, size: int, steps: int, output: Path | None) -> int:
    import numpy as np

    from sdrt.bench.machine import describe_machine

    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    build_folder(root / "diffusers", with_t5=with_t5)
    result = {"benchmark": "sd35_arch", "date": time.strftime("%Y-%m-%d"), "machine": describe_machine(),
              "command": f"python -m sdrt.bench.sd35_arch all {root} {'--t5 ' if with_t5 else ''}--size {size} "
                         f"--steps {steps}",
              "model": {"transformer": SD35_MEDIUM_TRANSFORMER, "t5": with_t5, "stored_dtype": "bfloat16"},
              "build_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    log(f"built in {result['build_seconds']} s")
    export = child([sys.executable, "-m", "sdrt.cli", "export", str(root / "diffusers"), "-o", str(root / "onnx")])
    export["peak_rss_gib"] = export.pop("peak_rss_gib_so_far")
    export["onnx_bytes"] = sum(f.stat().st_size for f in (root / "onnx").rglob("*") if f.is_file())
    result["export"] = export
    log(f"export: {export}")
    runs = {}
    for runtime in ("sdrt", "diffusers"):
        image = root / f"{runtime}.npy"
        runs[runtime] = child([sys.executable, "-m", "sdrt.bench.sd35_arch", "one", runtime, str(root), str(size),
                               str(steps), str(image)])  # fmt: skip
        runs[runtime].pop("peak_rss_gib_so_far")
        log(f"{runtime}: {runs[runtime]}")
    if all(r["rc"] == 0 for r in runs.values()):
        a, b = (np.load(root / f"{r}.npy").astype(np.int16) for r in ("sdrt", "diffusers"))
        result["max_diff_255"] = int(np.abs(a - b).max())
        result["speedup_generate"] = round(runs["diffusers"]["generate_seconds"] / runs["sdrt"]["generate_seconds"], 2)
    result["txt2img"] = {"size": size, "steps": steps, "cfg_scale": 5.0, "sampler": "Euler", "runs": runs}
    result["note"] = "shared 2-core machine (other agents' work running); one run each, children in turn"
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        output.write_text(text + "\n")
    return 0 if export["rc"] == 0 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("all")
    a.add_argument("root", type=Path)
    a.add_argument("--t5", action="store_true", help="with a random T5-XXL (4.7 B parameters, 9.5 GB in bf16)")
    a.add_argument("--size", type=int, default=256)
    a.add_argument("--steps", type=int, default=4)
    a.add_argument("--output", type=Path)
    o = sub.add_parser("one")
    o.add_argument("runtime", choices=("sdrt", "diffusers"))
    o.add_argument("root")
    o.add_argument("size", type=int)
    o.add_argument("steps", type=int)
    o.add_argument("image")
    b = sub.add_parser("build")
    b.add_argument("folder")
    b.add_argument("--t5", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "one":
        generate_one(args.runtime, args.root, args.size, args.steps, args.image)
        return 0
    if args.command == "build":
        build_folder(args.folder, with_t5=args.t5)
        return 0
    return run_all(args.root, args.t5, args.size, args.steps, args.output)


if __name__ == "__main__":
    sys.exit(main())
