"""Skipping the unconditional half of classifier-free guidance where A1111 skips it (its CFGDenoiser, 1.10).

Two settings, one rule per denoiser call (counted from 0, as A1111's CFGDenoiser.step):
- skip_early_cond ("Skip Early CFG", A1111 1.10): skip while call / total_calls <= skip_early_cond (0: never);
  total_calls is A1111's SamplerData.total_steps: the steps run, doubled for its "second_order" samplers.
- s_min_uncond ("NGMS", negative guidance minimum sigma): otherwise skip on odd calls (every call with
  s_min_uncond_all, "NGMS all steps") whose noise level is below s_min_uncond. The level is the call's sigma for
  A1111's k-diffusion samplers, and the UNet timestep for its timestep samplers (DDIM, PLMS, UniPC), which pass
  the timestep where k-diffusion passes sigma.
A skipped call runs the UNet on the conditional half only, and its output is the conditional prediction (A1111
puts the conditional result in the unconditional slot and combines with scale 1).
"""

from dataclasses import dataclass

# A1111's samplers with the "second_order" option (two model calls a step in its step count).
SECOND_ORDER_SAMPLERS = ("Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE")
# A1111's timestep samplers (sd_samplers_timesteps.py): their denoiser's "sigma" is the UNet timestep.
TIMESTEP_SAMPLERS = ("DDIM", "PLMS", "UniPC")


@dataclass(frozen=True)
class UncondSkip:
    """Which denoiser calls skip the unconditional UNet half (A1111's rule; see the module's docstring)."""

    total_calls: int
    skip_early_cond: float = 0.0
    s_min_uncond: float = 0.0
    all_steps: bool = False
    by_timestep: bool = False

    def __call__(self, call: int, sigma: float, timestep: float) -> bool:
        if self.skip_early_cond != 0 and call / self.total_calls <= self.skip_early_cond:
            return True
        level = timestep if self.by_timestep else sigma
        return bool((call % 2 or self.all_steps) and self.s_min_uncond > 0 and level < self.s_min_uncond)


def uncond_skip(opts) -> UncondSkip | None:
    """The rule for a run's options, or None when neither setting is on (or no guidance runs)."""
    if not opts.guided or (opts.skip_early_cond == 0 and opts.s_min_uncond <= 0):
        return None
    calls = opts.steps_run * (2 if opts.sampler in SECOND_ORDER_SAMPLERS else 1)
    return UncondSkip(
        total_calls=max(calls, 1),
        skip_early_cond=opts.skip_early_cond,
        s_min_uncond=opts.s_min_uncond,
        all_steps=opts.s_min_uncond_all,
        by_timestep=opts.sampler in TIMESTEP_SAMPLERS,
    )
