"""SDXL export (base, refiner, Turbo; diffusers folder or single file) -> ONNX models + model.json.

Memory: a diffusers folder is read one part at a time, and each part is released once exported, so the
peak is about one part (the UNet: 2.6 B parameters, 10.3 GB in fp32) plus what the ONNX exporter and the
verification hold. A single file is loaded whole by diffusers (in fp16 for fp16 exports) and its parts are
released as they are exported.
"""

import gc
import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.errors import ModelError
from sdrt.export.detect import INPAINT_IN_CHANNELS, TXT2IMG_IN_CHANNELS, CheckpointInfo, Detection, Fact
from sdrt.export.sources import is_hub_id

SGM_PREFIX = "conditioner.embedders."  # the SGM (generative-models) single-file layout of SDXL
SGM_BASE_TEXT_ENCODER_2 = "conditioner.embedders.1.model."  # OpenCLIP bigG beside CLIP ViT-L: the base
SGM_REFINER_TEXT_ENCODER = "conditioner.embedders.0.model."  # OpenCLIP bigG alone: the refiner
SDXL_SINGLE_FILE_PIPELINES = {
    "base": "StableDiffusionXLPipeline",
    "refiner": "StableDiffusionXLImg2ImgPipeline",
    "inpainting": "StableDiffusionXLInpaintPipeline",
}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# Micro-conditioning numbers per UNet (Podell et al. 2023, sec. 2.2-2.5): original size (2), crop (2) and target
# size (2) for the base; original size, crop and an aesthetic score for the refiner.
TIME_IDS_BASE, TIME_IDS_REFINER = 6, 5
# Trace values of the micro-conditioning: SDXL's native 1024 px, no crop.
TRACE_TIME_IDS = {
    TIME_IDS_BASE: [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0],
    TIME_IDS_REFINER: [1024.0, 1024.0, 0.0, 0.0, 6.0],
}


def is_sdxl(source: str, checkpoint: CheckpointInfo | None = None) -> bool:
    """True for a diffusers folder (or hub id) with a second text encoder, or a single file in SDXL's SGM layout."""
    path = Path(source)
    if (path / "model_index.json").is_file():
        return "text_encoder_2" in _read_json(path / "model_index.json")
    if is_hub_id(source):
        from huggingface_hub import hf_hub_download

        try:
            return "text_encoder_2" in _read_json(Path(hf_hub_download(source, "model_index.json")))
        except Exception:  # offline, unknown id: load_source reports it
            return False
    return checkpoint is not None and any(k.startswith(SGM_PREFIX) for k in checkpoint.shapes)


# A hub snapshot's files: configs, tokenizers and the full-precision weights (not the .fp16 variants beside them).
HUB_PATTERNS = ["*.json", "*.txt", "*/diffusion_pytorch_model.safetensors", "*/model.safetensors"]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{str(path)!r} is not valid JSON ({e})") from None


def _class(library: str, name: str):
    return getattr(importlib.import_module(library), name)


@dataclass
class SdxlParts:
    """An SDXL checkpoint's parts, handed out one at a time; `release` drops a part once it is exported."""

    kind: str  # "diffusers" | "single_file"
    name: str
    sha256: str
    config: dict  # the pipeline config: force_zeros_for_empty_prompt, requires_aesthetics_score
    scheduler: object  # a diffusers scheduler (its config)
    where: str  # where the configs came from, in words
    folder: Path | None = None
    pipe: object = None  # single files: the whole pipeline
    checkpoint: CheckpointInfo | None = None
    unet_dtype: object = None
    loaded: dict = field(default_factory=dict)

    def has(self, name: str) -> bool:
        if self.pipe is not None:
            return getattr(self.pipe, name, None) is not None or name in self.loaded
        entry = self.config.get(name)
        return isinstance(entry, list) and entry[0] is not None

    def get(self, name: str):
        """The part NAME (a torch module or tokenizer), loaded now for a folder."""
        if name in self.loaded:
            return self.loaded[name]
        if self.pipe is not None:
            part = getattr(self.pipe, name)
        else:
            import torch

            library, cls = self.config[name]
            kwargs = {}
            if library in ("diffusers", "transformers") and not name.startswith("tokenizer"):
                kwargs["torch_dtype"] = self.unet_dtype if name == "unet" else torch.float32
            try:
                part = _class(library, cls).from_pretrained(self.folder, subfolder=name, **kwargs)
            except (OSError, ValueError, KeyError) as e:
                raise ModelError(f"could not load {name} from {str(self.folder)!r}: {e}") from None
        self.loaded[name] = part
        return part

    def config_of(self, name: str) -> dict:
        """A part's config without loading its weights (a folder's NAME/config.json)."""
        if self.pipe is not None or name in self.loaded:
            return dict(self.get(name).config)
        return _read_json(self.folder / name / "config.json")

    def release(self, name: str) -> None:
        self.loaded.pop(name, None)
        if self.pipe is not None and hasattr(self.pipe, name):
            setattr(self.pipe, name, None)
        gc.collect()


