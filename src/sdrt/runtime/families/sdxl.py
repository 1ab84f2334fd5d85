"""The SDXL family at run time: its options, micro-conditioning (time ids), pooled embeddings and the refiner handoff.

Podell et al. 2023 ("SDXL"), sec. 2.2: the UNet also takes the pooled text embedding of the second text encoder
and, through Fourier features, the image's original size, its crop's top-left corner and the target size (the
refiner: original size, crop and an aesthetic score, sec. 2.5). diffusers' StableDiffusionXL*Pipeline names
are kept: sizes are (height, width), crops (top, left).
"""

import math
from dataclasses import dataclass

import numpy as np

from sdrt.errors import InvalidOption, ModelError, is_int, is_number
from sdrt.runtime.a1111_schedules import AYS_SIGMAS_SDXL
from sdrt.runtime.families.base import Family
from sdrt.runtime.previews import SDXL_PREVIEW_RGB

SIZE_OPTIONS = ("original_size", "target_size", "negative_original_size", "negative_target_size")
CROP_OPTIONS = ("crops_coords_top_left", "negative_crops_coords_top_left")
AESTHETIC_OPTIONS = ("aesthetic_score", "negative_aesthetic_score")
PROMPT_OPTIONS = ("prompt_2", "negative_prompt_2")
REFINER_OPTIONS = ("refiner", "refiner_switch_at")
# Options only SDXL models take; None (the default) means "not given".
SDXL_OPTIONS = PROMPT_OPTIONS + SIZE_OPTIONS + CROP_OPTIONS + AESTHETIC_OPTIONS + REFINER_OPTIONS
# The refiner's aesthetic scores (diffusers' and A1111's defaults): what the positive and negative halves ask for.
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5
MAX_AESTHETIC_SCORE = 10.0  # LAION aesthetic predictor scores lie in [0, 10]
MAX_MICRO_SIZE = 16384  # pixels: any size the model could have been trained on, and far beyond
REFINER_SWITCH_AT = 0.8  # A1111's default "Switch at"; diffusers' examples hand over at denoising_end=0.8


@dataclass(frozen=True)
class SdxlOptions:
    """SDXL's own generation options, validated. Sizes (height, width) and crops (top, left) in pixels."""

    prompt_2: str | None = None  # the second text encoder's prompt; None: the prompt
    negative_prompt_2: str | None = None
    original_size: tuple[int, int] | None = None  # None: the generated size
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None  # None: the generated size
    negative_original_size: tuple[int, int] | None = None  # None: original_size
    negative_crops_coords_top_left: tuple[int, int] | None = None  # None: crops_coords_top_left
    negative_target_size: tuple[int, int] | None = None  # None: target_size
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE
    refiner: object = None  # a refiner model folder (or a loaded Pipeline); None: no second stage
    refiner_switch_at: float | None = None  # fraction of the noise schedule where the refiner takes over

    def time_ids(self, width: int, height: int, refiner: bool) -> tuple[np.ndarray, np.ndarray]:
        """(cond (1, N), uncond (1, N)) float32 micro-conditioning: N = 6 for the base, 5 for the refiner."""
        original = self.original_size or (height, width)
        target = self.target_size or (height, width)
        crop = self.crops_coords_top_left
        negative_original = self.negative_original_size or original
        negative_crop = self.negative_crops_coords_top_left or crop
        negative_target = self.negative_target_size or target
        if refiner:
            cond = [*original, *crop, self.aesthetic_score]
            uncond = [*negative_original, *negative_crop, self.negative_aesthetic_score]
        else:
            cond = [*original, *crop, *target]
            uncond = [*negative_original, *negative_crop, *negative_target]
        return np.array([cond], dtype=np.float32), np.array([uncond], dtype=np.float32)


def _pair(field: str, value, low: int, high: int) -> tuple[int, int]:
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(is_int(v) and low <= v <= high for v in value)
    if not ok:
        raise InvalidOption(field, value, f"two integers from {low} to {high}")
    return int(value[0]), int(value[1])


