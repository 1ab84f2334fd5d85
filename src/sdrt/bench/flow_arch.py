"""The flow-matching transformer cases of `sdrt bench` (SD 3.5 Medium, FLUX.1 dev; tiny ones for smoke tests): their
published architectures with random weights as diffusers folders, and what the runtime stages need of them (the
transformer's feeds for one guided step, the generation settings of each side).

Full-size builds hold the transformer and T5-XXL in bf16 (their published dtype) while they are made and saved:
SD 3.5 Medium is 2.5 B + 4.7 B (T5) + 0.8 B (CLIPs) parameters, FLUX.1 dev 11.9 B + 4.7 B + 0.1 B, far beyond this
project's shared 24 GB CPU machine in fp32: these cases are for the GPU machine (benchmarks/gpu_check.sh --model).
"""

import json
import shutil
from pathlib import Path

from sdrt.bench.common import CFG_SCALE
from sdrt.bench.fixtures import CORPUS_WORDS, write_tiny_clip_tokenizer

# stabilityai/stable-diffusion-3.5-medium and black-forest-labs/FLUX.1-dev scheduler_config.json, as published.
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                      "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                      "max_image_seq_len": 4096}  # fmt: skip
# SD 3.5 Medium's MMDiT-X (transformer/config.json): 24 blocks, the first 13 with dual attention, 2.5 B parameters.
SD35M_TRANSFORMER = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
                     "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                     "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
                     "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)),
                     "qk_norm": "rms_norm"}  # fmt: skip
# FLUX.1 dev's transformer: 19 double-stream and 38 single-stream blocks of 3072 channels, 11.9 B parameters.
FLUX_DEV_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "pooled_projection_dim": 768, "guidance_embeds": True,
                        "axes_dims_rope": [16, 56, 56]}  # fmt: skip
FLOW_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
            "use_quant_conv": False, "use_post_quant_conv": False}  # fmt: skip
