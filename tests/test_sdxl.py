"""SDXL export (diffusers folder and SGM single file, fp16 with the VAE kept fp32, --vae), what model.json records,
the micro-conditioning numbers against diffusers', and bad input: SDXL options on SD 1.x models and the reverse,
refiners that do not match their base, NaN/Inf from a model.
"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from sdrt import Pipeline
from sdrt.cli import main
from sdrt.runtime.errors import InvalidOption, ModelError
from sdrt.runtime.families.sdxl import SdxlOptions, make_sdxl_options, switch_index
from sdrt.runtime.manifest import Manifest

PROMPT = "a photo of a grey squirrel"
KW = dict(width=64, height=64, steps=4, seed=3, progress=False)


def images(pipeline, **kw) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in pipeline.generate(PROMPT, **{**KW, **kw})])


def test_manifest_records_the_sdxl_parts(tiny_sdxl):
    base, refiner = Manifest.load(tiny_sdxl["base"][1]), Manifest.load(tiny_sdxl["refiner"][1])
    assert base.family == refiner.family == "sdxl"
    assert (base.force_zeros_for_empty_prompt, base.requires_aesthetics_score) == (True, False)
    assert (refiner.force_zeros_for_empty_prompt, refiner.requires_aesthetics_score) == (False, True)
    assert {"text_encoder", "text_encoder_2"} <= set(base.models) and "text_encoder" not in refiner.models
    assert base.detected["variant"]["value"] == "txt2img" and refiner.detected["variant"]["value"] == "refiner"
    for manifest, time_ids, context in ((base, 6, 80), (refiner, 5, 48)):
        inputs = {t["name"]: t["shape"] for t in manifest.models["unet"]["inputs"]}
        assert inputs["time_ids"] == ["batch", time_ids] and inputs["text_embeds"] == ["batch", 32]
        assert inputs["encoder_hidden_states"] == ["batch", "tokens", context]
    assert base.vae_scaling_factor == pytest.approx(0.13025)
    assert (tiny_sdxl["base"][1] / "tokenizer_2" / "vocab.json").is_file()


def test_time_ids_match_diffusers(tiny_sdxl):
    """SdxlOptions.time_ids against StableDiffusionXLPipeline._get_add_time_ids and the Img2Img one (aesthetics)."""
    import torch

    base = tiny_sdxl["base"][0]
    options = SdxlOptions(original_size=(96, 128), crops_coords_top_left=(8, 16), target_size=(64, 80))
    cond, uncond = options.time_ids(80, 64, refiner=False)
    want = base._get_add_time_ids((96, 128), (8, 16), (64, 80), torch.float32, 32).numpy()
    np.testing.assert_array_equal(cond, want)
    np.testing.assert_array_equal(uncond, want)  # no negative sizes: the negative half repeats them
    refiner = tiny_sdxl["refiner"][0]  # requires_aesthetics_score
    options = SdxlOptions(aesthetic_score=7.0, negative_aesthetic_score=2.0, negative_original_size=(32, 48))
    cond, uncond = options.time_ids(80, 64, refiner=True)
    want = refiner._get_add_time_ids(
        (64, 80), (0, 0), (64, 80), 7.0, 2.0, (32, 48), (0, 0), (64, 80), torch.float32, 32
    )
    np.testing.assert_array_equal(cond, want[0].numpy())
    np.testing.assert_array_equal(uncond, want[1].numpy())


@pytest.mark.parametrize("switch_at", [0.5, 0.7, 0.8, 0.95])
def test_switch_index_is_diffusers_denoising_end(switch_at):
    from diffusers import EulerDiscreteScheduler
    from tiny_sdxl import SDXL_SCHEDULER

    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    scheduler.set_timesteps(10)
    cutoff = int(round(1000 - switch_at * 1000))
    base_steps = len([t for t in scheduler.timesteps if t >= cutoff])  # StableDiffusionXLPipeline, step 8.1
    refiner_steps = int((scheduler.timesteps < cutoff).sum())  # Img2ImgPipeline.get_timesteps
    k = switch_index(scheduler.timesteps.numpy(), switch_at, 1000)
    assert (k, 10 - k) == (base_steps, refiner_steps)


# Bad input: each is one InvalidOption / ModelError naming the field.


@pytest.mark.parametrize(
    ("option", "value"),
    [("prompt_2", "a cat"), ("original_size", (64, 64)), ("aesthetic_score", 6.0), ("refiner", "some/folder")],
)
def test_sdxl_options_are_refused_on_sd1(tiny_pipeline, option, value):
    with pytest.raises(InvalidOption, match=f"^{option}: .*SDXL option, and this model is sd1"):
        tiny_pipeline.generate(PROMPT, **KW, **{option: value})


def test_sdxl_options_are_refused_on_sd1_by_the_cli(tiny_sd, tmp_path, capsys):
    rc = main(["generate", PROMPT, "-m", str(tiny_sd[1]), "--prompt-2", "a cat", "-o", str(tmp_path)])
    assert rc == 2 and "prompt_2" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("model", "option", "value", "allowed"),
    [
        ("base", "aesthetic_score", 6.0, "condition SDXL refiners"),
        ("base", "refiner_switch_at", 0.8, "without a refiner"),
        ("base", "original_size", (0, 64), "two integers from 1"),
        ("base", "crops_coords_top_left", (8,), "two integers from 0"),
        ("base", "prompt_2", 3, "a string"),
        ("refiner", "target_size", (64, 64), "is an SDXL refiner"),
        ("refiner", "refiner", "x", "is an SDXL refiner"),
        ("refiner", "aesthetic_score", 11.0, "from 0 to 10"),
    ],
)
def test_bad_sdxl_options(tiny_sdxl, model, option, value, allowed):
    manifest = Manifest.load(tiny_sdxl[model][1])
    with pytest.raises(InvalidOption, match=f"^{option}: got .*{allowed}"):
        make_sdxl_options(manifest, {option: value})


def test_refiner_switch_at_must_lie_inside_the_schedule(tiny_sdxl):
    manifest = Manifest.load(tiny_sdxl["base"][1])
    for value in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(InvalidOption, match="^refiner_switch_at: .*strictly between 0 and 1"):
            make_sdxl_options(manifest, {"refiner": "r", "refiner_switch_at": value})


@pytest.fixture(scope="module")
def base_pipeline(tiny_sdxl):
    return Pipeline.load(tiny_sdxl["base"][1])


def test_refiner_must_be_an_sdxl_refiner(base_pipeline, tiny_sdxl, tiny_sd):
    with pytest.raises(ModelError, match="is an sd1 model, not an SDXL refiner"):
        base_pipeline.generate(PROMPT, **KW, refiner=str(tiny_sd[1]))
    with pytest.raises(ModelError, match="is an SDXL base, not an SDXL refiner"):
        base_pipeline.generate(PROMPT, **KW, refiner=str(tiny_sdxl["base"][1]))


@pytest.mark.parametrize(("field", "value"), [("latent_channels", 16), ("vae_scaling_factor", 0.18215)])
def test_refiner_must_share_the_base_latent_space(base_pipeline, tiny_sdxl, tmp_path, field, value):
    folder = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl["refiner"][1], folder)
    manifest = json.loads((folder / "model.json").read_text())
    manifest[field] = value
    (folder / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=f"does not match the base: {field} is {value}"):
        base_pipeline.generate(PROMPT, **KW, refiner=str(folder))


def test_nan_images_are_an_error_not_a_black_image(tiny_pipeline, monkeypatch):
    """Every family: a VAE that overflows (NaN) gives one clear error naming the stage and the model."""
    vae = tiny_pipeline.engines["vae_decoder"]
    run = vae.run
    monkeypatch.setattr(vae, "run", lambda feeds: {"sample": run(feeds)["sample"] * np.float32(np.inf)})
    with pytest.raises(ModelError, match=r"the images hold \d+ NaN or Inf values .*vae_decoder"):
        tiny_pipeline.generate(PROMPT, **KW)


def test_nan_latents_are_an_error(tiny_pipeline, monkeypatch):
    """Non-finite start latents are refused by name before any work; a UNet that returns them is one ModelError."""
    latents = np.full((1, 4, 8, 8), np.inf, dtype=np.float32)
    with pytest.raises(InvalidOption, match=r"^latents: .*finite float32 latents"):
        tiny_pipeline.generate(PROMPT, **KW, latents=latents)
    unet = tiny_pipeline.engines["unet"]
    run = unet.run
    monkeypatch.setattr(unet, "run", lambda feeds: {"out_sample": run(feeds)["out_sample"] * np.float32(np.inf)})
    with np.errstate(invalid="ignore", over="ignore"), pytest.raises(ModelError, match=r"the latents hold 256 NaN or "
                                                                          r"Inf values out of 256 \(unet"):  # fmt: skip
        tiny_pipeline.generate(PROMPT, **KW, latents=np.zeros((1, 4, 8, 8), np.float32))


# Export: fp16 keeps SDXL's VAE fp32 unless --vae gives a fixed one; --vae for SD 1.x; single files.


def test_fp16_export_keeps_the_sdxl_vae_fp32(tiny_sdxl, tmp_path):
    out = tmp_path / "fp16"
    assert main(["export", str(tiny_sdxl["refiner"][1].parent / "refiner"), "-o", str(out), "--precision", "fp16"]) == 0
    manifest = Manifest.load(out)
    precisions = {name: entry["precision"] for name, entry in manifest.models.items()}
    assert precisions == {"text_encoder_2": "fp32", "unet": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp32"}
    image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    kw = dict(init_image=image, strength=0.5, steps=4, seed=2, progress=False)
    got = np.asarray(Pipeline.load(out).generate(PROMPT, **kw)[0], dtype=np.int16)
    want = np.asarray(Pipeline.load(tiny_sdxl["refiner"][1]).generate(PROMPT, **kw)[0], dtype=np.int16)
    assert np.abs(got - want).max() <= 8  # fp16 UNet weights: a few /255 on the tiny x10-gain model


def test_vae_option_replaces_the_vae_and_a_fixed_one_runs_fp16(tiny_sd, tmp_path):
    """--vae (SD 1.x here): the images change with the VAE; a VAE whose config drops force_upcast may go fp16."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd[1].parent / "diffusers" / "vae")
    with __import__("torch").no_grad():
        vae.decoder.conv_out.bias.add_(0.5)  # a visibly different decoder
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "onnx"
    assert main(["export", str(tiny_sd[1].parent / "diffusers"), "-o", str(out), "--vae", str(tmp_path / "vae")]) == 0
    manifest = Manifest.load(out)
    assert manifest.source["vae"] == str(tmp_path / "vae")
    assert np.abs(images(Pipeline.load(out)) - images(Pipeline.load(tiny_sd[1]))).max() > 8


