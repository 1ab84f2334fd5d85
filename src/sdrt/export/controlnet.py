"""ControlNet export (Zhang et al. 2023): a ControlNet -> ONNX graph + controlnet.json, and the UNet graph variant that
takes its residuals (`unet_controlnet`), added to an exported model only when ControlNet is asked for.

Sources: a diffusers ControlNet folder (config.json), a hub id, or a single file (.safetensors; .pth/.ckpt through
torch's weights-only unpickler) with `--config` (a diffusers ControlNet folder of the same architecture) or
`--original-config` (the extension's cldm_v15.yaml / cldm_v21.yaml, for diffusers' conversion).
"""

import json
import sys
import tempfile
from pathlib import Path

from sdrt.errors import InvalidOption, ModelError
from sdrt.export import faults
from sdrt.runtime.controlnet_models import CONTROLNET_FORMAT, CONTROLNET_MANIFEST, CONTROLNET_VERSION, controlnet_family
from sdrt.runtime.manifest import PRECISIONS, Manifest
from sdrt.runtime.modelspec import (
    TensorSpec,
    controlnet_residuals,
    controlnet_spec,
    unet_controlnet_spec,
)

UNET_CONTROLNET = "unet_controlnet"


def load_controlnet(source: str, config: str | None = None, original_config: str | None = None):
    """(diffusers ControlNetModel in float32, kind, name, sha256) of SOURCE."""
    import torch
    from diffusers import ControlNetModel

    from sdrt.export.sources import SINGLE_FILE_SUFFIXES, file_sha256, folder_sha256, load_weights

    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{source!r} is not a diffusers ControlNet folder (no config.json)")
        try:
            model = ControlNetModel.from_pretrained(path, torch_dtype=torch.float32)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"could not load the ControlNet {source!r}: {str(e)[:300]}") from None
        return model, "diffusers", path.resolve().name, folder_sha256(path)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise InvalidOption(
                "SOURCE", source, f"a ControlNet folder, hub id or {'/'.join(SINGLE_FILE_SUFFIXES)} file"
            )
        weights = load_weights(path)  # safetensors, or a pickle through the weights-only unpickler
        if config:
            kwargs = {"config": str(config), "local_files_only": Path(config).is_dir()}
        else:
            kwargs = {}
        try:
            if original_config and not config:
                with tempfile.TemporaryDirectory() as tmp:
                    derived = cldm_controlnet_config(original_config, weights)
                    (Path(tmp) / "config.json").write_text(json.dumps(derived))
                    model = ControlNetModel.from_single_file(weights, torch_dtype=torch.float32, config=tmp,
                                                             local_files_only=True)  # fmt: skip
            else:
                model = ControlNetModel.from_single_file(weights, torch_dtype=torch.float32, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            hint = "" if (config or original_config) else (
                " (offline, pass --config with a diffusers ControlNet folder of the same architecture, or "
                "--original-config with its cldm YAML)")  # fmt: skip
            raise ModelError(f"could not load the ControlNet {source!r}: {str(e)[:400]}{hint}") from None
        return model.float(), "single_file", path.stem, file_sha256(path).hexdigest()
    if source.startswith((".", "/")) or source.count("/") != 1:
        raise ModelError(f"{source!r} does not exist (expected a ControlNet folder, a single file or a hub id)")
    try:
        model = ControlNetModel.from_pretrained(source, torch_dtype=torch.float32)
    except Exception as e:  # network and hub errors come in many types
        raise ModelError(f"could not load {source!r} from the hub: {str(e)[:300]}") from None
    return model, "hub", source, ""


def cldm_controlnet_config(original_config, weights) -> dict:
    """A diffusers ControlNetModel config from the extension's cldm YAML (cldm_v15.yaml, cldm_v21.yaml): the UNet
    architecture of its unet_config, the hint channels of its control_stage_config. (diffusers 0.42's own
    `original_config` path for ControlNets fails: it calls its UNet config helper without the checkpoint.)"""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    from sdrt.export.detect import read_original_config

    yaml = read_original_config(original_config)
    try:
        hint = yaml["model"]["params"]["control_stage_config"]["params"]["hint_channels"]
        unet = create_unet_diffusers_config_from_ldm(yaml, weights)
    except (KeyError, TypeError) as e:
        raise ModelError(f"{original_config!r} is not a ControlNet (cldm) config: no {e}") from None
    keys = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
            "addition_time_embed_dim", "projection_class_embeddings_input_dim",
            "transformer_layers_per_block")  # fmt: skip
    known = {k: unet[k] for k in keys if unet.get(k) is not None}  # None: diffusers' default
    return {"_class_name": "ControlNetModel", "conditioning_channels": hint, **known}


