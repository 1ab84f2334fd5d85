"""The flow families' runtime pieces against their references: shifted sigmas against diffusers'
FlowMatchEulerDiscreteScheduler, the T5 tokenizer against transformers', FLUX's packing against diffusers', the T5
encoder exported part by part against the whole, and a single file whose configs cannot be had refused clearly."""

import numpy as np
import pytest

from sdrt.runtime.flow import FlowConfig, calculate_shift, flow_sigmas
from sdrt.runtime.flow_models import image_ids, pack, unpack

SD3 = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
            "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}  # fmt: skip


def _diffusers_sigmas(config: dict, steps: int, spacing: str, seq_len: int) -> np.ndarray:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    kwargs = {}
    if config.get("use_dynamic_shifting") or spacing == "sigmas":
        kwargs["mu"] = calculate_shift(seq_len, FlowConfig.from_dict(config))
    if spacing == "sigmas":  # FluxPipeline's own sigmas
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(device="cpu", **kwargs)
    else:
        scheduler.set_timesteps(steps, device="cpu", **kwargs)
    return scheduler.sigmas.numpy()


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize(
    "config,spacing,seq_len",
    [(SD3, "timesteps", 4096), ({**SD3, "shift": 1.0}, "timesteps", 16), (FLUX_DEV, "sigmas", 16),
     (FLUX_DEV, "sigmas", 4096), (FLUX_DEV, "sigmas", 1024), ({**FLUX_DEV, "use_dynamic_shifting": False,
     "shift": 1.0}, "sigmas", 4096), (FLUX_DEV, "timesteps", 900)],
)  # fmt: skip
def test_sigmas_match_diffusers(config, spacing, seq_len, steps):
    ours = flow_sigmas(steps, FlowConfig.from_dict(config), spacing, seq_len)
    reference = _diffusers_sigmas(config, steps, spacing, seq_len)
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference)


def test_sigmas_can_fail():
    reference = _diffusers_sigmas(FLUX_DEV, 20, "sigmas", 4096)
    other = flow_sigmas(20, FlowConfig.from_dict(FLUX_DEV), "sigmas", 1024)  # another image size: another shift
    assert np.abs(other - reference).max() > 0.01


def test_packing_matches_diffusers():
    import torch
    from diffusers import FluxPipeline

    x = np.random.default_rng(0).standard_normal((2, 16, 6, 10)).astype(np.float32)
    packed = FluxPipeline._pack_latents(torch.from_numpy(x), 2, 16, 6, 10).numpy()
    np.testing.assert_array_equal(pack(x), packed)
    np.testing.assert_array_equal(unpack(packed, 6, 10), x)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(image_ids(6, 10), ids)


TEXTS = ["a photo of a cat", "The grey SQUIRREL, in  the sky!", "", "xyz qq 12 red-blue", "  leading spaces",
         "a " * 300, "unknown ünïcode ✓ words"]  # fmt: skip


def test_t5_tokenizer_matches_transformers(tmp_path):
    from tiny_t5 import write_tiny_t5_tokenizer

    from sdrt.export.driver import write_tokenizer
    from sdrt.runtime.t5 import T5Tokenizer

    reference = write_tiny_t5_tokenizer(tmp_path / "src")
    write_tokenizer(reference, tmp_path / "exported")  # what `sdrt export` writes
    ours = T5Tokenizer.from_dir(tmp_path / "exported")
    for length in (256, 16):
        expected = reference(TEXTS, padding="max_length", max_length=length, truncation=True).input_ids
        np.testing.assert_array_equal(ours(TEXTS, length), np.array(expected))
    assert ours(["a cat"], 8).tolist() != ours(["a dog"], 8).tolist()


def test_t5_exported_in_parts_matches_whole(tmp_path, monkeypatch):
    import torch
    from tiny_t5 import tiny_t5_encoder

    from sdrt.engines import create_engine
    from sdrt.export import t5
    from sdrt.runtime.t5 import T5Encoder

    torch.manual_seed(0)
    encoder = tiny_t5_encoder(64, layers=3).eval()
    ids = torch.randint(0, 64, (2, 21))
    with torch.no_grad():
        reference = encoder(ids).last_hidden_state.numpy()
    per_block = 4 * sum(p.numel() for p in encoder.encoder.block[0].parameters())
    steps = t5.t5_steps(encoder, "text_encoder_3", part_bytes=per_block)  # one block a part: 3 parts
    assert [s.spec.name for s in steps] == ["text_encoder_3", "text_encoder_3_part1", "text_encoder_3_part2"]
    models = {}
    for step in steps:
        step.run(tmp_path, "fp32")
        models[step.spec.name] = {"file": f"{step.spec.name}/model.onnx", **step.manifest_entry}
    assert all(isinstance(block, torch.nn.Identity) for block in encoder.encoder.block)  # released part by part

    class Manifest:
        folder = tmp_path

    Manifest.models = models
    engines = {name: create_engine(tmp_path / entry["file"], "cpu") for name, entry in models.items()}
    ours = T5Encoder(engines, Manifest, "text_encoder_3")(ids.numpy())
    assert np.abs(ours - reference).max() <= 1e-4
    del engines["text_encoder_3_part2"]
    with pytest.raises(Exception, match="part2"):
        T5Encoder(engines, Manifest, "text_encoder_3")


