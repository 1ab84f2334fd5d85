"""Export: checkpoint -> ONNX models + tokenizer + model.json. The only package that imports torch."""

import json
import shutil
import sys
import tempfile
from pathlib import Path

from sdrt.runtime.errors import InvalidOption
from sdrt.runtime.manifest import PRECISIONS, Manifest, SchedulerConfig

__all__ = ["export"]


def export(
    source: str,
    out_dir,
    precision: str = "fp32",
    original_config: str | None = None,
    config: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    vae: str | None = None,
) -> Manifest:
    """Export SOURCE to OUT_DIR atomically: the folder appears complete, or not at all."""
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
    if vae:
        from sdrt.export.sdxl import check_vae_option

        check_vae_option(vae)  # a bad --vae fails now, before the checkpoint loads
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        _export_into(source, staging, precision, original_config, config, progress, vae)
        staging.chmod(0o755)  # mkdtemp makes it private
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(trash / "old")
            staging.rename(out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Manifest.load(out_dir)


def _export_into(source, folder: Path, precision, original_config, config, progress, vae=None) -> Manifest:
    from tqdm import tqdm

    from sdrt import __version__
    from sdrt.export import sdxl
    from sdrt.export.detect import detect
    from sdrt.export.sources import load_source
    from sdrt.export.steps import model_steps

    bar = tqdm(total=6, desc="export", unit="step", disable=not progress)
    bar.set_postfix_str(f"loading {source}")
    if sdxl.is_sdxl(source, sdxl.checkpoint_info(source)):
        return sdxl.export_sdxl_into(source, folder, precision, original_config, config, vae, bar)
    loaded = load_source(source, original_config, config)
    pipe = loaded.pipe
    if vae is not None:
        pipe.vae = sdxl.load_vae(vae)
        sdxl.check_vae(pipe.vae, pipe.unet.config.out_channels, vae)
    detected = detect(pipe, loaded.checkpoint, loaded.user_config, original_config)
    tqdm.write(detected.describe(), file=sys.stderr)
    bar.update()
    models = {}
    for step in model_steps(pipe):
        models[step.spec.name] = run_step(step, folder, precision, bar)
    bar.set_postfix_str("tokenizer")
    write_tokenizer(pipe.tokenizer, folder / "tokenizer")
    manifest = Manifest(
        family=detected.family.value,
        prediction_type=detected.prediction_type.value,
        scheduler=scheduler_config(pipe.scheduler.config),
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        vae_shift_factor=pipe.vae.config.get("shift_factor"),
        latent_channels=int(pipe.vae.config.latent_channels),
        unet_in_channels=detected.unet_in_channels.value,
        latent_downsample=int(pipe.vae_scale_factor),
        native_size=detected.native_size.value,
        text_max_length=int(pipe.text_encoder.config.max_position_embeddings),
        text_hidden_size=int(pipe.text_encoder.config.hidden_size),
        precision=precision,
        models=models,
        source={"kind": loaded.kind, "name": loaded.name, "sha256": loaded.sha256, **({"vae": vae} if vae else {})},
        sdrt_version=__version__,
        detected=detected.to_json(),
    )
    manifest.save(folder)
    bar.update()
    bar.close()
    return manifest


def run_step(step, folder: Path, precision: str, bar) -> dict:
    """Export and verify one model; its model.json entry."""
    from tqdm import tqdm

    bar.set_postfix_str(step.spec.name)
    error = step.run(folder, precision)
    tqdm.write(
        f"{step.spec.name} ({step.precision(precision)}): "
        f"max error vs PyTorch {error:.2e} (tolerance {step.tolerance(step.precision(precision)):.0e})",
        file=sys.stderr,
    )
    bar.update()
    return {
        "file": f"{step.spec.name}/model.onnx",
        "precision": step.precision(precision),
        **step.spec.to_json(),
        **step.manifest_entry,
    }


def scheduler_config(config) -> SchedulerConfig:
    """The keys the checkpoint's scheduler config really sets (diffusers marks the defaulted ones)."""
    defaulted = set(config.get("_use_default_values", []))
    return SchedulerConfig.from_dict({k: v for k, v in config.items() if k not in defaulted})


def write_tokenizer(tokenizer, folder: Path) -> None:
    """The source tokenizer's own files (special-token flags included), plus vocab.json and merges.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["merges"]]
    (folder / "vocab.json").write_text(json.dumps(backend["vocab"], ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
