"""A1111's "Approx NN" live preview network (modules/sd_vae_approx.py: VAEApprox; the files model.pt for SD 1.x/2.x,
vaeapprox-sdxl.pt for SDXL and vaeapprox-sd3.pt for 16-channel latents, which A1111 downloads into
models/VAE-approx/) exported as the model folder's optional "vae_approx" graph (runtime/previews.py runs it).

The architecture, as A1111 defines it: the latents upsampled 2x (nearest), padded by 11 zeros on each side, then
eight unpadded convolutions (kernels 7, 5, 3, 3, 3, 3, 3, 3; channels C -> 8 -> 16 -> 32 -> 64 -> 32 -> 16 -> 8 -> 3),
each followed by leaky ReLU (slope 0.1), the last one too: (B, C, h, w) latents -> (B, 3, 2h, 2w) roughly in [-1, 1].
The .pt file (a state dict conv1.weight ... conv8.bias) is read through torch's weights-only unpickler
(export/sources.py): one holding code is refused.
"""

from pathlib import Path

from sdrt.errors import InvalidOption, ModelError
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.previews import VAE_APPROX, vae_approx_spec

PAD = 11  # zeros on each side after the 2x upsampling: the convolutions' total shrink (6 + 4 + 6 x 2) / 2
WIDTHS = (8, 16, 32, 64, 32, 16, 8, 3)  # output channels of conv1 ... conv8
KERNELS = (7, 5, 3, 3, 3, 3, 3, 3)
SLOPE = 0.1  # leaky ReLU's negative slope
VAE_APPROX_ALLOWED = "A1111's VAE-approx file: model.pt, vaeapprox-sdxl.pt or vaeapprox-sd3.pt (conv1 ... conv8)"


def approx_network(latent_channels: int):
    """A1111's VAEApprox as a torch module (random weights; load_state_dict fills them)."""
    from torch import nn

    class ApproxNN(nn.Module):
        def __init__(self):
            super().__init__()
            ins = (latent_channels, *WIDTHS[:-1])
            for i, (cin, cout, k) in enumerate(zip(ins, WIDTHS, KERNELS, strict=True), start=1):
                setattr(self, f"conv{i}", nn.Conv2d(cin, cout, k))

        def forward(self, latents):  # (B, C, h, w) -> (B, 3, 2h, 2w)
            x = nn.functional.interpolate(latents, scale_factor=2.0, mode="nearest")
            x = nn.functional.pad(x, (PAD, PAD, PAD, PAD))
            for i in range(1, len(WIDTHS) + 1):
                x = nn.functional.leaky_relu(getattr(self, f"conv{i}")(x), SLOPE)
            return x

    return ApproxNN().float().eval().requires_grad_(False)


def load_vae_approx(source: str):
    """The network held by the file SOURCE; InvalidOption / ModelError naming it when it is not A1111's."""
    from sdrt.export.sources import load_weights

    path = Path(source)
    if not path.is_file() or path.suffix.lower() not in (".pt", ".pth", ".safetensors"):
        raise InvalidOption("--vae-approx", source, VAE_APPROX_ALLOWED)
    weights = load_weights(path)
    first = weights.get("conv1.weight")
    if first is None or first.ndim != 4:
        raise ModelError(f"{source!r} is not an Approx NN file: no conv1.weight (keys: {list(weights)[:4]})")
    network = approx_network(int(first.shape[1]))
    try:
        network.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{source!r} does not fit A1111's VAEApprox: {str(e).splitlines()[0][:300]}") from None
    return network


def vae_approx_step(network, latent_channels: int):
    """The ModelStep of the Approx NN graph: (B, C, h, w) UNet latents -> (B, 3, 2h, 2w)."""
    import torch

    from sdrt.export.steps import ModelStep

    channels = int(network.conv1.in_channels)
    if channels != int(latent_channels):
        allowed = f"a file for {latent_channels}-channel latents (the model's)"
        raise InvalidOption("--vae-approx", f"a file for {channels}-channel latents", allowed)
    generator = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    def forward(module, latents):
        return module(latents)

    return ModelStep(vae_approx_spec(channels), network, forward, (randn(1, channels, 5, 7),),
                     (randn(2, channels, 8, 6),))  # fmt: skip


def add_vae_approx(source: str, model_dir, progress: bool = True) -> Manifest:
    """Export A1111's Approx NN from the file SOURCE into MODEL_DIR (replacing one there) and list it in model.json."""
    from tqdm import tqdm

    from sdrt.export.driver import add_to_folder

    manifest = Manifest.load(model_dir)
    bar = tqdm(total=1, desc=VAE_APPROX, unit="step", disable=not progress)
    step = vae_approx_step(load_vae_approx(source), manifest.latent_channels)
    updated = add_to_folder(manifest, [step], bar, {VAE_APPROX: {"source": Path(source).name}})
    bar.close()
    return updated
