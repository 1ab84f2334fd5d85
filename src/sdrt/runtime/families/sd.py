"""SD 1.x (CLIP ViT-L/14 text encoder, 512 px) and SD 2.x (OpenCLIP ViT-H/14, 512 or 768 px, eps or v): the
UNet families whose behaviour base.Family describes."""

from sdrt.runtime.families.base import Family


class SD1(Family):
    name, title = "sd1", "SD 1.x"


class SD2(Family):
    name, title = "sd2", "SD 2.x"


FAMILIES = (SD1(), SD2())