SD3_VAE = dict(FLOW_VAE, scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = dict(FLOW_VAE, scaling_factor=0.3611, shift_factor=0.1159)
T5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu", "vocab_size": 32128}  # fmt: skip
# Tiny versions of the same (tests/tiny_sd3.py, tiny_flux.py sizes): a smoke test of the benchmark's stages. (The
# full-size CLIPs are cases.py's CLIP_VIT_L and OPEN_CLIP_BIGG.)
TINY_CLIP_L = dict(max_position_embeddings=77, hidden_act="quick_gelu", hidden_size=32, intermediate_size=37,
                   num_hidden_layers=2, num_attention_heads=4, projection_dim=32)  # fmt: skip
TINY_CLIP_G = dict(TINY_CLIP_L, hidden_size=48, intermediate_size=64, projection_dim=48, hidden_act="gelu")
TINY_T5 = {"d_model": 96, "d_kv": 8, "d_ff": 40, "num_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu",
           "vocab_size": None, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20}  # fmt: skip
TINY_SD3_TRANSFORMER = dict(SD35M_TRANSFORMER, sample_size=8, num_layers=3, attention_head_dim=8, num_attention_heads=4,
                            joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=80,
                            pos_embed_max_size=16, dual_attention_layers=[0])  # fmt: skip
TINY_FLUX_TRANSFORMER = dict(FLUX_DEV_TRANSFORMER, num_layers=1, num_single_layers=2, attention_head_dim=8,
                             num_attention_heads=2, joint_attention_dim=96, pooled_projection_dim=32,
                             axes_dims_rope=[2, 2, 4])  # fmt: skip
TINY_FLOW_VAE = dict(FLOW_VAE, block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=64)
FLUX_GUIDANCE = 3.5  # FLUX dev's distilled guidance in both runtimes (diffusers' guidance_scale); no true CFG
T5_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?-'"


def t5_vocab() -> list[tuple[str, float]]:
    """(piece, log-probability) pairs: specials, the word-start mark, words (likelier than their letters), letters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    words = sorted({w.lower() for w in CORPUS_WORDS})
    pieces += [("\u2581" + w, -3.0 - 0.01 * i) for i, w in enumerate(words)]
    pieces += [(w, -6.0 - 0.01 * i) for i, w in enumerate(words)]
    pieces += [(c, -10.0 - 0.01 * i) for i, c in enumerate(T5_LETTERS) if c not in words]
    pieces += [("\u2581" + c, -11.0 - 0.01 * i) for i, c in enumerate(T5_LETTERS) if c not in words]
    return pieces


def write_tiny_t5_tokenizer(folder: Path):
    """Save a T5Tokenizer (a `tokenizers` Unigram model over the tiny vocabulary: ids only index the embedding) to
    FOLDER and return it."""
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer(vocab=t5_vocab(), extra_ids=0)
    tokenizer.save_pretrained(folder)
    return T5Tokenizer.from_pretrained(folder)


def _clip(config: dict, tokenizer, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    config = dict(config, vocab_size=config.get("vocab_size") or len(tokenizer))  # full size: CLIP's whole table
    return cls(CLIPTextConfig(**config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id))  # fmt: skip


def _t5(config: dict, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = dict(config, vocab_size=config["vocab_size"] or vocab_size)
    return T5EncoderModel(T5Config(**config, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False))


def _sd3_parts(job: dict, clip_tokenizer, t5_tokenizer) -> tuple:
    """(pipeline class, scheduler config, its model parts) of an SD 3.5 case."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    texts = job["text_configs"]
    parts = dict(transformer=SD3Transformer2DModel(**job["unet_config"]),
                 text_encoder=_clip(job["text_config"], clip_tokenizer, True),
                 text_encoder_2=_clip(texts["text_encoder_2"], clip_tokenizer, True), tokenizer_2=clip_tokenizer,
                 text_encoder_3=_t5(texts["text_encoder_3"], len(t5_tokenizer)), tokenizer_3=t5_tokenizer)  # fmt: skip
    return StableDiffusion3Pipeline, SD3_SCHEDULER, parts


def _flux_parts(job: dict, clip_tokenizer, t5_tokenizer) -> tuple:
    """(pipeline class, scheduler config, its model parts) of a FLUX.1 dev case."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    parts = dict(transformer=FluxTransformer2DModel(**job["unet_config"]),
                 text_encoder=_clip(job["text_config"], clip_tokenizer, False),
                 text_encoder_2=_t5(job["text_configs"]["text_encoder_2"], len(t5_tokenizer)),
                 tokenizer_2=t5_tokenizer)  # fmt: skip
    return FluxPipeline, FLUX_DEV_SCHEDULER, parts


PARTS = {"sd3": _sd3_parts, "flux": _flux_parts}  # pipeline kind -> its parts' builder


def build_flow(job: dict) -> dict:
    """The job's SD 3.5 ("sd3") or FLUX.1 ("flux") case with random weights -> a diffusers folder (written whole,
    then renamed); big parts made in bf16 (full-size T5-XXL: 9.5 GB instead of 19)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer

    out = Path(job["diffusers_dir"])
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    write_tiny_clip_tokenizer(staging / "tokenizer_src")
    clip_tokenizer = CLIPTokenizer.from_pretrained(staging / "tokenizer_src")
    t5_tokenizer = write_tiny_t5_tokenizer(staging / "t5_src")
    torch.manual_seed(job["weights_seed"])
    vae = AutoencoderKL(**job["vae_config"])
    torch.set_default_dtype(torch.bfloat16 if job.get("bf16") else torch.float32)
    try:
        pipeline, scheduler, parts = PARTS[job["pipeline"]](job, clip_tokenizer, t5_tokenizer)
    finally:
        torch.set_default_dtype(torch.float32)
    parts.update(vae=vae, tokenizer=clip_tokenizer)
    pipe = pipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler), **parts)
    pipe.save_pretrained(staging)
    (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    for src in ("tokenizer_src", "t5_src"):
        shutil.rmtree(staging / src)
    params = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()
              if hasattr(module, "parameters")}  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return {"parameters": {"unet": params["transformer"], **params}}