def residuals_of(config):
    return controlnet_residuals(config.block_out_channels, config.layers_per_block)


def latent_sizes(h: int, w: int, residuals) -> dict[int, tuple[int, int]]:
    """{downscale: (h, w)} of each residual level: every downsampler halves a side, rounding up (stride 2, pad 1)."""
    sizes, level = {1: (h, w)}, 1
    for r in residuals:
        while level < r.downscale:
            h, w, level = -(-h // 2), -(-w // 2), level * 2
            sizes[level] = (h, w)
    return sizes


def controlnet_forward(controlnet, sample, timestep, encoder_hidden_states, controlnet_cond, *added):
    """diffusers' ControlNetModel call at conditioning scale 1 -> (down residuals..., mid residual)."""
    kwargs = {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if added else {}
    down, mid = controlnet(
        sample, timestep.float(), encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, return_dict=False,
        **kwargs,
    )  # fmt: skip
    return (*down, mid)


def controlnet_step(controlnet, pixels_per_cell: int = 8, time_ids: int = 6):
    """The ControlNet's export step, inputs sized from its config (SDXL's pooled/time ids when it has them)."""
    import torch

    from sdrt.export.steps import ModelStep

    config = controlnet.config
    generator = torch.Generator().manual_seed(2)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    residuals = residuals_of(config)
    latent_ch, context = config.in_channels, config.cross_attention_dim
    added_specs, sdxl = (), config.addition_embed_type == "text_time"
    if sdxl:
        pooled = controlnet.add_embedding.linear_1.in_features - time_ids * config.addition_time_embed_dim
        added_specs = (
            TensorSpec("text_embeds", "float32", ("batch", pooled)),
            TensorSpec("time_ids", "float32", ("batch", time_ids)),
        )
    spec = controlnet_spec(latent_ch, context, residuals, config.conditioning_channels, added_specs)
    up = 2 ** (len(config.block_out_channels) - 1)

    def inputs(batch, h, w, t, tokens):
        extra = (
            (randn(batch, pooled), torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0][:time_ids]] * batch))
            if sdxl
            else ()
        )
        return (
            randn(batch, latent_ch, h, w),
            torch.tensor(t),
            randn(batch, tokens, context),
            torch.rand(
                batch, config.conditioning_channels, h * pixels_per_cell, w * pixels_per_cell, generator=generator
            ),
            *extra,
        )

    return ModelStep(
        spec,
        controlnet,
        controlnet_forward,
        inputs(1, 2 * up, 2 * up, [500.0], 77),
        inputs(2, 2 * up, 3 * up, [999.0, 1.0], 154),
    )


def unet_controlnet_step(unet_step, residuals):
    """UNET_STEP (the model's own UNet export step) as the variant that adds ControlNet residuals."""
    import torch

    from sdrt.export.steps import ModelStep

    generator = torch.Generator().manual_seed(3)
    n_added = len(unet_step.spec.inputs) - 3  # SDXL: text_embeds, time_ids

    def forward(unet, sample, timestep, encoder_hidden_states, *rest):
        added = {"added_cond_kwargs": {"text_embeds": rest[0], "time_ids": rest[1]}} if n_added else {}
        res = rest[n_added:]
        return unet(
            sample, timestep.float(), encoder_hidden_states, down_block_additional_residuals=tuple(res[:-1]),
            mid_block_additional_residual=res[-1], return_dict=False, **added,
        )[0]  # fmt: skip

    def with_residuals(inputs):
        sizes = latent_sizes(*inputs[0].shape[2:], residuals)
        batch = inputs[0].shape[0]
        extra = tuple(torch.randn(batch, r.channels, *sizes[r.downscale], generator=generator) for r in residuals)
        return (*inputs, *extra)

    return ModelStep(
        unet_controlnet_spec(unet_step.spec, residuals),
        unet_step.module,
        forward,
        with_residuals(unet_step.trace_inputs),
        with_residuals(unet_step.check_inputs),
    )


