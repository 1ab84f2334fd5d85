"""The UNet engine as a denoiser D(x, sigma), with classifier-free guidance and eps / v parameterisation."""

from dataclasses import dataclass

import numpy as np

from sdrt.runtime.schedules import sigma_to_t


@dataclass(frozen=True)
class TextConditioning:
    """The UNet's text inputs per denoiser call (A1111's ScheduledPromptConditioning): entry i serves the calls
    numbered <= ends[i] (0-based), the last entry every later call. With guidance each array holds the uncond
    half first: {"encoder_hidden_states": (2B or B, L, C) float32, ...} (SDXL adds its pooled inputs)."""

    ends: tuple[int, ...]
    feeds: tuple[dict, ...]
    guided: bool

    @classmethod
    def fixed(cls, feeds: dict, guided: bool) -> "TextConditioning":
        return cls((0,), (feeds,), guided)

    def repeat(self, batch: int) -> "TextConditioning":
        """The same conditioning for BATCH images: each half repeated, the uncond block first."""

        def each(a: np.ndarray) -> np.ndarray:
            halves = np.split(a, 2) if self.guided else [a]
            return np.concatenate([np.repeat(h, batch, axis=0) for h in halves])

        feeds = tuple({name: each(a) for name, a in f.items()} for f in self.feeds)
        return TextConditioning(self.ends, feeds, self.guided)

    def at(self, call: int) -> dict:
        for end, feeds in zip(self.ends, self.feeds, strict=True):
            if call <= end:
                return feeds
        return self.feeds[-1]


class Denoiser:
    """D(x, sigma) = x0 estimate from the UNet (k-diffusion's CompVisDenoiser / CompVisVDenoiser).

    TEXT gives the text embeddings of each call; with guidance, both halves go through the UNet in one call of
    batch 2B (uncond first, as diffusers orders them). Calls are counted, as A1111's CFGDenoiser counts its
    steps, so prompt editing switches at the same UNet call as in A1111 (second-order samplers call twice a step).
    """

    def __init__(
        self,
        unet,
        prediction_type: str,
        train_sigmas: np.ndarray,
        timesteps: dict[float, float],
        text: TextConditioning,
        cfg_scale: float,
        guidance_rescale: float = 0.0,
        conditioning: np.ndarray | None = None,
        control=None,
        skip_uncond=None,
    ):
        self.unet = unet
        self.prediction_type = prediction_type
        self.log_sigmas = np.log(train_sigmas.astype(np.float64))
        self.timesteps = timesteps  # exact UNet timesteps for the schedule's sigmas
        self.cfg_scale = np.float32(cfg_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.text = text
        self.guided = text.guided
        self.calls = 0
        # Inpainting UNets: (B, 1 + C, h, w) mask and masked-image latents appended to the scaled input's channels
        # (StableDiffusionInpaintPipeline), the same for both guidance halves.
        if conditioning is not None and self.guided:
            conditioning = np.concatenate([conditioning, conditioning])
        self.conditioning = conditioning  # (2B or B, 1 + C, h, w) float32 or None
        self.control = control  # controlnet.ControlHook or None: ControlNet residuals for the UNet
        self.skip_uncond = skip_uncond  # guidance_skip.UncondSkip or None: calls that run the conditional half only
        self.halves = None  # (x, sigma, c_in, uncond out, cond out) of the last guided call, for previews

    def timestep(self, sigma: float, intermediate: bool = False) -> float:
        """The schedule's own timestep for one of its sigmas; sigma_to_t for any other sigma, and for an intermediate
        point of a multi-stage step even where it equals a schedule sigma (as diffusers' KDPM2*/DPMSolverSDE do)."""
        t = None if intermediate else self.timesteps.get(float(sigma))
        return float(sigma_to_t(sigma, self.log_sigmas)[0]) if t is None else t

    def __call__(self, x: np.ndarray, sigma, intermediate: bool = False) -> np.ndarray:
        sigma = np.float32(sigma)
        c_in = np.float32(1.0) / np.sqrt(sigma * sigma + np.float32(1.0))
        timestep = self.timestep(sigma, intermediate)
        text, conditioning, guided = self.text.at(self.calls), self.conditioning, self.guided
        if guided and self.skip_uncond is not None and self.skip_uncond(self.calls, float(sigma), timestep):
            guided = False  # A1111's NGMS / Skip Early CFG: the conditional half alone, unguided
            text = {name: np.split(a, 2)[1] for name, a in text.items()}
            conditioning = None if conditioning is None else np.split(conditioning, 2)[1]
        x_in = np.concatenate([x, x]) if guided else x  # (2B or B, C, h, w) float32
        t = np.full(len(x_in), timestep, dtype=np.float32)
        sample = (x_in * c_in).astype(np.float32)
        unet, residuals = self.unet, None
        if self.control is not None:  # the ControlNets see the latents without an inpainting UNet's extra channels
            residuals = self.control(sample, t, text, sigma, guided)
        if conditioning is not None:
            sample = np.concatenate([sample, conditioning], axis=1)  # (2B or B, C + 1 + C, h, w)
        feeds = {"sample": sample, "timestep": t, **text}
        if residuals is not None:
            feeds |= residuals
            unet = self.control.unet
        self.calls += 1
        out = unet.run(feeds)["out_sample"]  # (2B or B, C, h, w) float32
        self.halves = None
        if guided:
            uncond, cond = np.split(out, 2)
            self.halves = (x, sigma, c_in, uncond, cond)
            out = uncond + self.cfg_scale * (cond - uncond)
            if self.guidance_rescale:
                out = rescale_guidance(out, cond, self.guidance_rescale)
        return DENOISED[self.prediction_type](x, out, sigma, c_in)

    def half_x0(self, content: str) -> np.ndarray | None:
        """The last call's x0 from its "Prompt" (conditional) or "Negative prompt" half; None without both halves."""
        if self.halves is None:
            return None
        x, sigma, c_in, uncond, cond = self.halves
        return DENOISED[self.prediction_type](x, cond if content == "Prompt" else uncond, sigma, c_in)


def eps_denoised(x: np.ndarray, eps: np.ndarray, sigma, c_in) -> np.ndarray:
    """x0 = x - sigma eps (Karras et al. 2022, the VP/DDPM parameterisation in sigma form)."""
    return x - eps * sigma


def v_denoised(x: np.ndarray, v: np.ndarray, sigma, c_in) -> np.ndarray:
    """x0 = c_skip x + c_out v (Salimans & Ho 2022): c_skip = 1 / (sigma^2 + 1), c_out = -sigma c_in."""
    return x / (sigma * sigma + 1) - v * (sigma * c_in)


# The manifest's prediction_type -> the model output's x0 estimate: (x, output, sigma, c_in) -> (B, C, h, w).
DENOISED = {"epsilon": eps_denoised, "v_prediction": v_denoised}


def rescale_guidance(guided: np.ndarray, cond: np.ndarray, phi: float) -> np.ndarray:
    """Lin et al. 2023, eq. 15-16: scale the guided prediction to the conditional one's std, blended by PHI.

    guided, cond: (B, C, h, w) float32 model outputs (eps or v); the std is per image, unbiased as torch's.
    """
    axes = tuple(range(1, guided.ndim))
    ratio = cond.std(axis=axes, ddof=1, keepdims=True) / guided.std(axis=axes, ddof=1, keepdims=True)
    return (np.float32(phi) * ratio + np.float32(1 - phi)) * guided
