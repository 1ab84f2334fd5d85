"""A1111's negative-guidance skips (NGMS `s_min_uncond`, `skip_early_cond`) against A1111's rule written here.

The reference is an Euler loop over the tiny diffusers UNet (torch) that applies A1111 1.10's CFGDenoiser rule
(modules/sd_samplers_cfg_denoiser.py, re-stated below): sdrt's final latents must match it within the parity
tests' latent tolerance, and the same loop with the rule moved to the even calls must not (can-fail twin).
"""

import numpy as np
import pytest
from diffusers_reference import LATENT_RTOL

PROMPT, NEGATIVE = "a photo of a grey squirrel", "blue sky"
STEPS, CFG = 10, 6.0


def a1111_skips(call: int, total_calls: int, level: float, skip_early_cond: float, s_min_uncond: float,
                odd: int = 1) -> bool:  # fmt: skip
    """A1111 1.10: skip early while step / total_steps <= skip_early_cond (when set), else NGMS on odd steps whose
    sigma (timestep for DDIM/PLMS/UniPC) is below s_min_uncond. ODD=0 is the wrong twin: the even steps."""
    if skip_early_cond != 0.0 and call / total_calls <= skip_early_cond:
        return True
    return call % 2 == odd and s_min_uncond > 0 and level < s_min_uncond


def reference_euler(pipe, latents, rule):
    """Euler (EulerDiscreteScheduler) with CFG, skipping the unconditional half where RULE(call, sigma) says."""
    import torch
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
    x = torch.from_numpy(latents) * sched.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            model_in = sched.scale_model_input(x, t)
            if rule(i, float(sched.sigmas[i])):
                eps = pipe.unet(model_in, t, encoder_hidden_states=cond).sample
            else:
                out = pipe.unet(torch.cat([model_in] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                eps_uncond, eps_cond = out.chunk(2)
                eps = eps_uncond + CFG * (eps_cond - eps_uncond)
            x = sched.step(eps, t, x).prev_sample
    return x.numpy()


@pytest.fixture(scope="module")
def start_latents():
    return np.random.default_rng(9).standard_normal((1, 4, 8, 8)).astype(np.float32)


def sdrt_latents(pipeline, latents, **kw):
    return pipeline.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="Euler",
                             width=64, height=64, seed=1, latents=latents, output_type="latent", progress=False,
                             **kw)  # fmt: skip


@pytest.mark.parametrize(("skip_early_cond", "s_min_uncond"), [(0.0, 5.0), (0.25, 0.0), (0.25, 5.0)])
def test_skips_match_a1111_rule(tiny_sd, tiny_pipeline, start_latents, latent_atol, skip_early_cond, s_min_uncond):
    pipe, _ = tiny_sd
    got = sdrt_latents(tiny_pipeline, start_latents, skip_early_cond=skip_early_cond, s_min_uncond=s_min_uncond)
    want = reference_euler(
        pipe, start_latents, lambda i, sigma: a1111_skips(i, STEPS, sigma, skip_early_cond, s_min_uncond)
    )
    np.testing.assert_allclose(got, want, atol=latent_atol, rtol=LATENT_RTOL)
    # can-fail twins: NGMS on the even steps, and no skipping at all, are both far from sdrt's result
    wrong = reference_euler(pipe, start_latents, lambda i, sigma: a1111_skips(i, STEPS, sigma, skip_early_cond,
                                                                              s_min_uncond, odd=0))  # fmt: skip
    plain = sdrt_latents(tiny_pipeline, start_latents)
    tolerance = latent_atol + LATENT_RTOL * np.abs(want).max()
    for other in (wrong, plain) if s_min_uncond else (plain,):
        assert np.abs(got - other).max() > 5 * tolerance


class Recorder:
    """Wraps the UNet engine: the batch size and timestep of each call."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def run(self, feeds):
        self.calls.append((len(feeds["sample"]), float(feeds["timestep"][0])))
        return self.engine.run(feeds)

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.mark.parametrize(("sampler", "threshold", "by_timestep"), [("DDIM", 400.0, True), ("Heun", 2.0, False)])
def test_which_calls_skip(tiny_pipeline, sampler, threshold, by_timestep):
    """DDIM (A1111's timestep sampler) compares the UNet timestep; Heun counts two calls a step (A1111's
    second_order) for skip_early_cond and compares sigma."""
    engines = tiny_pipeline.engines
    recorder = Recorder(engines["unet"])
    engines["unet"] = recorder
    try:
        tiny_pipeline.generate(PROMPT, steps=6, cfg_scale=5.0, sampler=sampler, width=64, height=64, seed=3,
                               s_min_uncond=threshold, skip_early_cond=0.2, output_type="latent",
                               progress=False)  # fmt: skip
    finally:
        engines["unet"] = recorder.engine
    total = 6 * (2 if sampler == "Heun" else 1)
    log_sigmas = np.log(tiny_pipeline.model.train_sigmas.astype(np.float64))
    for call, (batch, t) in enumerate(recorder.calls):
        sigma = float(np.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas)))
        level = t if by_timestep else sigma
        assert (batch == 1) == a1111_skips(call, total, level, 0.2, threshold), (call, batch, t)
    assert 0 < sum(batch == 1 for batch, _ in recorder.calls) < len(recorder.calls)


def test_infotext_and_a1111_request(tiny_pipeline):
    from sdrt.runtime.infotext import generate_kwargs, parse_infotext

    image = tiny_pipeline.generate(PROMPT, steps=2, width=64, height=64, seed=1, s_min_uncond=1.5,
                                   s_min_uncond_all=True, skip_early_cond=0.3, progress=False)[0]  # fmt: skip
    text = image.info["parameters"]
    assert "NGMS: 1.5, NGMS all steps: True, Skip Early CFG: 0.3" in text
    kwargs = generate_kwargs(parse_infotext(text))
    assert (kwargs["s_min_uncond"], kwargs["s_min_uncond_all"], kwargs["skip_early_cond"]) == (1.5, True, 0.3)
    plain = tiny_pipeline.generate(PROMPT, steps=2, width=64, height=64, seed=1, progress=False)[0]
    assert "NGMS" not in plain.info["parameters"] and "Skip Early" not in plain.info["parameters"]


def test_a1111_fields_and_settings():
    from sdrt.errors import InvalidOption
    from sdrt.server import a1111

    options = dict(a1111.DEFAULT_OPTIONS, skip_early_cond=0.1, s_min_uncond=2.0)
    req = a1111.Txt2ImgRequest(prompt="x", s_min_uncond=4.0)
    kwargs = a1111.generate_kwargs(req, options)
    assert (kwargs["s_min_uncond"], kwargs["skip_early_cond"], kwargs["s_min_uncond_all"]) == (4.0, 0.1, False)
    assert a1111.generate_kwargs(a1111.Txt2ImgRequest(prompt="x"), options)["s_min_uncond"] == 2.0
    a1111.check_supported(req)  # no longer a 422
    with pytest.raises(InvalidOption, match="override_settings.skip_early_cond"):
        a1111.check_option("skip_early_cond", 1.5, ("m",), "override_settings")
    with pytest.raises(InvalidOption, match="s_min_uncond_all"):
        a1111.check_option("s_min_uncond_all", 1, ("m",))
