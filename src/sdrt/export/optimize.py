"""Fused graph variants of an exported model: ONNX Runtime's transformer optimizer (onnxruntime.transformers) over the
fp32 graphs `sdrt export` wrote, then fp16 for the CUDA target. Each variant is checked against its unfused graph.

    cuda: every fusion ONNX Runtime's CUDA kernels have (MultiHeadAttention with packed QKV/KV -> flash/memory-
          efficient attention, GroupNorm(+SiLU) and SkipGroupNorm in NHWC, NhwcConv, BiasSplitGelu, BiasAdd,
          SkipLayerNormalization), then fp16 with float32 inputs and outputs kept: model.cuda.onnx.
    cpu:  only what the CPU provider runs (MultiHeadAttention, SkipLayerNormalization, Gelu), fp32: model.cpu.onnx;
          self-attention as MultiHeadAttention, whose CPU kernel is flash-tiled (flash_attention.py). NhwcConv,
          GroupNorm, SkipGroupNorm, BiasSplitGelu and BiasAdd are CUDA-only kernels.

The fusions recognise attention traced as MatMul-Softmax-MatMul (diffusers' classic AttnProcessor, which
to_onnx.export_onnx sets while tracing); on graphs traced through SDPA they find no attention to fuse. Recorded in
model.json under "optimized": {target: {model: {file, precision, fused_ops, max_error, verified_on}}}.
"""

import collections
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from sdrt.errors import InvalidOption, ModelError
from sdrt.export.flash_attention import unpack_self_attention
from sdrt.runtime.families import family_of
from sdrt.runtime.manifest import Manifest

TARGETS = ("cuda", "cpu")
# onnxruntime.transformers model type per sdrt model (ORT's own SD tooling maps them the same way)
MODEL_TYPES = {"unet": "unet", "text_encoder": "clip", "text_encoder_2": "clip", "vae_decoder": "vae",
               "vae_encoder": "vae"}  # fmt: skip
CUDA_ONLY_FUSIONS = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                     "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")  # fmt: skip
FUSED_OPS = ("Attention", "MultiHeadAttention", "GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd",
             "SkipLayerNormalization", "LayerNormalization", "Gelu", "QuickGelu", "FastGelu", "BiasGelu")  # fmt: skip
UNFUSED_ATTENTION_OPS = ("Softmax",)  # what is left of attention the fusion did not recognise
# Relative error (max |fused - reference| / max(1, max |reference|)) each variant must keep against its unfused
# fp32 graph on the same inputs: the bar for fused fp16 vs PyTorch fp32 is 1e-2; a fused fp32 graph only
# reorders float arithmetic (6.9e-7 measured on the tiny UNet).
TOLERANCE = {"cuda": 1e-2, "cpu": 1e-4}
PROTOBUF_LIMIT = 2**31 - 2**20  # bytes: above this a graph's weights go to one external data file


def variant_file(name: str, target: str) -> str:
    return f"{name}/model.{target}.onnx"


def fusion_options(model_type: str, target: str):
    """onnxruntime.transformers FusionOptions for MODEL_TYPE: all of them for CUDA, the CPU-runnable ones for CPU."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    if model_type == "vae":
        # onnxruntime.transformers' VAE attention fusion (1.32, fusion_attention_vae.create_attention_node) replaces the
        # q/k/v biases with zeros: measured 0.13 relative error on the tiny VAE decoder. The VAE's one attention stays
        # unfused (4096 tokens at 512x512: a 32 MiB fp16 score matrix per image). Its head detection also calls int()
        # on a 1-element array, a TypeError under numpy 2.
        options.enable_attention = False
    if target == "cpu":
        for flag in CUDA_ONLY_FUSIONS:
            if hasattr(options, flag):
                setattr(options, flag, False)
    return options


def fused_op_counts(model: onnx.ModelProto) -> dict:
    """{op type: count} of the fused operators (and leftover Softmax, unfused attention) in MODEL's main graph."""
    counts = collections.Counter(node.op_type for node in model.graph.node)
    return {op: counts[op] for op in (*FUSED_OPS, *UNFUSED_ATTENTION_OPS) if counts[op]}


def fuse(src: Path, dst: Path, name: str, target: str, fp16: bool) -> dict:
    """SRC (an fp32 graph) -> DST fused for TARGET (fp16 with float32 I/O when FP16); the fused operator counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = MODEL_TYPES[name]
    with _quiet():
        optimized = optimize_model(
            str(src), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
            optimization_options=fusion_options(model_type, target), use_gpu=target == "cuda",
        )  # fmt: skip
        if target == "cpu":  # the CPU's Attention kernel holds all scores; MultiHeadAttention's is flash-tiled
            unpack_self_attention(optimized.model.graph)
        if fp16:
            optimized.convert_float_to_float16(keep_io_types=True)
    counts = fused_op_counts(optimized.model)
    save(optimized, dst)
    return counts


def convert_to_fp16(src: Path, dst: Path) -> None:
    """SRC (a fused fp32 graph) -> DST in fp16, its float32 inputs and outputs kept (Cast nodes at the edges)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    with _quiet():
        model.convert_float_to_float16(keep_io_types=True)
    save(model, dst)


