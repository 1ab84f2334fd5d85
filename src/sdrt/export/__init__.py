"""Export: checkpoint -> ONNX models + tokenizer + model.json. The only package that imports torch."""

import inspect
from pathlib import Path

from sdrt.errors import InvalidOption
from sdrt.export import faults
from sdrt.export.driver import scheduler_config, staged_folder
from sdrt.runtime.manifest import PRECISIONS, Manifest

__all__ = ["export", "scheduler_config"]

# The families' export plans, asked in this order (the most specific first): each module has
# claims(source, checkpoint_info) -> bool, plan(source, precision, original_config, config, vae) -> ExportPlan,
# FAMILIES (the manifest families it writes) and denoiser_step(source, manifest, ...) (export/controlnet.py).
# A new family's export is one module here and one entry in this list.
EXPORT_PLANS = ("sdrt.export.sd3", "sdrt.export.flux", "sdrt.export.sdxl", "sdrt.export.sd")


def plan_module(family: str):
    """The export plan module that writes models of FAMILY (a manifest's family)."""
    import importlib

    for name in EXPORT_PLANS:
        module = importlib.import_module(name)
        if family in module.FAMILIES:
            return module
    raise InvalidOption("family", family, "a family sdrt exports")


def plan_for(source: str):
    """The export plan function of the first family in EXPORT_PLANS that claims SOURCE."""
    import importlib

    from sdrt.export.sources import checkpoint_info

    info = checkpoint_info(source)
    for name in EXPORT_PLANS:
        module = importlib.import_module(name)
        if module.claims(source, info):
            return module.plan
    raise InvalidOption("source", source, "a checkpoint of a family sdrt exports")


def export(
    source: str,
    out_dir,
    precision: str = "fp32",
    original_config: str | None = None,
    config: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    vae: str | None = None,
    controlnet: bool = False,
    loras=(),
    deepcache: int | None = None,
    files: dict | None = None,
    part_size: str | None = None,
) -> Manifest:
    """Export SOURCE to OUT_DIR atomically: the folder appears complete, or not at all. CONTROLNET: also the UNet
    variant that takes ControlNet residuals (export/controlnet.py). LORAS: "FILE[:WEIGHT[:UNET_WEIGHT]]" strings,
    LoRAs merged into the graphs' weights (export/bake.py). DEEPCACHE: a skip branch, also DeepCache's two UNet
    graphs at it (export/deepcache.py). FILES: {"--clip-l"|"--clip-g"|"--t5xxl": path}, the text encoders of an
    SD 3.5 / FLUX.1 single file given as files of their own; PART_SIZE ("4GB"): fp32 weight bytes per part of the
    graphs exported in parts (T5, FLUX's transformer)."""
    if precision not in PRECISIONS:
        raise InvalidOption("--precision", precision, " or ".join(PRECISIONS))
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InvalidOption("--output", str(out_dir), "a folder that does not exist yet (or pass --overwrite)")
    if original_config and not Path(original_config).is_file():
        raise InvalidOption("--original-config", original_config, "an existing YAML file")
    if original_config:
        from sdrt.export.detect import read_original_config

        read_original_config(original_config)  # a bad YAML fails now, before the checkpoint loads
    if config and not (Path(config) / "model_index.json").is_file() and Path(config).exists():
        raise InvalidOption("--config", config, "a diffusers folder (with model_index.json) or a hub id")
    if vae and not Path(vae).is_file():  # a VAE file: an SD 3.5 / FLUX.1 single file's part (flow_single_file.py)
        from sdrt.export.vae import check_vae_option

        check_vae_option(vae)  # a bad --vae fails now, before the checkpoint loads
    extras = _flow_extras(files, part_size)
    baked = _check_loras(loras)
    needed = faults.needed_bytes(source, precision, unet_variant=controlnet)
    faults.check_free_space(out_dir, needed)  # a plainly hopeless export refused before the checkpoint loads
    with faults.machine_faults(out_dir, needed), staged_folder(out_dir) as staging:
        _export_into(source, staging, precision, original_config, config, progress, vae, controlnet, deepcache, extras)
        if baked:
            from sdrt.export.bake import bake_loras

            bake_loras(staging, baked)
    return Manifest.load(out_dir)


def _check_loras(loras) -> list:
    """LORAS parsed and each file read once, so a bad --lora fails before the checkpoint loads."""
    if not loras:
        return []
    from sdrt.export.bake import parse_lora_option
    from sdrt.runtime.lora_files import read_lora

    parsed = [parse_lora_option(text) for text in loras]
    for path, _, _ in parsed:
        read_lora(path)
    return parsed


def _flow_extras(files: dict | None, part_size) -> dict:
    """The options only the SD 3.5 / FLUX.1 plans take (their files checked now), as plan keyword arguments."""
    extras = {}
    files = {flag: path for flag, path in (files or {}).items() if path is not None}
    if files:
        from sdrt.export.flow_single_file import check_component_files

        check_component_files(files)
        extras["files"] = files
    if part_size is not None:
        from sdrt.engines.plan import parse_size

        extras["part_bytes"] = parse_size(part_size, "--part-size")
    return extras


def _export_into(source, folder: Path, precision, original_config, config, progress, vae=None, controlnet=False,
                 deepcache=None, extras=None):  # fmt: skip
    """The family's plan (EXPORT_PLANS) run by the one driver; EXTRAS: _flow_extras' (refused by other plans)."""
    from tqdm import tqdm

    from sdrt.export.driver import export_into

    bar = tqdm(total=6, desc="export", unit="step", disable=not progress)
    try:
        bar.set_postfix_str(f"loading {source}")
        make_plan = plan_for(source)
        if extras and "files" not in inspect.signature(make_plan).parameters:
            flag = next(iter(extras.get("files", {"--part-size": None})))
            raise InvalidOption(flag, (extras.get("files") or {}).get(flag, "given"), "only for SD 3.5 / FLUX.1 models")
        plan = make_plan(source, precision, original_config, config, vae, **(extras or {}))
        if controlnet:  # graph variants: ControlNet's UNet with residual inputs
            from sdrt.export.controlnet import with_unet_controlnet

            plan = with_unet_controlnet(plan)
        if deepcache is not None:  # DeepCache's full and shallow UNet graphs at skip branch DEEPCACHE
            from sdrt.export.deepcache import with_deepcache

            plan = with_deepcache(plan, deepcache)
        return export_into(plan, folder, precision, bar)
    finally:
        bar.close()  # its line ended, so an error prints on a line of its own