def test_bad_vae_option(tiny_sd, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = ["export", str(tiny_sd[1].parent / "diffusers"), "-o", str(tmp_path / "out")]
    assert main([*args, "--vae", str(tmp_path / "empty")]) == 2
    assert "--vae" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_vae_fp16_rule():
    from types import SimpleNamespace

    from sdrt.export.vae import vae_fp16_capable

    def vae(config):
        return SimpleNamespace(config=config)

    assert not vae_fp16_capable(vae({"force_upcast": True}))
    assert vae_fp16_capable(vae({"force_upcast": False}))  # e.g. madebyollin/sdxl-vae-fp16-fix
    # SD 1.x/2.x keep their fp16 VAE: their export plan never asks (only export/sdxl.py calls vae_fp16_capable)
    import inspect

    import sdrt.export.sd

    assert "vae_fp16_capable" not in inspect.getsource(sdrt.export.sd)


@pytest.fixture(scope="module")
def sgm_files(tiny_sdxl, tmp_path_factory):
    """The tiny base and refiner in SDXL's original single-file (SGM) layout; the refiner's UNet output mis-scaled."""
    from ldm_layout_sdxl import to_sgm_state_dict

    root = tmp_path_factory.mktemp("sgm")
    save_file(to_sgm_state_dict(tiny_sdxl["base"][0]), root / "base.safetensors")
    state = to_sgm_state_dict(tiny_sdxl["refiner"][0])
    state["model.diffusion_model.out.2.weight"] = state["model.diffusion_model.out.2.weight"] * 0.5
    save_file(state, root / "refiner-bad.safetensors")
    return root


def test_single_file_base_exports_to_the_same_images(tiny_sdxl, base_pipeline, sgm_files, tmp_path):
    out = tmp_path / "onnx"
    config = str(tiny_sdxl["base"][1].parent / "base")
    assert main(["export", str(sgm_files / "base.safetensors"), "-o", str(out), "--config", config]) == 0
    pipeline = Pipeline.load(out)
    assert pipeline.manifest.source["kind"] == "single_file" and pipeline.manifest.family == "sdxl"
    assert pipeline.manifest.detected["family"]["from"].startswith("weights: SDXL conditioner")
    kw = dict(negative_prompt="blue sky", cfg_scale=5.0, prompt_2="a red cat")
    assert np.abs(images(pipeline, **kw) - images(base_pipeline, **kw)).max() <= 1


def test_wrong_single_file_layout_breaks_the_images(tiny_sdxl, sgm_files, tmp_path):
    """The comparison above can fail: one mis-scaled UNet tensor of a (refiner) single file changes its images."""
    out = tmp_path / "onnx"
    config = str(tiny_sdxl["refiner"][1].parent / "refiner")
    assert main(["export", str(sgm_files / "refiner-bad.safetensors"), "-o", str(out), "--config", config]) == 0
    assert Manifest.load(out).detected["variant"]["value"] == "refiner"
    image = Image.fromarray(np.full((64, 64, 3), 100, np.uint8))
    kw = dict(init_image=image, strength=0.6)
    good = images(Pipeline.load(tiny_sdxl["refiner"][1]), **kw)
    assert np.abs(images(Pipeline.load(out), **kw) - good).max() > 8


def test_gathered_external_data_runs_the_same(tiny_sdxl, tmp_path):
    """to_onnx.gather_external_data: a graph with one file per tensor -> one page-aligned data file, same outputs."""
    import onnx
    import onnxruntime as ort

    from sdrt.export.to_onnx import EXTERNAL_DATA_ALIGNMENT, gather_external_data

    src = tiny_sdxl["refiner"][1] / "vae_decoder" / "model.onnx"
    split = tmp_path / "split" / "model.onnx"
    split.parent.mkdir()
    model = onnx.load(str(src))
    onnx.save_model(model, str(split), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=256)
    assert len(list(split.parent.iterdir())) > 10
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    gather_external_data(split, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    offsets = [
        int(e.value) for t in onnx.load(str(out), load_external_data=False).graph.initializer for e in t.external_data
        if e.key == "offset"
    ]  # fmt: skip
    assert offsets and all(o % EXTERNAL_DATA_ALIGNMENT == 0 for o in offsets)
    feeds = {"latent_sample": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    want = ort.InferenceSession(str(src)).run(None, feeds)[0]
    np.testing.assert_array_equal(ort.InferenceSession(str(out)).run(None, feeds)[0], want)


def test_sd_yaml_on_an_sdxl_file_is_refused(tiny_sdxl, sgm_files, tmp_path, capsys):
    yaml = tmp_path / "v1-inference.yaml"
    yaml.write_text("model:\n  params:\n    cond_stage_config:\n      target: ldm.FrozenCLIPEmbedder\n")
    config = str(tiny_sdxl["base"][1].parent / "base")
    args = [str(sgm_files / "base.safetensors"), "-o", str(tmp_path / "out"), "--config", config]
    assert main(["export", *args, "--original-config", str(yaml)]) == 2
    assert "is not an SDXL (SGM) config" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cli_runs_base_and_refiner(tiny_sdxl, tmp_path, capsys):
    args = ["generate", PROMPT, "-m", str(tiny_sdxl["base"][1]), "--width", "64", "--height", "64", "--steps", "4"]
    extra = ["--prompt-2", "a red cat", "--original-size", "128", "96", "--refiner", str(tiny_sdxl["refiner"][1])]
    assert main([*args, *extra, "--refiner-switch-at", "0.7", "--seed", "5", "-o", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*.png")
    assert "Refiner: refiner [" in Image.open(png).info["parameters"]
    assert "Refiner switch at: 0.7" in Image.open(png).info["parameters"]
    assert main([*args, "--aesthetic-score", "5", "-o", str(tmp_path / "bad")]) == 2
    assert "aesthetic_score" in capsys.readouterr().err


def test_a1111_weights_and_long_prompts_reach_both_encoders(base_pipeline):
    """SDXL runs the A1111 prompt machinery (conditioning.py) on both encoders: a weight, a second 77-token chunk
    and a different prompt_2 each change the image; a weight of 1 changes nothing."""
    plain = images(base_pipeline, negative_prompt="blue sky", cfg_scale=5.0)
    same = base_pipeline.generate("a photo of a (grey:1.0) squirrel", **KW, negative_prompt="blue sky", cfg_scale=5.0)
    assert np.abs(np.asarray(same[0], dtype=np.int16) - plain[0]).max() == 0
    for kw in (dict(prompt_2="(grey:1.6) squirrel"), dict(prompt_2="a cat BREAK in the sky")):
        assert np.abs(images(base_pipeline, negative_prompt="blue sky", cfg_scale=5.0, **kw) - plain).max() > 8
    long = base_pipeline.generate(" ".join(["a grey squirrel"] * 40), **KW)  # 120 words: two chunks per encoder
    assert long[0].size == (64, 64)