def with_unet_controlnet(plan):
    """PLAN (the driver's ExportPlan of a model) with the `unet_controlnet` variant: its step runs just before the
    model's own UNet step, on the same module (which that step then releases), so the UNet is loaded once."""
    from dataclasses import replace

    from sdrt.export.steps import ModelStep

    if not plan.controlnet:
        raise InvalidOption("--controlnet", True, "not given: this model family has no ControlNet variant yet")

    def parts():
        for part in plan.parts:
            if isinstance(part, ModelStep) and part.spec.name == "unet":
                yield unet_controlnet_step(part, residuals_of(part.module.config))
            yield part

    return replace(plan, parts=parts(), steps=plan.steps + 1)


def export_controlnet(
    source: str,
    out_dir,
    precision: str = "fp32",
    config: str | None = None,
    original_config: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Export the ControlNet SOURCE to OUT_DIR (controlnet/model.onnx + controlnet.json), atomically; its manifest
    (a full disk, a refused permission or exhausted memory: one SdrtError, export/faults.py)."""
    if precision not in PRECISIONS:
        raise InvalidOption("--precision", precision, " or ".join(PRECISIONS))
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InvalidOption("--output", str(out_dir), "a folder that does not exist yet (or pass --overwrite)")
    if config and not (Path(config) / "config.json").is_file() and Path(config).exists():
        raise InvalidOption("--config", config, "a diffusers ControlNet folder (with config.json) or a hub id")
    if original_config and not Path(original_config).is_file():
        raise InvalidOption("--original-config", original_config, "an existing YAML file")
    needed = faults.needed_bytes(source, precision)
    faults.check_free_space(out_dir, needed)
    with faults.machine_faults(out_dir, needed, "the ControlNet export"):
        return _export_controlnet(source, out_dir, precision, config, original_config, progress)


def _export_controlnet(source: str, out_dir: Path, precision: str, config, original_config, progress: bool) -> dict:
    """export_controlnet once its arguments are checked."""
    from tqdm import tqdm

    from sdrt.export.driver import run_step, staged_folder
    from sdrt.version import __version__

    bar = tqdm(total=2, desc="export-controlnet", unit="step", disable=not progress)
    bar.set_postfix_str(f"loading {source}")
    controlnet, kind, name, sha256 = load_controlnet(source, config, original_config)
    bar.update()
    family = controlnet_family(dict(controlnet.config))
    tqdm.write(f"ControlNet {name}: {family} ({len(residuals_of(controlnet.config))} residuals)", file=sys.stderr)
    with staged_folder(out_dir) as staging:
        entry = run_step(controlnet_step(controlnet), staging, precision, bar)
        manifest = {
            "format": CONTROLNET_FORMAT,
            "version": CONTROLNET_VERSION,
            "family": family,
            "name": name,
            "source": {"kind": kind, "name": name, "sha256": sha256},
            "precision": entry["precision"],
            "global_pool_conditions": bool(controlnet.config.get("global_pool_conditions", False)),
            "cross_attention_dim": int(controlnet.config.cross_attention_dim),
            "sdrt_version": __version__,
            "model": entry,
        }
        (staging / CONTROLNET_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    bar.close()
    return manifest


def add_unet_controlnet(source: str, model_dir, progress: bool = True, original_config=None, config=None) -> Manifest:
    """Add the `unet_controlnet` graph to MODEL_DIR (exported from SOURCE, the same weights), once; the updated
    manifest. The model's own `unet` graph is left as it is, so generation without ControlNet keeps its speed."""
    from tqdm import tqdm

    from sdrt.export.driver import add_to_folder, source_denoiser_step

    manifest = Manifest.load(model_dir)
    if UNET_CONTROLNET in manifest.models:
        return manifest
    bar = tqdm(total=1, desc="unet_controlnet", unit="step", disable=not progress)
    base = source_denoiser_step(source, manifest, original_config, config)
    updated = add_to_folder(manifest, [unet_controlnet_step(base, residuals_of(base.module.config))], bar)
    bar.close()
    return updated
