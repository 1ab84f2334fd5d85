"""--vae: a replacement VAE for any family (a diffusers VAE folder or hub id), checked before the checkpoint loads."""

from pathlib import Path

from sdrt.errors import InvalidOption, ModelError
from sdrt.export.sources import is_hub_id


def check_vae_option(vae: str) -> Path | str:
    """--vae as a folder holding config.json (a model folder's vae/ too), or a hub id; else InvalidOption."""
    path = Path(vae)
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not ((path / "config.json").is_file() or is_hub_id(vae)):
        allowed = "a diffusers VAE folder (with config.json), a model folder with vae/, or a hub id"
        raise InvalidOption("--vae", vae, allowed)
    return path if path.exists() else vae


def load_vae(vae: str):
    """--vae: an AutoencoderKL from a diffusers VAE folder (config.json), a model folder's vae/, or a hub id."""
    import torch
    from diffusers import AutoencoderKL

    path = check_vae_option(vae)
    try:
        return AutoencoderKL.from_pretrained(str(path), torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"could not load the VAE {vae!r}: {str(e)[:300]}") from None


def check_vae(vae, unet_out_channels: int, vae_option: str) -> None:
    """A replacement VAE must share the UNet's latent channels."""
    if int(vae.config.latent_channels) != int(unet_out_channels):
        raise InvalidOption(
            "--vae",
            vae_option,
            f"a VAE with {unet_out_channels} latent channels (the UNet's); this one has {vae.config.latent_channels}",
        )


def vae_fp16_capable(vae) -> bool:
    """A VAE whose config says force_upcast (SDXL's) overflows in fp16: it stays fp32 unless a fixed VAE says
    otherwise (the families whose VAEs run fp16 do not ask)."""
    return not bool(vae.config.get("force_upcast", True))
