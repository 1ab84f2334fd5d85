"""The benchmark's model: its case's architecture built with random weights as a diffusers folder, then exported
with `sdrt export`, each in its own subprocess (`python -m sdrt.bench --worker build|export JOB`), both skipped when
an earlier run left a current copy."""

import datetime
import json
import math
import shutil
import sys
import time
from pathlib import Path

from sdrt.bench.common import BUILD_VERSION, WEIGHTS_SEED, gib, log, run_child
from sdrt.bench.fixtures import SD15_SCHEDULER, assemble_pipeline, write_tiny_clip_tokenizer
from sdrt.bench.flow_arch import build_flow


def worker_build(job: dict) -> dict:
    """The job's case, built by its pipeline kind (BUILDERS) with random weights, saved as a diffusers folder."""
    kind = job.get("pipeline", "sd")
    if kind not in BUILDERS:
        sys.exit(f"sdrt bench: no builder for pipeline kind {kind!r} (known: {', '.join(BUILDERS)})")
    return BUILDERS[kind](job)


def build_sd(job: dict) -> dict:
    """Random-weight SD 1.x/2.x pipeline of the job's configs -> a diffusers folder (written whole, then renamed)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(job["diffusers_dir"])
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    write_tiny_clip_tokenizer(staging / "tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(staging / "tokenizer_src")
    torch.manual_seed(job["weights_seed"])
    log("build: UNet")
    unet = UNet2DConditionModel(**job["unet_config"])
    log("build: VAE")
    vae = AutoencoderKL(**job["vae_config"])
    log("build: text encoder")
    text_config = dict(job["text_config"])
    text_config["vocab_size"] = text_config["vocab_size"] or len(tokenizer)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **text_config,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    params = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
    }
    for name, count in params.items():
        log(f"build: {name} has {count / 1e6:.1f} M parameters")
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer, SD15_SCHEDULER)
    log(f"build: saving to {out}")
    pipe.save_pretrained(staging)
    # The scheduler config exactly as SD 1.5 publishes it: keys it leaves out (timestep_spacing) take each
    # diffusers scheduler class's own default when the pipeline swaps in Euler, as with the real model.
    (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2))
    shutil.rmtree(staging / "tokenizer_src")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return {"parameters": params}


def build_sdxl(job: dict) -> dict:
    """Random-weight SDXL base (sdrt.bench.sdxl_arch, one part at a time, fp16 weights that both runtimes
    load as float32) -> a diffusers folder (written whole, then renamed)."""
    from sdrt.bench.sdxl_arch import build_sdxl_folder

    out = Path(job["diffusers_dir"])
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    from safetensors import safe_open

    build_sdxl_folder(staging, dtype="fp16", seed=job["weights_seed"])
    params = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        with safe_open(next((staging / name).glob("*.safetensors")), "np") as f:
            params[name] = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return {"parameters": params}


BUILDERS = {"sd": build_sd, "sdxl": build_sdxl, "sd3": build_flow, "flux": build_flow}  # pipeline kind -> builder


def worker_export(job: dict) -> dict:
    from sdrt.export import export

    start = time.perf_counter()
    export(job["diffusers_dir"], job["onnx_dir"], precision=job.get("precision", "fp32"), overwrite=True, progress=True)
    return {"export_call_s": time.perf_counter() - start}


def onnx_is_current(onnx_dir: Path) -> bool:
    """True if ONNX_DIR holds an export this sdrt can load (its manifest reads and validates)."""
    from sdrt.errors import ModelError
    from sdrt.runtime.manifest import Manifest

    try:
        Manifest.load(onnx_dir)
    except ModelError:
        return False
    return True


def prepare_model(args, configs: dict, model_dir: Path, job_dir: Path, precision: str = "fp32") -> tuple[dict, dict]:
    """Build and export (at PRECISION) unless already done (or --rebuild): (build info, export measurements)."""
    suffix = "" if precision == "fp32" else f"-{precision}"
    diffusers_dir, onnx_dir = model_dir / "diffusers", model_dir / f"onnx{suffix}"
    build_file, export_file = model_dir / "build.json", model_dir / f"export{suffix}.json"
    stamp = {"build_version": BUILD_VERSION, "weights_seed": WEIGHTS_SEED, **configs}
    built = None
    if not args.rebuild and (diffusers_dir / "model_index.json").is_file() and build_file.is_file():
        built = json.loads(build_file.read_text())
        if {k: built.get(k) for k in stamp} != json.loads(json.dumps(stamp)):
            built = None
    rebuilt = built is None
    if rebuilt:
        log(f"building the random-weight model in {diffusers_dir}")
        job = {"diffusers_dir": str(diffusers_dir), "weights_seed": WEIGHTS_SEED, **configs}
        result, wall, peak = run_child("build", job, job_dir)
        built = {**stamp, **result, "build_wall_s": wall, "build_peak_rss_bytes": peak}
        build_file.write_text(json.dumps(built, indent=2))
        log(f"built in {wall:.1f} s, peak RSS {gib(peak)}")
    else:
        log(f"reusing {diffusers_dir} (--rebuild to make it again)")
    unet_params = built["parameters"]["unet"]
    log(f"UNet parameters: {unet_params / 1e6:.1f} M")

    if rebuilt or args.rebuild or not export_file.is_file() or not onnx_is_current(onnx_dir):
        log(f"exporting with sdrt to {onnx_dir}")
        job = {"diffusers_dir": str(diffusers_dir), "onnx_dir": str(onnx_dir), "precision": precision}
        result, wall, peak = run_child("export", job, job_dir)
        exported = {
            "wall_s": wall,
            **result,
            "peak_rss_bytes": peak,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        export_file.write_text(json.dumps(exported, indent=2))
        log(f"exported in {wall:.1f} s, peak RSS {gib(peak)}")
        exported["measured_in_this_run"] = True
    else:
        exported = dict(json.loads(export_file.read_text()), measured_in_this_run=False)
        log(f"reusing {onnx_dir}; its export was measured on {exported['date']} (--rebuild to export again)")
    return built, exported