# What differs between the two at run time: the text tokens before T5's (SD 3: CLIP's 77), the transformer's
# timestep unit (SD 3: sigma x 1000; FLUX: sigma), and each side's guidance keywords (SD 3.5: CFG at the bench's
# scale with the negative prompt; FLUX dev: its distilled guidance, no true CFG: both pipelines' default).
FLOW_KINDS = {
    "sd3": {"clip_tokens": 77, "timestep": 500.0, "sdrt": {"cfg_scale": CFG_SCALE},
            "diffusers": {"guidance_scale": CFG_SCALE}},
    "flux": {"clip_tokens": 0, "timestep": 0.5, "sdrt": {"distilled_cfg_scale": FLUX_GUIDANCE, "cfg_scale": 1.0},
             "diffusers": {"guidance_scale": FLUX_GUIDANCE}},
}  # fmt: skip


def transformer_feeds(manifest, kind: dict, size: int, batch: int, seed: int) -> dict:
    """Random feeds of the exported transformer for one guided step at SIZE pixels (numpy, the graph's names): the
    shapes from model.json, FLUX's position ids as the runtime makes them, every SD 3 block gate open."""
    import numpy as np

    from sdrt.runtime.flow_models import image_ids

    rng = np.random.default_rng(seed)
    latent = size // manifest.latent_downsample
    text_tokens = int(manifest.family_config.get("t5_max_length", 0)) + kind["clip_tokens"]
    dims = {"batch": batch, "latent_height": latent, "latent_width": latent, "tokens": text_tokens,
            "image_tokens": (latent // 2) ** 2}  # fmt: skip
    feeds = {}
    for tensor in manifest.models["transformer"]["inputs"]:
        feeds[tensor["name"]] = rng.standard_normal([dims.get(d, d) for d in tensor["shape"]], dtype=np.float32)
    fixed = {"timestep": np.full(batch, kind["timestep"], np.float32),
             "guidance": np.full(batch, FLUX_GUIDANCE, np.float32), "img_ids": image_ids(latent, latent),
             "txt_ids": np.zeros((text_tokens, 3), np.float32)}  # fmt: skip
    if "block_gates" in feeds:
        fixed["block_gates"] = np.ones_like(feeds["block_gates"])
    return {**feeds, **{name: value for name, value in fixed.items() if name in feeds}}


def sdrt_probe(pipe, job: dict, batch: int):
    """(the transformer engine, its feeds for one guided step, Pipeline.generate's guidance keywords) of a flow case;
    None for the UNet cases (job["pipeline"] "sd" or "sdxl")."""
    kind = FLOW_KINDS.get(job.get("pipeline"))
    if kind is None:
        return None
    feeds = transformer_feeds(pipe.manifest, kind, job["width"], batch, job["seed"])
    return pipe.engines["transformer"], feeds, kind["sdrt"]


def diffusers_probe(pipe, job: dict, batch: int, onnx_dir: str, to_tensor):
    """(a call of diffusers' transformer on the same feeds as sdrt_probe's, the pipeline's guidance keywords) of a
    flow case, or None. TO_TENSOR(numpy array) -> the torch tensor on the runtime's device and dtype."""
    kind = FLOW_KINDS.get(job.get("pipeline"))
    if kind is None:
        return None
    from sdrt.runtime.manifest import Manifest

    feeds = transformer_feeds(Manifest.load(onnx_dir), kind, job["width"], batch, job["seed"])
    inputs = {name: to_tensor(value) for name, value in feeds.items() if name != "block_gates"}
    return (lambda: pipe.transformer(**inputs, return_dict=False)[0]), kind["diffusers"]
