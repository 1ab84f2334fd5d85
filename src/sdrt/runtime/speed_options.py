"""The generation options that make an image cheaper (docs/guide/speed.md): their specs, which options.py turns into
GenerationOptions fields, and their checks, which options.resolve runs.

  s_min_uncond, s_min_uncond_all, skip_early_cond   A1111's negative-guidance skips (guidance_skip.py)
  vae                                               the final decoder: the VAE or TAESD (previews.py)
  vae_file                                          another VAE in the model's (A1111's sd_vae; vae_swap.py)
  live_preview_content                              which x0 the progress callback gets (previews.py)
  deepcache_interval, deepcache_branch, deepcache_start   DeepCache (deepcache.py)
"""

from sdrt.errors import InvalidOption
from sdrt.runtime import deepcache
from sdrt.runtime.lora import parse_prompt
from sdrt.runtime.option_mappings import infotext_number
from sdrt.runtime.previews import PREVIEW_CONTENTS, VAE_DECODERS, has_taesd
from sdrt.runtime.vae_swap import VAE_FILE_OPTION, check_vae_file

MAX_NGMS = 1000.0  # NGMS compares sigmas (about 0-15) or, for DDIM/PLMS/UniPC, UNet timesteps (0-999)
_VAE_OF_LABEL = {label: name for name, label in VAE_DECODERS.items()}

# field name -> (default, kind, Spec keywords), in the order the fields appear
SPEED_OPTIONS = {
    "s_min_uncond": (0.0, "float", dict(
        low=0, high=MAX_NGMS, a1111="s_min_uncond", setting="s_min_uncond", infotext="NGMS",
        write=lambda o, im: infotext_number(o.s_min_uncond or None),
        help="A1111's negative guidance minimum sigma: below it every other step skips the negative prompt (0: off)",
    )),
    "s_min_uncond_all": (False, "bool", dict(
        setting="s_min_uncond_all", infotext="NGMS all steps", read=lambda text: text == "True",
        write=lambda o, im: True if o.s_min_uncond_all and o.s_min_uncond else None,
        help="NGMS skips every step below the sigma, not every other",
    )),
    "skip_early_cond": (0.0, "float", dict(
        low=0, high=1, setting="skip_early_cond", infotext="Skip Early CFG",
        write=lambda o, im: infotext_number(o.skip_early_cond or None),
        help="A1111's 'Ignore negative prompt during early sampling': the fraction of the steps run unguided",
    )),
    "vae": ("full", "str", dict(
        choices=tuple(VAE_DECODERS), setting="sd_vae_decode_method", infotext="VAE Decoder",
        from_setting=lambda label: _VAE_OF_LABEL.get(label, label), read=lambda label: _VAE_OF_LABEL.get(label, label),
        write=lambda o, im: VAE_DECODERS[o.vae] if o.vae != "full" else None,
        help="final decoder: full (the model's VAE) or taesd (its TAESD: drafts, low memory); the CLI also takes a "
        "VAE file or diffusers VAE folder (A1111's sd_vae: exported once into the cache)",
    )),
    "vae_file": (None, "path", VAE_FILE_OPTION),  # A1111's sd_vae: another VAE in the model's (vae_swap.py)
    "live_preview_content": ("Combined", "str", dict(
        choices=PREVIEW_CONTENTS, group="output", cli=False, setting="live_preview_content",
        help="the callback's x0: Combined (guided), Prompt, Negative prompt",
    )),
    "deepcache_interval": (0, "int", dict(
        low=0, high=1000, setting="deepcache_interval", infotext="DeepCache interval",
        write=lambda o, im: o.deepcache_interval or None,
        help="DeepCache (Ma et al. 2024): a full UNet call every N, shallow ones between (0: off; sdrt export "
        "--deepcache)",
    )),
    "deepcache_branch": (None, "int", dict(
        low=0, high=64, setting="deepcache_branch", infotext="DeepCache branch",
        write=lambda o, im: o.deepcache_branch if o.deepcache_interval else None,
        help="the skip branch cached (default: the exported one)",
    )),
    "deepcache_start": (0.0, "float", dict(
        low=0, high=1, setting="deepcache_start", infotext="DeepCache start",
        write=lambda o, im: infotext_number(o.deepcache_start or None),
        help="fraction of the UNet calls run in full before caching starts",
    )),
}  # fmt: skip


def check_speed_options(o: dict, manifest, in_range) -> None:
    """Validate the options of SPEED_OPTIONS in the option dict O (in_range: options.resolve's range check)."""
    for name in ("s_min_uncond", "skip_early_cond", "vae", "live_preview_content"):
        o[name] = in_range(name, o[name])
    if not isinstance(o["s_min_uncond_all"], bool):
        raise InvalidOption("s_min_uncond_all", o["s_min_uncond_all"], "True or False")
    if o["vae"] == "taesd" and not has_taesd(manifest):
        raise InvalidOption("vae", "taesd", f"full: {manifest.folder} has no TAESD decoder (sdrt export ... --taesd)")
    check_vae_file(o, manifest)
    deepcache.check_options(o, manifest, has_loras=bool(parse_prompt(o["prompt"])[1]))
