"""Upscalers sdrt has no module of its own for (DAT, OmniSR, SPAN, ...), exported through spandrel, as ComfyUI
loads them, when spandrel is installed in the exporting environment.

spandrel imports torchvision, and PyPI's CPU torch has no torchvision that loads with it: installing spandrel
brings PyPI's CUDA torch and torchvision (several GB), so it is an opt-in extra (`pip install 'sdrt[spandrel]'`, in
an export environment of its own), never a dependency of sdrt, its runtime or its CI. sdrt's own modules
(upscaler_arch.py: ESRGAN/RRDBNet, SRVGGNetCompact, SwinIR, Swin2SR, HAT) are used first whenever they detect the
file; spandrel only for the rest. The graph is traced from spandrel's torch module and checked against it at two
sizes like any other export (upscaler.export_upscaler), and the runtime runs it the same way.
"""

import importlib.util
from dataclasses import dataclass

from sdrt.errors import ModelError

INSTALL = ("other architectures (DAT, OmniSR, SPAN, ... as spandrel detects them) export through spandrel: "
           "pip install 'sdrt[spandrel]' in an export environment (it brings PyPI's CUDA torch and torchvision; "
           "see docs/guide/hires-and-upscalers.md)")  # fmt: skip
PURPOSES = ("SR", "Restoration")  # spandrel's single-image upscalers/restorers; not face restoration or inpainting


@dataclass(frozen=True)
class SpandrelArch:
    """What spandrel detected, in the fields export_upscaler writes to the manifest."""

    name: str  # spandrel's architecture name ("DAT", "OmniSR", "SPAN", ...)
    scale: int
    in_channels: int
    out_channels: int
    size_multiple: int  # spandrel's size_requirements.multiple_of: input sides are padded to it
    minimum_size: int  # spandrel's size_requirements.minimum (pixels per side)
    loader: str  # "spandrel X.Y.Z"
    features: int = 0
    blocks: int = 0


def available() -> bool:
    """Whether spandrel can be imported here (it is an optional export extra)."""
    return importlib.util.find_spec("spandrel") is not None


def load(state: dict, label: str):
    """(torch module in eval mode, SpandrelArch) of the state dict STATE (file LABEL, for errors), through spandrel;
    None when spandrel detects no architecture in it."""
    import spandrel

    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(dict(state))
    except spandrel.UnsupportedModelError:
        return None
    except (RuntimeError, KeyError, ValueError) as e:
        raise ModelError(f"{label!r}: spandrel failed to load it: {str(e)[:300]}") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose not in PURPOSES:
        raise ModelError(f"{label!r} is a {descriptor.architecture.name} model for {descriptor.purpose}, not an "
                         "upscaler (sdrt exports single-image upscalers)")  # fmt: skip
    requirements = descriptor.size_requirements
    arch = SpandrelArch(
        name=descriptor.architecture.name,
        scale=int(descriptor.scale),
        in_channels=int(descriptor.input_channels),
        out_channels=int(descriptor.output_channels),
        size_multiple=max(1, int(requirements.multiple_of)),
        minimum_size=int(requirements.minimum),
        loader=f"spandrel {spandrel.__version__}",
    )
    return descriptor.model.float().eval(), arch
