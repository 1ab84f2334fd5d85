"""Another VAE in place of a model's own (A1111's sd_vae; the option `vae_file`): a VAE folder that
export/vae_files.py writes (vae_decoder/ and vae_encoder/ graphs, vae.json) decodes the final latents and encodes
img2img / inpainting images, scaled by the model's own factors (as A1111 loads a VAE file into the model).

A VAE fits a model when its latent channels and pixels per latent cell are the model's and, when its config says
(a diffusers folder), its scaling factor is too; any other is refused by name. The infotext gets A1111's
"VAE hash" (the file's sha256, 10 digits) and "VAE" (its file name).
"""

import json
from pathlib import Path

from sdrt.errors import InvalidOption

VAE_MANIFEST = "vae.json"
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")  # the VAE files A1111 lists in models/VAE
VAE_GRAPHS = ("vae_decoder", "vae_encoder")
SCALING_RTOL = 1e-3


def read_vae_info(folder, field: str = "vae_file") -> dict:
    """FOLDER's vae.json (InvalidOption naming FIELD when FOLDER is not an exported VAE)."""
    path = Path(folder) / VAE_MANIFEST
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InvalidOption(field, str(folder), "an exported VAE folder (with vae.json; `sdrt generate --vae FILE` "
                            "exports a VAE file or diffusers VAE folder into the cache)") from None  # fmt: skip
    return {**info, "folder": str(Path(folder))}


def check_vae_fits(manifest, info: dict, field: str, value) -> None:
    """InvalidOption naming FIELD unless the VAE of INFO decodes MANIFEST's latents (its family's VAE)."""
    model = manifest.model_name
    if int(info["latent_channels"]) != int(manifest.latent_channels):
        raise InvalidOption(field, value, f"a VAE with {manifest.latent_channels} latent channels ({model}'s); this "
                            f"one has {info['latent_channels']}: a VAE of another model family")  # fmt: skip
    if int(info.get("latent_downsample", manifest.latent_downsample)) != int(manifest.latent_downsample):
        raise InvalidOption(field, value, f"a VAE of {manifest.latent_downsample} pixels per latent cell ({model}'s);"
                            f" this one has {info['latent_downsample']}")  # fmt: skip
    scaling = info.get("scaling_factor")
    if scaling is not None and abs(scaling - manifest.vae_scaling_factor) > SCALING_RTOL * manifest.vae_scaling_factor:
        raise InvalidOption(field, value, f"a VAE with the scaling factor {manifest.vae_scaling_factor} ({model}'s); "
                            f"this one's config says {scaling}: a VAE of another model family")  # fmt: skip


def check_vae_file(o: dict, manifest) -> None:
    """options.resolve's check of the option `vae_file` (None: the model's own VAE)."""
    folder = o.get("vae_file")
    if folder is None:
        return
    if not isinstance(folder, str | Path):
        raise InvalidOption("vae_file", folder, "an exported VAE folder (a path)")
    check_vae_fits(manifest, read_vae_info(folder), "vae_file", str(folder))
    o["vae_file"] = str(folder)


def vae_infotext(opts) -> dict:
    """A1111's "VAE hash" and "VAE" of OPTS' swapped VAE ({} with the model's own)."""
    if getattr(opts, "vae_file", None) is None:
        return {}
    info = read_vae_info(opts.vae_file)
    return {"VAE hash": (info.get("sha256") or "")[:10] or None, "VAE": info.get("name")}


VAE_FILE_OPTION = dict(
    group="output", cli=False,
    help="an exported VAE folder decoding and encoding instead of the model's VAE (A1111's sd_vae; the CLI's --vae "
    "FILE_OR_FOLDER exports one)",
)  # fmt: skip


class SwappedVaes:
    """The swapped VAEs a model has used, by folder: each a runtime.vae.Vae over its own engines (loaded on first
    use, kept until unload) with the model's manifest (its scaling factors) and memory plan (tiling)."""

    def __init__(self, vae, backend: str | None):
        self.base, self.backend, self.by_folder = vae, backend, {}

    def get(self, folder):
        """The Vae that FOLDER's graphs run (the model's own for None)."""
        if folder is None:
            return self.base
        key = str(Path(folder).resolve())
        if key not in self.by_folder:
            from sdrt.engines import create_engine

            info = read_vae_info(folder)
            engines = {name: create_engine(Path(key) / info["models"][name]["file"], self.backend or "cpu")
                       for name in VAE_GRAPHS}  # fmt: skip
            self.by_folder[key] = type(self.base)(self.base.manifest, engines, self.base.memory)  # a Vae (vae.py)
        return self.by_folder[key]

    def unload(self) -> None:
        for vae in self.by_folder.values():
            for engine in vae.engines.values():
                engine.unload()
