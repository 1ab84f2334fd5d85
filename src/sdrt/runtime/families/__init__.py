"""Model families behind one seam: the runtime asks `family_of(manifest)` and never tests a family's name.

A family (base.Family) says in one place what differs between SD 1.x, SD 2.x and SDXL (and, through the same
questions, SD 3.5 and FLUX): its graphs, its text encoders and how prompts become conditioning, its own options,
its latent format and schedule, and its second stage (SDXL's refiner). Adding a family is one module here (and its
export plan under sdrt/export) plus one line in FAMILY_MODULES.
"""

import importlib

from sdrt.errors import ModelError
from sdrt.runtime.families.base import Family
from sdrt.runtime.flow_options import SPECS as FLOW_SPECS  # the flow families' option specs (options.py's fields)

# The family modules, each defining FAMILIES (its Family objects); the manifest's "family" picks one.
FAMILY_MODULES = ("sdrt.runtime.families.sd", "sdrt.runtime.families.sdxl", "sdrt.runtime.families.flow")
_REGISTRY: dict[str, Family] = {}


def registry() -> dict[str, Family]:
    """{manifest family name: Family}, in FAMILY_MODULES order (imported once)."""
    if not _REGISTRY:
        for module in FAMILY_MODULES:
            for family in importlib.import_module(module).FAMILIES:
                _REGISTRY[family.name] = family
    return _REGISTRY


def family_names() -> tuple[str, ...]:
    return tuple(registry())


def family_of(manifest) -> Family:
    """The Family of a loaded manifest, which lists the graphs the family needs (ModelError otherwise, and for a
    family this sdrt does not know)."""
    family = registry().get(manifest.family)
    if family is None:
        where = repr(str(manifest.folder / "model.json"))
        raise ModelError(f"{where}: family is {manifest.family!r}; expected one of {', '.join(registry())}")
    family.check(manifest)
    return family


def family_option_names() -> dict[str, Family]:
    """{option name: the family that takes it} for the options only one family takes (GenerationOptions' groups)."""
    return {name: family for family in registry().values() for name in family.option_names}


__all__ = ["FLOW_SPECS", "Family", "family_names", "family_of", "family_option_names", "registry"]