def make_sdxl_options(manifest, raw: dict) -> SdxlOptions | None:
    """Validate SDXL's options against an SDXL model: InvalidOption for refiner options on a refiner and base-only
    options on a refiner. (Options of SDXL on another family's model: Family.refuse_options.)"""
    given = {k: v for k, v in raw.items() if v is not None}
    is_refiner = manifest.requires_aesthetics_score
    staged = given.get("refiner") is not None
    for field in PROMPT_OPTIONS:
        if field in given and not isinstance(given[field], str):
            raise InvalidOption(field, given[field], "a string, or None (the first prompt's)")
    for field in SIZE_OPTIONS:
        if field in given:
            given[field] = _pair(field, given[field], 1, MAX_MICRO_SIZE)
    for field in CROP_OPTIONS:
        if field in given:
            given[field] = _pair(field, given[field], 0, MAX_MICRO_SIZE)
    for field in AESTHETIC_OPTIONS:
        if field not in given:
            continue
        value = given[field]
        number = is_number(value)
        if not number or math.isnan(value) or not 0 <= value <= MAX_AESTHETIC_SCORE:
            raise InvalidOption(field, value, f"a number from 0 to {MAX_AESTHETIC_SCORE:g}")
        if not (is_refiner or staged):
            raise InvalidOption(field, value, "None: aesthetic scores condition SDXL refiners; this model is a base")
        given[field] = float(value)
    if is_refiner:
        for field in ("target_size", "negative_target_size", *REFINER_OPTIONS):
            if field in given:
                raise InvalidOption(
                    field, given[field], "None: this model is an SDXL refiner (its UNet takes no target size)"
                )
    if "refiner_switch_at" in given:
        value = given["refiner_switch_at"]
        number = is_number(value)
        if not number or math.isnan(value) or not 0 < value < 1:
            raise InvalidOption("refiner_switch_at", value, "a number strictly between 0 and 1")
        if not staged:
            raise InvalidOption("refiner_switch_at", value, "None without a refiner")
        given["refiner_switch_at"] = float(value)
    elif staged:
        given["refiner_switch_at"] = REFINER_SWITCH_AT
    return SdxlOptions(**given)


