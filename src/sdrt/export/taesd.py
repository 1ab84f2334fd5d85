"""TAESD (madebyollin/taesd, diffusers' AutoencoderTiny) exported into a model folder as its optional
"taesd_decoder" graph (runtime/previews.py runs it: live previews and `vae="taesd"`): TAESD for SD 1.x/2.x, TAESDXL,
and the 16-channel TAESD3 (SD 3.5) and TAEF1 (FLUX.1).

The graph takes the latents the denoiser works in. diffusers' pipelines decode `latents / vae.config.scaling_factor
(+ vae.config.shift_factor for SD 3.5 and FLUX)` with whatever VAE they hold; an AutoencoderTiny's config keeps 1 and
0 there (TAESD3 and TAEF1 were trained on the transformer's scaled and shifted latents), so the tiny decoder sees the
denoiser's latents as they are. The graph applies the config's two numbers all the same, so an AutoencoderTiny
whose config says otherwise decodes as diffusers' pipeline decodes it.

Sources: a diffusers AutoencoderTiny folder (config.json) or hub id (madebyollin/taesd, taesdxl, taesd3, taef1), or
the decoder files people download, taesd_decoder.safetensors / .pth (taesdxl_decoder.*, taesd3_decoder.*,
taef1_decoder.*), whose
keys are the original nn.Sequential's: index i there is diffusers' decoder.layers.{i - 1} (the original's layer 0 is
the clamp that diffusers' DecoderTiny.forward applies itself; diffusers' convert_tiny_autoencoder_to_diffusers.py).
A .pth file is read through torch's weights-only unpickler (export/sources.py): one holding code is refused.
"""

from pathlib import Path

from sdrt.errors import InvalidOption, ModelError
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.previews import TAESD_DECODER, taesd_decoder_spec

DECODER_PREFIX = "decoder.layers."
TAESD_ALLOWED = "a diffusers AutoencoderTiny folder (config.json), a hub id, or taesd_decoder.pth/.safetensors"


def load_taesd(source: str):
    """An AutoencoderTiny (float32) from SOURCE (see the module's docstring); InvalidOption/ModelError if unusable."""
    import torch
    from diffusers import AutoencoderTiny

    from sdrt.export.sources import is_hub_id, load_weights

    path = Path(source)
    if path.is_file():
        if path.suffix.lower() not in (".safetensors", ".pth", ".pt", ".bin"):
            raise InvalidOption("--taesd", source, TAESD_ALLOWED)
        return tiny_from_decoder_weights(load_weights(path), source)
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not ((path / "config.json").is_file() or (not path.exists() and is_hub_id(source))):
        raise InvalidOption("--taesd", source, TAESD_ALLOWED)
    try:
        return AutoencoderTiny.from_pretrained(str(path) if path.exists() else source, torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"could not load the TAESD {source!r}: {str(e)[:300]}") from None


def tiny_from_decoder_weights(weights: dict, source: str):
    """An AutoencoderTiny whose decoder holds WEIGHTS: the original taesd_decoder's keys ("1.weight", "3.conv.0.weight",
    ...) or diffusers' own ("decoder.layers.0.weight", ...); the encoder stays random and is never exported."""
    from diffusers import AutoencoderTiny

    if any(k.startswith(DECODER_PREFIX) for k in weights):
        mapped = {k[len(DECODER_PREFIX) :]: v for k, v in weights.items() if k.startswith(DECODER_PREFIX)}
    else:
        mapped = {}
        for key, value in weights.items():
            index, _, rest = key.partition(".")
            if not index.isdigit() or int(index) < 1:
                raise ModelError(f"{source!r} is not a TAESD decoder: unexpected weight {key!r}")
            mapped[f"{int(index) - 1}.{rest}"] = value
    first = mapped.get("0.weight")
    if first is None or first.ndim != 4:
        raise ModelError(f"{source!r} is not a TAESD decoder: no first convolution (key 1.weight)")
    tiny = AutoencoderTiny(latent_channels=int(first.shape[1])).float()
    missing, unexpected = tiny.decoder.layers.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=False)
    if missing or unexpected:
        raise ModelError(
            f"{source!r} does not fit TAESD's decoder (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )
    return tiny


def taesd_step(tiny, latent_channels: int):
    """The ModelStep of TAESD's decoder: (B, C, h, w) UNet latents -> (B, 3, 8h, 8w) image in [-1, 1]."""
    import torch

    from sdrt.export.steps import ModelStep

    if int(tiny.config.latent_channels) != int(latent_channels):
        raise InvalidOption(
            "--taesd", f"a TAESD with {tiny.config.latent_channels} latent channels", f"{latent_channels} (the model's)"
        )
    generator = torch.Generator().manual_seed(2)
    scaling = float(tiny.config.scaling_factor)  # diffusers' pipelines: latents / scaling_factor + shift_factor
    shift = float(getattr(tiny.config, "shift_factor", 0.0) or 0.0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    def forward(module, latents):
        if scaling != 1.0 or shift != 0.0:
            latents = latents / scaling + shift
        return module.decode(latents, return_dict=False)[0]

    return ModelStep(
        taesd_decoder_spec(latent_channels), tiny, forward, (randn(1, latent_channels, 5, 7),),
        (randn(2, latent_channels, 8, 6),),
    )  # fmt: skip


def add_taesd(source: str, model_dir, progress: bool = True) -> Manifest:
    """Export TAESD from SOURCE into MODEL_DIR (replacing one already there) and list it in model.json."""
    from tqdm import tqdm

    from sdrt.export.driver import add_to_folder

    manifest = Manifest.load(model_dir)
    bar = tqdm(total=1, desc=TAESD_DECODER, unit="step", disable=not progress)
    step = taesd_step(load_taesd(source), manifest.latent_channels)
    updated = add_to_folder(manifest, [step], bar, {TAESD_DECODER: {"source": str(source)}})
    bar.close()
    return updated