def load_sdxl(source: str, precision: str, original_config=None, config=None) -> SdxlParts:
    """SOURCE (an SDXL diffusers folder or SGM-layout single file) as SdxlParts, nothing loaded yet for a folder."""
    import torch

    from sdrt.export.sources import file_sha256, folder_sha256, read_checkpoint_info

    unet_dtype = torch.float16 if precision == "fp16" else torch.float32
    if is_hub_id(source):
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(source, allow_patterns=HUB_PATTERNS)
        except Exception as e:  # network and hub errors come in many types
            raise ModelError(f"could not download {source!r} from the hub: {e}") from None
        parts = load_sdxl(folder, precision)
        parts.kind, parts.name, parts.where = "hub", source, f"hub {source}"
        return parts
    path = Path(source)
    if path.is_dir():
        index = _read_json(path / "model_index.json")
        scheduler = _load_scheduler(index, path)
        return SdxlParts(
            "diffusers", path.resolve().name, folder_sha256(path), index, scheduler, "diffusers folder", path,
            unet_dtype=unet_dtype,
        )  # fmt: skip
    import diffusers

    checkpoint = read_checkpoint_info(path)
    role = single_file_role(checkpoint)
    if config:
        kwargs = {"config": str(config), "local_files_only": Path(config).is_dir()}
    else:
        kwargs = {"original_config": str(original_config)} if original_config else {}
    try:
        pipe = getattr(diffusers, SDXL_SINGLE_FILE_PIPELINES[role]).from_single_file(
            str(path), torch_dtype=unet_dtype, **kwargs
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        hint = "" if config else " (offline, pass --config with a diffusers SDXL folder of the same architecture)"
        raise ModelError(f"could not load the checkpoint {source!r}: {str(e)[:500]}{hint}") from None
    where = f"--config {config}" if config else "diffusers' default SDXL config"
    return SdxlParts(
        "single_file", path.stem, file_sha256(path).hexdigest(), dict(pipe.config), pipe.scheduler, where,
        pipe=pipe, checkpoint=checkpoint, unet_dtype=unet_dtype,
    )  # fmt: skip


def _load_scheduler(index: dict, folder: Path):
    import diffusers

    library, cls = index.get("scheduler") or ("diffusers", "EulerDiscreteScheduler")
    try:
        return getattr(diffusers, cls).from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"could not load the scheduler config of {str(folder)!r}: {e}") from None


def single_file_role(checkpoint: CheckpointInfo) -> str:
    """Base, refiner or inpainting, from an SGM-layout file's keys and UNet input channels."""
    from sdrt.export.detect import LDM_UNET_IN

    keys = checkpoint.shapes
    if LDM_UNET_IN in keys and keys[LDM_UNET_IN][1] == INPAINT_IN_CHANNELS:
        return "inpainting"
    if any(k.startswith(SGM_BASE_TEXT_ENCODER_2) for k in keys):
        return "base"
    if any(k.startswith(SGM_REFINER_TEXT_ENCODER) for k in keys):
        return "refiner"
    raise ModelError("the checkpoint has SDXL conditioner keys but no OpenCLIP text encoder: unknown SDXL layout")


