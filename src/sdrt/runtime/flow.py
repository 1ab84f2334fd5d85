"""Flow matching (rectified flow; Esser et al. 2024, SD 3; FLUX.1): schedules and the denoiser.

The forward process is x = (1 - sigma) x0 + sigma noise, sigma in [0, 1]; the transformer predicts the velocity
v = noise - x0, so the denoised estimate is x0 = x - sigma v and (x - x0) / sigma = v: every k-diffusion-style
sampler in samplers.py integrates dx/dsigma = (x - D(x, sigma)) / sigma unchanged (as Forge and ComfyUI run them).
Schedules reproduce diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps, dtypes included.
"""

import math
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.denoiser import TextConditioning
from sdrt.runtime.schedules import Schedule

NUM_TRAIN_TIMESTEPS = 1000
# Which sigmas a pipeline hands the scheduler before shifting: "timesteps" (StableDiffusion3Pipeline passes none:
# the scheduler spaces timesteps linearly from its shifted sigma_max to sigma_min) or "sigmas" (FluxPipeline
# passes linspace(1, 1 / steps, steps)).
SPACINGS = ("timesteps", "sigmas")


@dataclass(frozen=True)
class FlowConfig:
    """FlowMatchEulerDiscreteScheduler's keys that shape the schedule (absent ones: that class's defaults)."""

    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    @classmethod
    def from_dict(cls, d: dict) -> "FlowConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__ and v is not None})


def static_shift(sigmas, shift: float):
    """SD 3's timestep shift (Esser et al. 2024, eq. 23): sigma' = shift sigma / (1 + (shift - 1) sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def calculate_shift(image_seq_len: int, config: FlowConfig) -> float:
    """FLUX's mu: linear in the image token count from (base_image_seq_len, base_shift) to (max_image_seq_len,
    max_shift) (diffusers' calculate_shift)."""
    m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    b = config.base_shift - m * config.base_image_seq_len
    return image_seq_len * m + b


def time_shift(mu: float, sigmas):
    """FLUX's resolution-dependent shift: e^mu / (e^mu + (1 / sigma - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)


def flow_sigmas(steps: int, config: FlowConfig, spacing: str, image_seq_len: int) -> np.ndarray:
    """(steps + 1,) float32 sigmas from 1 down to 0, as FlowMatchEulerDiscreteScheduler.set_timesteps makes them
    for StableDiffusion3Pipeline (SPACING "timesteps") or FluxPipeline ("sigmas"); IMAGE_SEQ_LEN (transformer image
    tokens) sets the shift when the config shifts dynamically."""
    n = config.num_train_timesteps
    if spacing == "timesteps":
        # The scheduler's own sigma range: its training sigmas, shifted unless the shift is dynamic (float32).
        train = (np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)).astype(np.float32)
        if not config.use_dynamic_shifting:
            train = static_shift(train, np.float32(config.shift)).astype(np.float32)
        sigma_max, sigma_min = float(train[0]), float(train[-1])
        sigmas = np.linspace(sigma_max * n, sigma_min * n, steps) / n  # float64, as diffusers' numpy path
    elif spacing == "sigmas":
        sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    else:
        raise ValueError(f"spacing {spacing!r}: expected one of {SPACINGS}")
    if config.use_dynamic_shifting:
        sigmas = time_shift(calculate_shift(image_seq_len, config), sigmas)
    else:
        sigmas = static_shift(sigmas, config.shift)
    return np.append(np.asarray(sigmas, dtype=np.float32), np.float32(0.0))


def flow_schedule(steps: int, config: FlowConfig, spacing: str, image_seq_len: int) -> Schedule:
    """The Schedule of a flow model: sigmas, the transformer's timesteps (sigma x 1000 in float32, as diffusers), and
    pure noise as the start (x = noise at sigma 1)."""
    sigmas = flow_sigmas(steps, config, spacing, image_seq_len)
    timesteps = (sigmas[:-1] * np.float32(config.num_train_timesteps)).astype(np.float32)
    return Schedule(sigmas, timesteps, 1.0)


def noised(x0: np.ndarray, noise: np.ndarray, sigma: float) -> np.ndarray:
    """The forward process at SIGMA (diffusers' scale_noise): (1 - sigma) x0 + sigma noise, float32."""
    s = np.float32(sigma)
    return (s * noise + (np.float32(1.0) - s) * x0).astype(np.float32)


class FlowDenoiser:
    """D(x, sigma) = x - sigma v from a flow transformer, with classifier-free guidance when TEXT is guided.

    MODEL(x, t, feeds) -> v: x (N, C, h, w) float32 latents, t the transformer timestep (sigma x 1000, float32),
    feeds the text inputs of the call; it packs and adds the family's own inputs (flow_models.py). Calls are
    counted, as Denoiser counts them, for prompt schedules.
    """

    def __init__(self, model, text: TextConditioning, cfg_scale: float, timesteps: dict[float, float], skip=None):
        self.model = model
        self.text = text
        self.guided = text.guided
        self.cfg_scale = np.float32(cfg_scale)
        self.timesteps = timesteps  # the schedule's exact transformer timesteps per sigma, in step order
        self.skip = skip  # skip-layer guidance (flow_options.SlgOptions; SD 3.5), or None
        self.calls = 0
        self.halves = None  # (x, sigma, uncond v, cond v) of the last guided call, for live previews' halves

    def timestep(self, sigma) -> np.float32:
        t = self.timesteps.get(float(sigma))
        return np.float32(sigma) * np.float32(NUM_TRAIN_TIMESTEPS) if t is None else np.float32(t)

    def __call__(self, x: np.ndarray, sigma, intermediate: bool = False) -> np.ndarray:
        sigma = np.float32(sigma)
        x_in = np.concatenate([x, x]) if self.guided else x  # (2B or B, C, h, w) float32
        v = self.model(x_in, self.timestep(sigma), self.text.at(self.calls))
        self.calls += 1
        if self.guided:  # diffusers: uncond + scale (cond - uncond), uncond half first
            uncond, cond = np.split(v, 2)
            self.halves = (x, sigma, uncond, cond)
            v = uncond + self.cfg_scale * (cond - uncond)
            if self.skip is not None and self.skip.active(self.step_of(sigma), len(self.timesteps)):
                v = v + (cond - self.skipped(x, sigma)) * np.float32(self.skip.scale)
        return (x - sigma * v).astype(np.float32)

    def step_of(self, sigma) -> int:
        """The schedule step whose sigma SIGMA is (a sigma between two steps counts as the later one)."""
        return sum(1 for s in self.timesteps if s > float(sigma) * (1 + 1e-6))

    def skipped(self, x: np.ndarray, sigma) -> np.ndarray:
        """Skip-layer guidance's extra call (StableDiffusion3Pipeline): the conditional half alone, through the
        transformer with the chosen blocks passed by -> v (B, C, h, w)."""
        cond = {name: np.split(a, 2)[1] for name, a in self.text.at(self.calls - 1).items()}
        return self.model(x, self.timestep(sigma), cond, skip=self.skip.skip_guidance_layers)

    def half_x0(self, content: str) -> np.ndarray | None:
        """The last call's x0 from its "Prompt" (conditional) or "Negative prompt" half (A1111's
        live_preview_content); None without both halves."""
        if self.halves is None:
            return None
        x, sigma, uncond, cond = self.halves
        return (x - sigma * (cond if content == "Prompt" else uncond)).astype(np.float32)
