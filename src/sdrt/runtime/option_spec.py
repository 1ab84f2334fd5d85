"""What one generation option declares (Spec) and how GenerationOptions (options.py) declares it (option)."""

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Spec:
    """How one option is typed, bounded and seen by the interfaces.

    kind: str, int, float, bool, pair (two ints), ints (a list of ints), image (PIL image or path), path, array,
    dict, any, units (ControlNet units, controlnet.py).
    low/high: the allowed range (numbers); choices: the allowed values (strings).
    group: generation, editing (img2img/inpainting), sdxl, flux, sd3, or output (Python only).
    cli: a command-line flag --name-with-dashes. a1111: the A1111 request field (from_a1111(request) converts it;
    UNSET when absent); setting: or the A1111 option (override_settings key) it comes from, through from_setting.
    infotext: its key (part 1/2 of an "AxB" value), write(opts, image seeds) -> text or None, read(text) -> value.
    """

    kind: str
    help: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    group: str = "generation"
    cli: bool = True
    a1111: str | None = None
    from_a1111: Callable | None = None
    setting: str | None = None
    from_setting: Callable | None = None
    infotext: str | None = None
    part: int | None = None
    aliases: tuple[str, ...] = ()
    write: Callable | None = None
    read: Callable | None = None


def option(default, kind: str, **spec):
    """A GenerationOptions field with DEFAULT and its Spec(KIND, **SPEC)."""
    return field(default=default, metadata={"spec": Spec(kind, **spec)})