def sgm_yaml_facts(path: str) -> dict[str, Fact]:
    """prediction_type and the variant stated by an SGM (SDXL) inference YAML."""
    from sdrt.export.detect import read_original_config

    params = read_original_config(path)["model"]["params"]
    name = f"original config {Path(path).name}"
    if "network_config" not in params:
        raise ModelError(f"{name} is not an SDXL (SGM) config: it has no model.params.network_config")
    facts = {}
    scaling = str(((params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config", {}).get("target"))
    if scaling.endswith("VScaling"):
        facts["prediction_type"] = Fact("v_prediction", f"{name}: scaling_config VScaling")
    elif scaling.endswith("EpsScaling"):
        facts["prediction_type"] = Fact("epsilon", f"{name}: scaling_config EpsScaling")
    network = params["network_config"].get("params") or {}
    if "in_channels" in network:
        facts["unet_in_channels"] = Fact(int(network["in_channels"]), f"{name}: network_config in_channels")
    return facts


def detect_sdxl(parts: SdxlParts, unet_config, original_config=None) -> Detection:
    """family, prediction type, variant, UNet input channels and native size of an SDXL model."""
    where = parts.where
    if parts.kind == "single_file":
        family = Fact("sdxl", f"weights: SDXL conditioner ({SGM_PREFIX}*)")
    else:
        family = Fact("sdxl", f"{where}: a second text encoder (text_encoder_2)")
    from_yaml = sgm_yaml_facts(original_config) if original_config else {}
    in_channels = int(unet_config["in_channels"])
    stated = from_yaml.get("unet_in_channels")
    if stated and stated.value != in_channels:
        raise ModelError(f"{stated.source} is {stated.value}, but the loaded UNet takes {in_channels} channels")
    if in_channels not in (TXT2IMG_IN_CHANNELS, INPAINT_IN_CHANNELS):
        raise ModelError(f"an SDXL UNet with {in_channels} input channels is not supported (4, or 9: inpainting)")
    config = parts.scheduler.config
    if "prediction_type" in from_yaml:
        prediction = from_yaml["prediction_type"]
    elif "prediction_type" in config and "prediction_type" not in config.get("_use_default_values", []):
        prediction = Fact(config["prediction_type"], f"{where}: scheduler prediction_type")
    else:
        prediction = Fact("epsilon", f"{where}: the scheduler config sets none, diffusers' default")
    if in_channels == INPAINT_IN_CHANNELS:
        variant = Fact("inpainting", f"{in_channels}-channel UNet")
    elif parts.config.get("requires_aesthetics_score"):
        variant = Fact("refiner", f"{where}: requires_aesthetics_score (aesthetic-score conditioning)")
    else:
        variant = Fact("txt2img", f"{in_channels}-channel UNet")
    sample = int(unet_config["sample_size"])
    return Detection(
        family=family,
        prediction_type=prediction,
        variant=variant,
        unet_in_channels=Fact(in_channels, f"{where}: UNet in_channels"),
        native_size=Fact(sample * 8, f"{where}: UNet sample_size {sample} latent cells"),
    )


def unet_forward(unet, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
    """diffusers' SDXL UNet call: added conditioning through added_cond_kwargs."""
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    return unet(sample, timestep.float(), encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


def unet_step(unet, pooled_size: int, time_ids: int, max_len: int):
    """The SDXL UNet's export step, inputs sized from its config."""
    import torch

    from sdrt.export.steps import ModelStep
    from sdrt.runtime.modelspec import sdxl_unet_spec

    config = unet.config
    expected = time_ids * config.addition_time_embed_dim + pooled_size
    if config.addition_embed_type != "text_time" or unet.add_embedding.linear_1.in_features != expected:
        raise ModelError(
            f"the UNet's added conditioning takes {unet.add_embedding.linear_1.in_features} numbers; SDXL's "
            f"{'refiner' if time_ids == TIME_IDS_REFINER else 'base'} layout needs {expected} "
            f"({time_ids} time ids x {config.addition_time_embed_dim} + pooled {pooled_size})"
        )
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    in_ch, context, latent_ch = config.in_channels, config.cross_attention_dim, config.out_channels
    up = 2 ** (len(config.block_out_channels) - 1)  # odd latent sizes exercise the skip-connection resize
    ids = torch.tensor([TRACE_TIME_IDS[time_ids]])

    def inputs(batch, h, w, t, tokens):
        return (
            randn(batch, in_ch, h, w),
            torch.tensor(t),
            randn(batch, tokens, context),
            randn(batch, pooled_size),
            ids.repeat(batch, 1),
        )

    return ModelStep(
        sdxl_unet_spec(latent_ch, in_ch, context, pooled_size, time_ids),
        unet,
        unet_forward,
        inputs(1, 2 * up + 1, 2 * up - 1, [500.0], max_len),
        inputs(2, 2 * up, 3 * up, [999.0, 1.0], 2 * max_len),
    )


FAMILIES = ("sdxl",)  # the manifest families this plan writes


def denoiser_step(source, manifest, original_config=None, config=None):
    """(source sha256, the UNet's ModelStep) of SOURCE, the checkpoint MANIFEST's model was exported from
    (export/controlnet.py rebuilds the UNet with residual inputs from it)."""
    parts = load_sdxl(source, manifest.precision, original_config, config)
    inputs = {t["name"]: t["shape"] for t in manifest.models["unet"]["inputs"]}
    step = unet_step(parts.get("unet"), inputs["text_embeds"][1], inputs["time_ids"][1], manifest.text_max_length)
    return parts.sha256, step


def claims(source: str, checkpoint: CheckpointInfo | None) -> bool:
    """The export registry's question (export/__init__.py): is SOURCE an SDXL model? (is_sdxl)"""
    return is_sdxl(source, checkpoint)


def sdxl_plan(source, precision: str, original_config, config, vae_option):
    """The plan of an SDXL base, refiner or inpainting model: its text encoders (each followed by its tokenizer),
    UNet, VAE decoder and encoder, each part loaded when its turn comes and released after it."""
    from sdrt.export import driver
    from sdrt.export.vae import check_vae, load_vae, vae_fp16_capable

    parts = load_sdxl(source, precision, original_config, config)
    unet_config = parts.config_of("unet")
    detected = detect_sdxl(parts, unet_config, original_config)
    encoders = [name for name in TEXT_ENCODERS if parts.has(name)]
    if "text_encoder_2" not in encoders:
        raise ModelError(f"{source!r} has no text_encoder_2 (OpenCLIP bigG): every SDXL model needs it")
    refiner = bool(parts.config.get("requires_aesthetics_score", False))
    made = {}  # what the parts learn on the way: text sizes, the VAE's config

    def steps():
        from tqdm import tqdm

        from sdrt.export.steps import text_encoder_step, vae_steps

        for name in encoders:
            text_encoder = parts.get(name)
            made["max_len"] = int(text_encoder.config.max_position_embeddings)
            if name == "text_encoder_2":
                made["pooled"] = int(text_encoder.config.projection_dim)
            step = text_encoder_step(text_encoder, name)
            step.release = lambda name=name: parts.release(name)
            del text_encoder
            yield step
            tokenizer = name.replace("text_encoder", "tokenizer")
            yield driver.Tokenizer(tokenizer, parts.get(tokenizer), lambda t=tokenizer: parts.release(t))
        time_ids = TIME_IDS_REFINER if refiner else TIME_IDS_BASE
        step = unet_step(parts.get("unet"), made["pooled"], time_ids, made["max_len"])
        step.release = lambda: parts.release("unet")  # the UNet leaves memory before ONNX Runtime loads its graph
        yield step
        del step
        vae = load_vae(vae_option) if vae_option else parts.get("vae")
        if vae_option:
            check_vae(vae, unet_config["out_channels"], vae_option)
        fp16_vae = vae_fp16_capable(vae)
        if precision == "fp16" and not fp16_vae:
            tqdm.write(
                "vae: kept fp32: SDXL's VAE overflows in fp16 (its config sets force_upcast); "
                "pass --vae with a VAE fixed for fp16 (force_upcast false) to run it in fp16",
                file=sys.stderr,
            )
        made["down"] = 2 ** (len(vae.config.block_out_channels) - 1)
        made["vae_config"] = dict(vae.config)
        yield from vae_steps(vae, made["down"], fp16_vae)
        parts.release("vae")

    def facts() -> dict:
        return {
            "family": "sdxl",
            "scheduler": driver.scheduler_config(parts.scheduler.config),
            **driver.vae_facts(made["vae_config"], made["down"]),
            **driver.detected_facts(detected),
            "text_max_length": made["max_len"],
            "text_hidden_size": int(unet_config["cross_attention_dim"]),
            **driver.source_facts(parts.kind, parts.name, parts.sha256, vae_option),
            "force_zeros_for_empty_prompt": bool(parts.config.get("force_zeros_for_empty_prompt", True)),
            "requires_aesthetics_score": refiner,
        }

    return driver.ExportPlan(detected.describe(), steps(), len(encoders) + 3, facts)


plan = sdxl_plan  # the export registry's entry point