def save(model, dst: Path) -> None:
    """An onnxruntime.transformers OnnxModel to DST, its weights in DST.data when the protobuf would pass 2 GiB."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for stale in (dst, dst.with_name(dst.name + ".data")):
        stale.unlink(missing_ok=True)
    try:
        size = model.model.ByteSize()  # may wrap negative past 2 GiB (ORT's SD tooling checks the same)
    except Exception:  # protobuf's upb refuses to size a message past 2 GiB (EncodeError): the fp32 SD 1.5 UNet
        size = -1
    external = not 0 < size < PROTOBUF_LIMIT
    model.save_model_to_file(str(dst), use_external_data_format=external)


@contextlib.contextmanager
def _quiet():
    """The optimizer's progress bar and INFO logging: off (sdrt prints its own one line per graph)."""
    import logging

    logger = logging.getLogger("onnxruntime.transformers")
    level = logger.level
    logger.setLevel(logging.WARNING)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        try:
            yield
        finally:
            logger.setLevel(level)


def check_feeds(manifest: Manifest, name: str, batch: int = 2, latent: int | None = None, seed: int = 0) -> dict:
    """Random inputs for model NAME at concrete shapes: BATCH, LATENT cells per side (default: the native size's,
    at most 32), the text window; values at the scale the pipeline feeds (token embeddings ~0.02, timesteps 1-999)."""
    rng = np.random.default_rng(seed)
    latent = latent or min(manifest.native_size // manifest.latent_downsample, 32)
    dims = {"batch": batch, "tokens": manifest.text_max_length, "latent_height": latent, "latent_width": latent,
            "height": latent * manifest.latent_downsample, "width": latent * manifest.latent_downsample}  # fmt: skip
    feeds = {}
    for tensor in manifest.models[name]["inputs"]:
        shape = tuple(dims[d] if isinstance(d, str) else int(d) for d in tensor["shape"])
        if tensor["dtype"] == "int64":  # eos_index: a token position
            feeds[tensor["name"]] = rng.integers(1, manifest.text_max_length, shape).astype(np.int64)
        elif tensor["name"] == "timestep":
            feeds[tensor["name"]] = rng.uniform(1, 999, shape).astype(np.float32)
        elif tensor["name"] == "inputs_embeds":
            feeds[tensor["name"]] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        else:
            feeds[tensor["name"]] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def relative_error(got: list, want: list) -> float:
    """max |GOT - WANT| over all outputs, divided by max(1, max |WANT|): the export's measure, inf for a non-finite
    output."""
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            raise ModelError(f"output shape {a.shape} differs from the reference's {b.shape}")
        if not np.isfinite(a).all():
            return float("inf")
        scale = max(1.0, float(np.abs(b).max()))
        worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()) / scale)
    return worst


def run_graph(path: Path, feeds: dict, provider: str) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=[provider])
    return session.run(None, feeds)


def verification_provider(target: str) -> str | None:
    """The provider that runs TARGET's graphs here, or None (a CUDA variant without a GPU stays unverified)."""
    import onnxruntime as ort

    wanted = "CUDAExecutionProvider" if target == "cuda" else "CPUExecutionProvider"
    return wanted if wanted in ort.get_available_providers() else None


def optimize(model_dir, target: str, models=None, verify: bool = True, progress: bool = True) -> dict:
    """Write MODEL_DIR's fused TARGET variants of MODELS (default: all), verified against the unfused graphs where
    TARGET's provider is present; record them in model.json; returns that "optimized" entry for TARGET."""
    if target not in TARGETS:
        raise InvalidOption("--optimize", target, ", ".join(TARGETS) + " (or none)")
    manifest = Manifest.load(model_dir)
    # The VAE has nothing the CPU provider runs fused (its fusions are GroupNorm/NhwcConv, CUDA-only; attention off).
    names = list(models or [n for n in manifest.models if target == "cuda" or MODEL_TYPES[n] != "vae"])
    for name in names:
        if name not in manifest.models:
            raise InvalidOption("models", name, ", ".join(manifest.models))
        if manifest.models[name].get("precision", manifest.precision) != "fp32":
            raise ModelError(
                f"{name} was exported in fp16; the fusions need an fp32 graph (fp16 comes after them): "
                "export with --precision fp32 (the default)"
            )
    provider = verification_provider(target) if verify else None
    entry = dict(manifest.optimized.get(target, {}))
    for name in names:
        start = time.perf_counter()
        fp16 = target == "cuda" and name not in family_of(manifest).fp32_models  # e.g. SDXL's VAE overflows in fp16
        dst = manifest.folder / variant_file(name, target)
        counts = fuse(manifest.model_path(name), dst, name, target, fp16)
        error = None
        if provider is not None:
            feeds = check_feeds(manifest, name)
            reference = run_graph(manifest.model_path(name), feeds, provider)
            error = relative_error(run_graph(dst, feeds, provider), reference)
            if not error <= TOLERANCE[target]:
                raise ModelError(
                    f"{name}: the fused {target} graph differs from the unfused one by {error:.3g} (relative), "
                    f"over the tolerance {TOLERANCE[target]:g}"
                )
        entry[name] = {"file": variant_file(name, target), "precision": "fp16" if fp16 else "fp32",
                       "fused_ops": counts, "max_error": error, "verified_on": provider}  # fmt: skip
        if progress:
            checked = f"max error vs unfused {error:.2e} on {provider}" if provider else "not run here (no provider)"
            ops = ", ".join(f"{op} {n}" for op, n in counts.items()) or "nothing fused"
            print(f"{name} ({target}, {entry[name]['precision']}): {ops}; {checked} "
                  f"[{time.perf_counter() - start:.1f} s]", file=sys.stderr)  # fmt: skip
    optimized = {**manifest.optimized, target: entry}
    dataclasses.replace(manifest, optimized=optimized).save(manifest.folder)
    return entry
