#!/usr/bin/env python
"""The full-size SDXL 1.0 architecture (base 2.6 B-parameter UNet, refiner) with random weights, built lean.

Speed and memory do not depend on the weights' values. Each part is built on PyTorch's meta device, given
storage in the asked dtype, initialised by its layers' own reset_parameters (PyTorch's default init), saved
and freed before the next: the peak is one part (the UNet: 5.1 GB in fp16, 10.3 GB in fp32). The tokenizers
are the tiny test vocabulary of sdrt.bench.fixtures (its ids only index the 49408-row embedding tables).

    .venv/bin/python -m sdrt.bench.sdxl_arch build /tmp/sdxl-random            # base, fp16 weights
    .venv/bin/python -m sdrt.bench.sdxl_arch build /tmp/sdxl-refiner --refiner
    .venv/bin/python -m sdrt.bench.sdxl_arch measure-export /tmp/sdxl-random -o /tmp/sdxl-onnx --precision fp16

`measure-export` runs `sdrt export` in a child process and prints its peak RSS (getrusage of the child).
`build --small` makes the same layout a few MB in size (a smoke test of this script).
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sdrt.bench.cases import CLIP_VIT_L, OPEN_CLIP_BIGG, SDXL_REFINER_UNET, SDXL_UNET, SDXL_VAE
from sdrt.bench.fixtures import SDXL_SCHEDULER, write_tiny_clip_tokenizer

SMALL = {  # --small: the same layout, a few MB
    "unet": {"block_out_channels": [32, 64, 64], "transformer_layers_per_block": [1, 1, 1], "norm_num_groups": 16,
             "attention_head_dim": [2, 4, 4], "addition_time_embed_dim": 8, "cross_attention_dim": 64,
             "projection_class_embeddings_input_dim": 6 * 8 + 32},
    "vae": {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 8},
    "text": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 4,
             "projection_dim": 32},
}  # fmt: skip


def log(message: str) -> None:
    print(f"sdxl_arch: {message}", file=sys.stderr, flush=True)


def materialise(build, dtype):
    """A module built on the meta device, given real storage in DTYPE and PyTorch's default initialisation."""
    import torch

    with torch.device("meta"):
        module = build()
    module = module.to(dtype=dtype).to_empty(device="cpu")
    with torch.no_grad():
        for sub in module.modules():
            if hasattr(sub, "reset_parameters") and sub is not module:
                sub.reset_parameters()
        for buffer in module.buffers():  # e.g. CLIP's position_ids
            if buffer.dtype == torch.int64:
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return module.eval()


def build_sdxl_folder(folder, refiner: bool = False, small: bool = False, dtype: str = "fp16", seed: int = 0):
    """Write a random-weight SDXL base (or refiner) diffusers folder to FOLDER, one part at a time."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    folder = Path(folder)
    torch.manual_seed(seed)
    unet_config = dict(SDXL_REFINER_UNET if refiner else SDXL_UNET)
    vae_config, texts = dict(SDXL_VAE), [("text_encoder_2", OPEN_CLIP_BIGG, "!")]
    if not refiner:
        texts.insert(0, ("text_encoder", CLIP_VIT_L, "<|endoftext|>"))
    if small:
        unet_config.update(SMALL["unet"])
        if refiner:
            unet_config.update(cross_attention_dim=32, projection_class_embeddings_input_dim=5 * 8 + 32)
        vae_config.update(SMALL["vae"])
        texts = [(name, dict(config, **SMALL["text"]), pad) for name, config, pad in texts]
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": not refiner,
        "requires_aesthetics_score": refiner,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": [None, None],
        "tokenizer": [None, None],
    }
    parts = [("unet", lambda: UNet2DConditionModel(**unet_config)), ("vae", lambda: AutoencoderKL(**vae_config))]
    for name, config, pad in texts:
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        vocab = write_tiny_clip_tokenizer(folder / (tokenizer_name + "_src"), pad_token=pad)
        tokenizer = CLIPTokenizer.from_pretrained(folder / (tokenizer_name + "_src"))
        tokenizer.save_pretrained(folder / tokenizer_name)
        shutil.rmtree(folder / (tokenizer_name + "_src"))
        cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
        text_config = CLIPTextConfig(
            **config, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=tokenizer.pad_token_id
        )
        parts.append((name, lambda cls=cls, text_config=text_config: cls(text_config)))
        index[name] = ["transformers", cls.__name__]
        index[tokenizer_name] = ["transformers", "CLIPTokenizer"]
    for name, build in parts:
        start = time.perf_counter()
        module = materialise(build, torch.float32 if name.startswith("text_encoder") else torch_dtype)
        count = sum(p.numel() for p in module.parameters())
        module.save_pretrained(folder / name)
        log(f"{name}: {count / 1e6:.1f} M parameters, built and saved in {time.perf_counter() - start:.0f} s")
        del module
    EulerDiscreteScheduler.from_config(SDXL_SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER, indent=2))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def measure_export(source: str, output: str, precision: str, extra: list[str]) -> int:
    """Run `sdrt export` in a child process; print its wall time and peak RSS."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "sdrt.cli", "export", source, "-o", output, "--precision", precision, *extra]
    rc = subprocess.call(cmd)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    print(json.dumps({"rc": rc, "seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": peak_kib / 2**20}))
    return rc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("folder")
    b.add_argument("--refiner", action="store_true")
    b.add_argument("--small", action="store_true")
    b.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"))
    m = sub.add_parser("measure-export")
    m.add_argument("source")
    m.add_argument("-o", "--output", required=True)
    m.add_argument("--precision", default="fp16")
    m.add_argument("--vae", help="passed to sdrt export")
    args = parser.parse_args(argv)
    if args.command == "build":
        build_sdxl_folder(args.folder, refiner=args.refiner, small=args.small, dtype=args.dtype)
        return 0
    return measure_export(args.source, args.output, args.precision, ["--vae", args.vae] if args.vae else [])


if __name__ == "__main__":
    sys.exit(main())