@pytest.mark.parametrize(
    "prefix,family", [("joint_blocks.0.", "SD 3.5"), ("model.diffusion_model.double_blocks.0.", "FLUX")]
)
def test_single_file_without_config_refused_clearly(tmp_path, capsys, prefix, family):
    """Offline, without --config: the family's default hub id cannot give the configs; one error naming --config."""
    import torch
    from safetensors.torch import save_file

    from sdrt.cli import main

    path = tmp_path / "model.safetensors"
    save_file({prefix + "x.weight": torch.zeros(2, 2)}, str(path))
    assert main(["export", str(path), "-o", str(tmp_path / "out")]) == 2
    assert "--config" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _gaussian_denoiser(scale: float):
    """The exact D(x, sigma) = E[x0 | x] for data x0 ~ N(0, scale^2) on the flow path x = (1 - s) x0 + s noise."""

    def denoise(x, sigma, intermediate=False):
        s = float(sigma)
        return (x * ((1 - s) * scale**2 / ((1 - s) ** 2 * scale**2 + s**2))).astype(np.float32)

    return denoise


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_rf_euler_ancestral_samples_the_data_distribution(eta):
    """With the exact denoiser of Gaussian data (std 0.5), Euler a in its rectified-flow form turns unit noise into the
    data's spread as the steps grow (measured, eta 1: 0.416 at 30 steps, 0.488 at 300); k-diffusion's
    variance-exploding Euler a on the same flow sigmas drifts away (0.52, then 0.68; eta 0.5: 0.54 at 300)."""
    from sdrt.runtime import samplers
    from sdrt.runtime.flow_samplers import sample_euler_ancestral_rf

    def run(sampler, steps):
        rng = np.random.default_rng(0)
        x = rng.standard_normal(100_000).astype(np.float32)
        sigmas = flow_sigmas(steps, FlowConfig.from_dict(SD3), "timesteps", 4096)
        return sampler(_gaussian_denoiser(0.5), x, sigmas, lambda: rng.standard_normal(x.shape).astype(np.float32),
                       eta=eta).std()  # fmt: skip

    coarse, fine = abs(run(sample_euler_ancestral_rf, 30) - 0.5), abs(run(sample_euler_ancestral_rf, 300) - 0.5)
    assert fine < 0.02 and fine < coarse / 3
    assert abs(run(samplers.sample_euler_ancestral, 300) - 0.5) > max(0.03, 2 * fine)  # eta 0.5: 0.043


@pytest.mark.parametrize("name", ["DPM++ 2M SDE", "DPM++ 2M SDE Heun"])
def test_rf_dpmpp_2m_sde_samples_the_data_distribution(name):
    """DPM++ 2M SDE in its flow form (alpha = 1 - sigma) turns unit noise into Gaussian data's spread (std 0.5) with the
    exact denoiser (measured at 300 steps: 0.5006, Heun 0.5016); k-diffusion's variance-exploding form on the same
    sigmas does not (0.709, 0.713): the can-fail twin."""
    from sdrt.runtime import samplers
    from sdrt.runtime.flow_samplers import FLOW_VARIANTS

    def run(sampler, steps):
        rng = np.random.default_rng(0)
        x = rng.standard_normal(100_000).astype(np.float32)
        sigmas = flow_sigmas(steps, FlowConfig.from_dict(SD3), "timesteps", 4096)
        return sampler(_gaussian_denoiser(0.5), x, sigmas, lambda: rng.standard_normal(x.shape).astype(np.float32),
                       eta=1.0).std()  # fmt: skip

    assert abs(run(FLOW_VARIANTS[name][0], 300) - 0.5) < 0.01
    assert abs(run(samplers.sampler_function(name)[0], 300) - 0.5) > 0.1
