"""The A1111 settings of the options that make an image cheaper (runtime/speed_options.py; docs/guide/speed.md):
their defaults in /sdapi/v1/options, their checks (POST /options, override_settings), and the A1111 DeepCache
extension's own setting names (sd-webui-deepcache-standalone) mapped onto sdrt's."""

from sdrt.errors import InvalidOption
from sdrt.runtime.previews import PREVIEW_CONTENTS, PREVIEW_METHODS, VAE_DECODERS

# setting -> A1111's default (the DeepCache ones: sdrt's names, then the extension's)
SPEED_SETTINGS = {
    "show_progress_type": "Approx NN",
    "live_preview_content": "Prompt",
    "sd_vae_decode_method": "Full",
    "s_min_uncond": 0.0,
    "s_min_uncond_all": False,
    "skip_early_cond": 0.0,
    "deepcache_interval": 0,
    "deepcache_branch": None,
    "deepcache_start": 0.0,
    "deepcache_enable_pass": "disable",
    "deepcache_full_run_step_rate": 5,
    "deepcache_cache_enable_step_percentage": 0.4,
}
SETTING_LABELS = {"sd_vae_decode_method": VAE_DECODERS}  # setting -> {option value: the setting's label}
CHOICES = {
    "show_progress_type": PREVIEW_METHODS,
    "live_preview_content": PREVIEW_CONTENTS,
    "sd_vae_decode_method": tuple(VAE_DECODERS.values()),
    "deepcache_enable_pass": ("disable", "both passes"),
}
NUMBERS = {  # setting -> (low, high, integers only)
    "s_min_uncond": (0.0, 1000.0, False),
    "skip_early_cond": (0.0, 1.0, False),
    "deepcache_interval": (0, 1000, True),
    "deepcache_branch": (0, 64, True),
    "deepcache_start": (0.0, 1.0, False),
    "deepcache_full_run_step_rate": (0, 1000, True),
    "deepcache_cache_enable_step_percentage": (0.0, 1.0, False),
}


def check_speed_setting(field: str, key: str, value):
    """One of SPEED_SETTINGS' values, validated (InvalidOption naming FIELD)."""
    if key in CHOICES:
        if value not in CHOICES[key]:
            raise InvalidOption(field, value, ", ".join(CHOICES[key]))
        return value
    if key == "s_min_uncond_all":
        if not isinstance(value, bool):
            raise InvalidOption(field, value, "true or false")
        return value
    if key == "deepcache_branch" and value is None:
        return value
    low, high, integer = NUMBERS[key]
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        raise InvalidOption(field, value, f"{'an integer' if integer else 'a number'} from {low} to {high}")
    return value


def apply_extension_names(settings: dict) -> None:
    """The A1111 DeepCache extension's "both passes" turns DeepCache on: a full UNet call every
    deepcache_full_run_step_rate, after deepcache_cache_enable_step_percentage of them (unless sdrt's own
    deepcache_interval is set)."""
    if settings["deepcache_enable_pass"] == "both passes" and not settings["deepcache_interval"]:
        settings["deepcache_interval"] = settings["deepcache_full_run_step_rate"]
        settings["deepcache_start"] = settings["deepcache_cache_enable_step_percentage"]
