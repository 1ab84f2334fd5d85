"""DeepCache at run time (Ma, Fang and Wang, CVPR 2024): the UNet's deep feature is computed by a full call and
reused by the shallow calls that follow (the paper's uniform 1:N strategy), through the two graphs export/deepcache.py
writes. Opt-in (deepcache_interval > 1); the plain UNet runs otherwise, so images without it do not change.

Calls are the denoiser's (a second-order sampler makes two a step, as ComfyUI's DeepCache node counts them): call c
is full when c < start (the first deepcache_start of the run's calls, A1111's DeepCache extension's "enabled after the
step percentage") or (c - start) % interval == 0, and whenever the cached feature cannot serve the call's batch.
"""

import numpy as np

from sdrt.errors import InvalidOption
from sdrt.runtime.deepcache_memory import use_denoiser
from sdrt.runtime.guidance_skip import SECOND_ORDER_SAMPLERS

DEEPCACHE_FULL = "unet_deepcache"
DEEPCACHE_SHALLOW = "unet_shallow"
DEEP_FEATURE = "deep_feature"


def exported_branch(manifest) -> int | None:
    """The skip branch the folder's DeepCache graphs were exported at, or None without them."""
    if DEEPCACHE_FULL not in manifest.models or DEEPCACHE_SHALLOW not in manifest.models:
        return None
    return int(manifest.models[DEEPCACHE_FULL]["deepcache_branch"])


def takes_loras(manifest) -> bool:
    """Whether the folder's DeepCache graphs have the weight maps LoRA merging needs (deepcache_lora.py)."""
    return all(manifest.models.get(g, {}).get("weight_map") for g in (DEEPCACHE_FULL, DEEPCACHE_SHALLOW))


def check_options(o: dict, manifest, has_loras: bool) -> None:
    """Options.resolve's DeepCache checks on the option dict O (deepcache_branch filled in from the export);
    HAS_LORAS: the prompt names LoRAs."""
    from sdrt.errors import check_int, check_number

    o["deepcache_interval"] = check_int("deepcache_interval", o["deepcache_interval"], 0, 1000)
    o["deepcache_start"] = check_number("deepcache_start", o["deepcache_start"], 0, 1)
    if o["deepcache_interval"] <= 1:
        o["deepcache_interval"], o["deepcache_branch"], o["deepcache_start"] = 0, None, 0.0
        return
    branch = exported_branch(manifest)
    if branch is None:
        allowed = f"0 or 1 (off): {manifest.folder} has no DeepCache graphs (sdrt export ... --deepcache BRANCH)"
        raise InvalidOption("deepcache_interval", o["deepcache_interval"], allowed)
    if o["deepcache_branch"] is None:
        o["deepcache_branch"] = branch
    elif o["deepcache_branch"] != branch:
        allowed = f"{branch} (the branch {manifest.folder} was exported at)"
        raise InvalidOption("deepcache_branch", o["deepcache_branch"], allowed)
    if o["controlnets"]:
        allowed = ("0 (off) with ControlNet units: the cached deep feature would carry the residuals of an earlier "
                   "step (as in A1111's DeepCache extension, which does not take ControlNet either)")  # fmt: skip
        raise InvalidOption("deepcache_interval", o["deepcache_interval"], allowed)
    if has_loras and not takes_loras(manifest):
        allowed = (f"0 (off) with LoRAs in the prompt: {manifest.folder}'s DeepCache graphs have no weight maps; "
                   "export them again with this sdrt (sdrt export SOURCE -o DIR --deepcache BRANCH)")  # fmt: skip
        raise InvalidOption("deepcache_interval", o["deepcache_interval"], allowed)


class DeepCacheUnet:
    """The UNet engine's run(feeds) seam, alternating the full graph (which refreshes the deep feature) and the
    shallow one (which reuses it)."""

    def __init__(self, full, shallow, interval: int, start_call: int, shallow_inputs=None):
        self.full, self.shallow = full, shallow
        self.shallow_inputs = shallow_inputs  # the shallow graph's input names (no text when it has no attention)
        self.interval, self.start_call = interval, start_call
        self.calls, self.full_calls = 0, 0
        self.feature = None  # (B', C', h', w') float32 from the last full call

    def run(self, feeds: dict) -> dict:
        call, self.calls = self.calls, self.calls + 1
        batch = len(feeds["sample"])
        feature = self.usable_feature(batch)
        if feature is None or call < self.start_call or (call - self.start_call) % self.interval == 0:
            out = self.full.run(feeds)
            self.feature, self.full_calls = out[DEEP_FEATURE], self.full_calls + 1
            return {"out_sample": out["out_sample"]}
        feeds = {**feeds, DEEP_FEATURE: feature}
        if self.shallow_inputs is not None:
            feeds = {name: value for name, value in feeds.items() if name in self.shallow_inputs}
        return self.shallow.run(feeds)

    def usable_feature(self, batch: int) -> np.ndarray | None:
        """The cached feature for a call of BATCH rows: as cached, or its conditional half (a call whose
        unconditional half is skipped, guidance_skip.py); None when it cannot serve the call."""
        if self.feature is None:
            return None
        if len(self.feature) == batch:
            return self.feature
        if len(self.feature) == 2 * batch:
            return np.ascontiguousarray(self.feature[batch:])
        return None


def denoiser_engine(model, opts):
    """MODEL's (generation.Model) denoiser engine for a run with OPTS: a DeepCacheUnet when DeepCache is on (and
    MODEL has its graphs: an SDXL refiner without them runs its plain UNet), else the plain engine."""
    if exported_branch(model.manifest) is None:
        return model.denoiser_engine
    on = bool(getattr(opts, "deepcache_interval", 0))
    kinds = {"plain": (model.family.denoiser_model,), "deepcache": (DEEPCACHE_FULL, DEEPCACHE_SHALLOW)}
    use_denoiser(model, "deepcache" if on else "plain", kinds)  # the other kind unloaded when both do not fit
    if not on:
        return model.denoiser_engine
    calls = opts.steps_run * (2 if opts.sampler in SECOND_ORDER_SAMPLERS else 1)
    start = int(opts.deepcache_start * calls)
    inputs = {t["name"] for t in model.manifest.models[DEEPCACHE_SHALLOW]["inputs"]}
    engines = model.engines
    return DeepCacheUnet(engines[DEEPCACHE_FULL], engines[DEEPCACHE_SHALLOW], opts.deepcache_interval, start, inputs)