def pooled_feeds(pooled_halves: list[np.ndarray], ids_halves: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The SDXL UNet's added inputs for one image, uncond first: text_embeds (2 or 1, P), time_ids (2 or 1, N)."""
    return {
        "text_embeds": np.concatenate(pooled_halves).astype(np.float32),
        "time_ids": np.concatenate(ids_halves).astype(np.float32),
    }


def switch_index(timesteps: np.ndarray, switch_at: float, num_train_timesteps: int) -> int:
    """Steps the base runs before the refiner: those whose timestep is at or above round(N (1 - switch_at)).

    diffusers' denoising_end / denoising_start (StableDiffusionXLPipeline and Img2ImgPipeline): the base keeps the
    timesteps >= the cutoff, the refiner the ones below it, so the two stages share the schedule's sigma there.
    """
    cutoff = int(round(num_train_timesteps - switch_at * num_train_timesteps))
    return int(np.sum(np.asarray(timesteps) >= cutoff))


def check_refiner(base, refiner) -> None:
    """A refiner must denoise the base's latents: same latent space (channels, VAE scaling, downsampling) and the
    same training noise schedule; ModelError naming the first field that differs."""
    same = refiner.family == SDXL.name
    if not same or not refiner.requires_aesthetics_score:
        kind = "an SDXL base" if same else f"an {refiner.family} model"
        raise ModelError(f"refiner {str(refiner.folder)!r} is {kind}, not an SDXL refiner (aesthetic-score UNet)")
    fields = ("latent_channels", "vae_scaling_factor", "vae_shift_factor", "latent_downsample", "prediction_type")
    for field in fields:
        if getattr(base, field) != getattr(refiner, field):
            raise ModelError(
                f"refiner {str(refiner.folder)!r} does not match the base: {field} is {getattr(refiner, field)!r}, "
                f"the base's is {getattr(base, field)!r} (its VAE or latent space differs)"
            )
    for field in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas"):
        if getattr(base.scheduler, field) != getattr(refiner.scheduler, field):
            raise ModelError(
                f"refiner {str(refiner.folder)!r} does not match the base: scheduler {field} is "
                f"{getattr(refiner.scheduler, field)!r}, the base's is {getattr(base.scheduler, field)!r}"
            )


def split_schedule(schedule, switch_at: float, num_train_timesteps: int):
    """(base part, refiner part) of SCHEDULE at switch_index: the base ends at the sigma the refiner starts from."""
    from sdrt.runtime.schedules import Schedule

    k = switch_index(schedule.timesteps, switch_at, num_train_timesteps)
    base = Schedule(schedule.sigmas[: k + 1], schedule.timesteps[:k], schedule.initial_noise_scale)
    rest = Schedule(schedule.sigmas[k:], schedule.timesteps[k:], schedule.initial_noise_scale)
    return base, rest


def refiner_infotext(refiner, switch_at: float) -> dict:
    """A1111's infotext fields of a refiner run: "Refiner: name [short hash]", "Refiner switch at"."""
    name = refiner.model_name + (f" [{refiner.model_hash}]" if refiner.model_hash else "")
    return {"Refiner": name, "Refiner switch at": f"{switch_at:g}"}


# diffusers' and A1111's SDXL conditioning: each encoder's penultimate hidden states, without the final layer norm
# (hidden_states[-2]; A1111's clip skip counts back from there).
SDXL_LAYER = ("raw", -2)


def sdxl_conditioner(manifest, engines, embeddings):
    """The Conditioner over an SDXL model's text encoders (the refiner has only the second), pooling from the
    second (OpenCLIP bigG, through its projection)."""
    from sdrt.runtime.conditioning import Conditioner, TextEncoder
    from sdrt.runtime.manifest import TEXT_ENCODER_NAMES
    from sdrt.runtime.tokenizer import ClipTokenizer

    encoders, pooled_from = [], None
    for name in TEXT_ENCODER_NAMES:
        if name not in manifest.models:
            continue
        tokenizer = ClipTokenizer.from_dir(manifest.folder / name.replace("text_encoder", "tokenizer"))
        if name == "text_encoder_2":
            pooled_from = len(encoders)
        encoders.append(TextEncoder(engines[name], manifest, name, tokenizer, layer=SDXL_LAYER))
    if pooled_from is None:
        raise ModelError(f"{manifest.folder} is an SDXL model without text_encoder_2: re-export it with this sdrt")
    return Conditioner(encoders, embeddings, pooled_from=pooled_from)


def second_texts(opts, index: int, count: int) -> list[str] | None:
    """The second encoder's texts for prompt INDEX (0: the prompt, 1: the negative prompt), COUNT of them: prompt_2
    or negative_prompt_2 when given (the same text at every step of a prompt-editing schedule), else None."""
    sdxl = opts.family_options
    text = sdxl.prompt_2 if index == 0 else sdxl.negative_prompt_2
    return None if text is None else [text] * count


def zeroes_negative(manifest, opts) -> bool:
    """SDXL base models give an empty negative prompt zero embeddings, pooled too (diffusers'
    force_zeros_for_empty_prompt, A1111's force_zero_negative_prompt)."""
    negative_2 = opts.family_options.negative_prompt_2
    return bool(manifest.force_zeros_for_empty_prompt and opts.negative_prompt == "" and not negative_2)


def added_feeds(manifest, opts, pooled_cond: np.ndarray, pooled_uncond: np.ndarray | None) -> dict[str, np.ndarray]:
    """SDXL's added UNet inputs for one image, uncond first: text_embeds (2 or 1, P) and time_ids (2 or 1, N)."""
    ids_cond, ids_uncond = opts.family_options.time_ids(opts.width, opts.height, manifest.requires_aesthetics_score)
    if pooled_uncond is None:
        return pooled_feeds([pooled_cond], [ids_cond])
    return pooled_feeds([pooled_uncond, pooled_cond], [ids_uncond, ids_cond])


class SDXL(Family):
    """SDXL base and refiner (Podell et al. 2023): two text encoders (the refiner: the second only), pooled text and
    micro-conditioning added to the UNet, 1024 px, and the refiner as a second stage."""

    name, title = "sdxl", "SDXL"
    option_group, option_names = "sdxl", SDXL_OPTIONS
    lora_bases = ("sdxl",)
    align_your_steps = AYS_SIGMAS_SDXL  # NVIDIA's SDXL table
    fp32_models = ("vae_decoder", "vae_encoder")  # the SDXL VAE overflows in fp16 (NaNs, black images)
    preview_rgb = SDXL_PREVIEW_RGB  # A1111's Approx cheap coefficients for SDXL latents

    def conditioner(self, manifest, engines, embeddings):
        return sdxl_conditioner(manifest, engines, embeddings)

    def resolve_options(self, manifest, given: dict) -> SdxlOptions:
        return make_sdxl_options(manifest, given)

    def second_texts(self, opts, index: int, count: int) -> list[str] | None:
        return second_texts(opts, index, count)

    def zeroes_negative(self, manifest, opts) -> bool:
        return zeroes_negative(manifest, opts)

    def added_feeds(self, manifest, opts, pooled_cond, pooled_uncond) -> dict[str, np.ndarray]:
        return added_feeds(manifest, opts, pooled_cond, pooled_uncond)

    def second_stage(self, opts):
        sdxl = opts.family_options
        return None if sdxl is None or sdxl.refiner is None else (sdxl.refiner, sdxl.refiner_switch_at)

    def check_second_stage(self, base, second) -> None:
        check_refiner(base, second)

    def split_schedule(self, schedule, switch_at: float, manifest):
        return split_schedule(schedule, switch_at, manifest.scheduler.num_train_timesteps)

    def second_stage_infotext(self, second_manifest, switch_at: float) -> dict:
        return refiner_infotext(second_manifest, switch_at)


FAMILIES = (SDXL(),)
