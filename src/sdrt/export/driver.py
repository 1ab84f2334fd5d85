"""The one export driver: a family's parts (model steps and tokenizers, in the order they are made) and its
manifest facts feed `export_into`, which exports and verifies each graph, writes the tokenizers and the manifest.
SD 1.x/2.x (export/sd.py) and SDXL (export/sdxl.py) differ only in the plans they give it."""

import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.manifest import Manifest, SchedulerConfig
from sdrt.version import __version__


@dataclass
class Tokenizer:
    """A part of a plan: a tokenizer written to FOLDER/NAME (then RELEASE() drops the source's copy)."""

    name: str
    tokenizer: object
    release: Callable | None = None


@dataclass
class ExportPlan:
    """A family's export: DESCRIPTION (what was detected, printed), PARTS (ModelSteps and Tokenizers, made lazily in
    order so each module can leave memory after its graph), STEPS (the progress bar's count) and FACTS() (the
    Manifest's fields other than models, precision and version; called once every part is written). CONTROLNET:
    the family has a UNet that a ControlNet variant can be made of (export/controlnet.py)."""

    description: str
    parts: Iterable
    steps: int
    facts: Callable[[], dict]
    controlnet: bool = True


def export_into(plan: ExportPlan, folder: Path, precision: str, bar) -> Manifest:
    """Run PLAN into FOLDER: every graph exported and verified, tokenizers written, then model.json."""
    from tqdm import tqdm

    from sdrt.export.steps import ModelStep

    tqdm.write(plan.description, file=sys.stderr)
    bar.total = plan.steps + 2  # detection, the steps, the manifest
    bar.update()
    models = {}
    for part in plan.parts:
        if isinstance(part, ModelStep):
            models[part.spec.name] = run_step(part, folder, precision, bar)
        else:
            bar.set_postfix_str(part.name)
            write_tokenizer(part.tokenizer, folder / part.name)
            if part.release is not None:
                part.release()
    manifest = Manifest(precision=precision, models=models, sdrt_version=__version__, **plan.facts())
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


def add_to_folder(manifest: Manifest, steps: list, bar, notes: dict | None = None) -> Manifest:
    """Export STEPS into MANIFEST's folder (each graph staged, then moved into place, replacing one of the same
    name) and list them in its model.json, with NOTES {model: extra entry keys}; the reloaded manifest."""
    from dataclasses import replace

    staging = Path(tempfile.mkdtemp(prefix=".added.partial-", dir=manifest.folder))
    entries = {}
    try:
        for step in steps:
            name = step.spec.name
            entries[name] = {**run_step(step, staging, manifest.precision, bar), **(notes or {}).get(name, {})}
        for name in entries:
            target = manifest.folder / name
            if target.exists():
                shutil.rmtree(target)
            (staging / name).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    replace(manifest, models={**manifest.models, **entries}).save(manifest.folder)
    return Manifest.load(manifest.folder)


def source_denoiser_step(source: str, manifest: Manifest, original_config=None, config=None):
    """The export step of SOURCE's denoiser (its family's plan), for graphs added to MANIFEST's folder; SOURCE must
    be the checkpoint the folder was exported from (InvalidOption naming SOURCE when its sha256 says otherwise)."""
    from sdrt.errors import InvalidOption
    from sdrt.export import plan_module

    sha256, step = plan_module(manifest.family).denoiser_step(source, manifest, original_config, config)
    if sha256 and manifest.source.get("sha256") and sha256 != manifest.source["sha256"]:
        exported = manifest.source["sha256"][:10]
        raise InvalidOption("SOURCE", source, f"the checkpoint {str(manifest.folder)!r} was exported from ({exported})")
    return step


def scheduler_config(config) -> SchedulerConfig:
    """The keys the checkpoint's scheduler config really sets (diffusers marks the defaulted ones)."""
    defaulted = set(config.get("_use_default_values", []))
    return SchedulerConfig.from_dict({k: v for k, v in config.items() if k not in defaulted})


def vae_facts(vae_config, latent_downsample: int) -> dict:
    """The manifest's VAE fields from a diffusers AutoencoderKL config."""
    return {
        "vae_scaling_factor": float(vae_config["scaling_factor"]),
        "vae_shift_factor": vae_config.get("shift_factor"),
        "latent_channels": int(vae_config["latent_channels"]),
        "latent_downsample": int(latent_downsample),
    }


def detected_facts(detected) -> dict:
    """The manifest's fields that export's detection decided (detect.py), with where each came from."""
    return {
        "prediction_type": detected.prediction_type.value,
        "unet_in_channels": detected.unet_in_channels.value,
        "native_size": detected.native_size.value,
        "detected": detected.to_json(),
    }


def source_facts(kind: str, name: str, sha256, vae_option) -> dict:
    """The manifest's record of where the weights came from (and the --vae that replaced the VAE)."""
    source = {"kind": kind, "name": name, "sha256": sha256}
    return {"source": source | ({"vae": str(vae_option)} if vae_option else {})}


def write_tokenizer(tokenizer, folder: Path) -> None:
    """The source tokenizer's own files (special-token flags included), plus vocab.json and merges.txt (BPE)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if backend.get("type") != "BPE":  # T5's Unigram: its tokenizer.json is what the runtime reads
        return
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["merges"]]
    (folder / "vocab.json").write_text(json.dumps(backend["vocab"], ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))


@contextlib.contextmanager
def staged_folder(out_dir: Path):
    """A hidden staging folder beside OUT_DIR for the `with` block, renamed into place when the block succeeds (an
    existing OUT_DIR is moved aside first, then deleted); on any failure it is removed and OUT_DIR is untouched."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
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
