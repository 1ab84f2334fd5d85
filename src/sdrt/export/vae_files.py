"""A VAE to swap in at run time (A1111's sd_vae, a models/VAE folder; `sdrt generate --vae FILE_OR_FOLDER`),
exported once into the cache as a VAE folder: vae_decoder/ and vae_encoder/ (fp32 graphs, the model's own I/O) and
vae.json (runtime/vae_swap.py reads it and checks it fits a model).

Sources, as people download them: a diffusers AutoencoderKL folder (config.json; a model folder's vae/ too), or one
file, .safetensors or a pickle (.pt, .ckpt, .bin) read through torch's weights-only unpickler (a pickle holding code
is refused, none of it runs). A file's keys are the original LDM layout (encoder.down.0.block.0..., with or without
a first_stage_model. prefix, as vae-ft-mse-840000-ema-pruned) or diffusers' own (encoder.down_blocks.0...). A file
has no config: block channels, blocks per level and latent channels come from its weight shapes, the group norms
have 32 groups (every SD-family VAE; A1111 loads the file into the model's VAE, which has them too).

A VAE of another family is refused against the model: its latent channels (from the weights), and for a folder its
config's scaling_factor (a file has none: the model's is used, as A1111 does).
"""

import hashlib
import json
import re
import sys
from pathlib import Path

from sdrt import cache_files
from sdrt.errors import InvalidOption, ModelError
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.vae_swap import VAE_MANIFEST, VAE_SUFFIXES, check_vae_fits

VAE_ALLOWED = "a diffusers VAE folder (config.json), or a VAE file (.safetensors, .pt, .ckpt, .bin)"
LDM_PREFIXES = ("first_stage_model.", "vae.")
NORM_GROUPS = 32
HASH_CHUNK = 2**20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weights_file(folder: Path) -> Path | None:
    """A diffusers VAE folder's weights file (what its hash is of)."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def vae_source(source: str, field: str = "--vae") -> Path:
    """SOURCE as a VAE file or diffusers VAE folder (a model folder's vae/), else InvalidOption naming FIELD."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() in VAE_SUFFIXES:
        return path
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise InvalidOption(field, source, VAE_ALLOWED)


def load_vae_source(path: Path):
    """(AutoencoderKL float32, scaling factor from its config or None) of a file or folder (vae_source's)."""
    import torch
    from diffusers import AutoencoderKL

    if path.is_dir():
        try:
            vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=torch.float32)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"could not load the VAE {str(path)!r}: {str(e)[:300]}") from None
        return vae, float(vae.config.scaling_factor)
    from sdrt.export.sources import load_weights

    return vae_from_weights(load_weights(path), str(path)), None


def vae_from_weights(weights: dict, source: str):
    """An AutoencoderKL holding WEIGHTS (LDM or diffusers keys), its config read off the shapes."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    for prefix in LDM_PREFIXES:
        if any(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    config = inferred_config(weights, source)
    if "encoder.down.0.block.0.conv1.weight" in weights:  # LDM layout
        weights = convert_ldm_vae_checkpoint(weights, config)
    vae = AutoencoderKL(**config).float()
    missing, unexpected = vae.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    if missing or unexpected:
        raise ModelError(f"{source!r} is not an SD-family VAE (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")  # fmt: skip
    return vae


def inferred_config(weights: dict, source: str) -> dict:
    """AutoencoderKL's config from the shapes of WEIGHTS (LDM or diffusers keys)."""
    ldm = "encoder.down.0.block.0.conv1.weight" in weights
    block = "encoder.down.{}.block.{}.conv1.weight" if ldm else "encoder.down_blocks.{}.resnets.{}.conv1.weight"
    if block.format(0, 0) not in weights or "quant_conv.weight" not in weights:
        raise ModelError(f"{source!r} is not a VAE (no encoder blocks or quant_conv among its weights)")
    channels = []
    while block.format(len(channels), 0) in weights:
        channels.append(int(weights[block.format(len(channels), 0)].shape[0]))
    layers = 0
    while block.format(0, layers) in weights:
        layers += 1
    return {
        "in_channels": 3, "out_channels": 3, "block_out_channels": tuple(channels), "layers_per_block": layers,
        "down_block_types": ("DownEncoderBlock2D",) * len(channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(channels),
        "latent_channels": int(weights["quant_conv.weight"].shape[0]) // 2, "norm_num_groups": NORM_GROUPS,
    }  # fmt: skip


def vae_cache_entry(path: Path) -> Path:
    """The cache folder of the VAE at PATH: its name and a hash of its path, sizes and times (as the model cache)."""
    from sdrt.export.cache import cache_dir, entry_for

    model_entry = entry_for(str(path))
    return cache_dir().parent / "vaes" / model_entry.name


def export_vae(source: str, model_dir, field: str = "--vae", progress: bool = True) -> Path:
    """SOURCE's VAE folder in the cache (exported once, with a progress bar), checked against MODEL_DIR's model:
    InvalidOption naming FIELD when it does not fit (another family's latent channels or scaling)."""
    manifest = Manifest.load(Path(model_dir))
    path = vae_source(source, field)
    entry = vae_cache_entry(path)

    def make(staging: Path) -> None:
        write_vae_folder(path, staging, progress, lambda info: check_vae_fits(manifest, info, field, source))

    cache_files.ensure(entry, f"exporting the VAE {source}", make)
    check_vae_fits(manifest, json.loads((entry / VAE_MANIFEST).read_text()), field, source)
    return entry


def write_vae_folder(path: Path, folder: Path, progress: bool, check=None) -> None:
    """Export the VAE at PATH into FOLDER: its two graphs (fp32) and vae.json; CHECK(record) first (it raises for a
    VAE that does not fit the model: nothing is exported)."""
    from tqdm import tqdm

    from sdrt.export.driver import run_step
    from sdrt.export.steps import vae_steps

    vae, scaling = load_vae_source(path)
    hashed = path if path.is_file() else weights_file(path)
    record = {
        "name": path.name if path.is_file() else re.sub(r"^vae$", path.parent.name, path.name),
        "sha256": file_sha256(hashed) if hashed else None, "latent_channels": int(vae.config.latent_channels),
        "scaling_factor": scaling, "latent_downsample": 2 ** (len(vae.config.block_out_channels) - 1),
    }  # fmt: skip
    if check is not None:
        check(record)
    print(f"exporting the VAE {path} once into the cache", file=sys.stderr)
    steps = vae_steps(vae, record["latent_downsample"])
    bar = tqdm(total=len(steps), desc="VAE", unit="graph", disable=not progress)
    record["models"] = {step.spec.name: run_step(step, folder, "fp32", bar) for step in steps}
    bar.close()
    (folder / VAE_MANIFEST).write_text(json.dumps(record, indent=1) + "\n")
