"""Single-file checkpoints: tiny SD 1.x/2.x models renamed to the original LDM layout export to the same images.

Also what export detects (family, prediction type, variant, native size) from a YAML, a diffusers config or
the weights alone, and that contradictions between them are refused.
"""

import numpy as np
import pytest
import torch
from ldm_layout import original_config, to_ldm_state_dict
from safetensors.torch import save_file

from sdrt import Pipeline
from sdrt.cli import main


@pytest.fixture(scope="module")
def single_files(tiny_sd, tmp_path_factory):
    pipe, _ = tiny_sd
    root = tmp_path_factory.mktemp("single")
    state = to_ldm_state_dict(pipe)
    save_file(state, root / "tiny.safetensors")
    torch.save({"state_dict": state}, root / "tiny.ckpt")
    return root


@pytest.mark.parametrize("name", ["tiny.safetensors", "tiny.ckpt"])
def test_single_file_exports_to_the_same_images(tiny_sd, tiny_pipeline, single_files, tmp_path, name):
    folder = tiny_sd[1].parent / "diffusers"
    out = tmp_path / "onnx"
    assert main(["export", str(single_files / name), "-o", str(out), "--config", str(folder)]) == 0
    pipe = Pipeline.load(out)
    assert pipe.manifest.source["kind"] == "single_file" and pipe.manifest.model_name == "tiny"
    kw = dict(width=64, height=64, steps=6, seed=9, sampler="DPM++ 2M", progress=False)
    got = np.asarray(pipe.generate("a grey squirrel", **kw)[0], dtype=np.int16)
    want = np.asarray(tiny_pipeline.generate("a grey squirrel", **kw)[0], dtype=np.int16)
    assert np.abs(got - want).max() <= 1


def test_wrong_layout_breaks_the_images(tiny_sd, single_files, tmp_path):
    """The comparison above can fail: one mis-scaled UNet tensor changes the images."""
    from safetensors.torch import load_file

    state = load_file(single_files / "tiny.safetensors")
    key = "model.diffusion_model.out.2.weight"  # the UNet's conv_out
    state[key] = state[key] * 0.5
    save_file(state, tmp_path / "bad.safetensors")
    assert (
        main(
            [
                "export",
                str(tmp_path / "bad.safetensors"),
                "-o",
                str(tmp_path / "onnx"),
                "--config",
                str(tiny_sd[1].parent / "diffusers"),
            ]
        )
        == 0
    )
    kw = dict(width=64, height=64, steps=6, seed=9, progress=False)
    got = np.asarray(Pipeline.load(tmp_path / "onnx").generate("a cat", **kw)[0], dtype=np.int16)
    want = np.asarray(Pipeline.load(tiny_sd[1]).generate("a cat", **kw)[0], dtype=np.int16)
    assert np.abs(got - want).max() > 8


# SD 2.x: OpenCLIP text encoder layout, the LDM YAML, and what export detects from each source.


def write_yaml(path, config: dict):
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def sd2_files(tiny_sd_v, tmp_path_factory):
    """The tiny SD 2 v-model in the LDM layout (.safetensors, .ckpt) and its YAMLs (v, and base-style eps)."""
    pipe, _ = tiny_sd_v
    root = tmp_path_factory.mktemp("single_sd2")
    state = to_ldm_state_dict(pipe, text_layout="open_clip")
    save_file(state, root / "tiny2.safetensors")
    torch.save({"global_step": 110000, "state_dict": state}, root / "tiny2.ckpt")
    write_yaml(root / "tiny-v2-inference-v.yaml", original_config(pipe, "open_clip", parameterization="v"))
    write_yaml(root / "tiny-v2-inference.yaml", original_config(pipe, "open_clip"))
    return root


def test_open_clip_layout_is_what_diffusers_reads(tiny_sd_v):
    """Our inverse, read back by diffusers' converter, gives the text encoder's tensors exactly (q/k/v unpacked)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    text_encoder = tiny_sd_v[0].text_encoder
    state = to_ldm_state_dict(tiny_sd_v[0], text_layout="open_clip")
    n = text_encoder.config.num_hidden_layers
    assert f"cond_stage_model.model.transformer.resblocks.{n}.attn.in_proj_weight" in state  # the skipped block
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    read = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(text_encoder, state).items()}
    for key, value in text_encoder.state_dict().items():
        assert torch.equal(read[key], value), key
    swapped = dict(state)
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    swapped[key] = state[key].roll(state[key].shape[0] // 3, dims=0)  # k, v, q instead of q, k, v
    read = convert_open_clip_checkpoint(text_encoder, swapped)
    q = "encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(read.get("text_model." + q, read.get(q)), text_encoder.state_dict()[q])


@pytest.mark.parametrize(
    ("name", "yaml_name", "prediction_from"),
    [
        ("tiny2.safetensors", "tiny-v2-inference-v.yaml", "original config tiny-v2-inference-v.yaml: parameterization"),
        ("tiny2.ckpt", None, "--config {config}: scheduler prediction_type"),
    ],
)
def test_sd2_single_file_exports_to_the_same_images(
    tiny_sd_v, sd2_files, tmp_path, capsys, name, yaml_name, prediction_from
):
    """SD 2 v-model file -> export (offline, --config; with or without its YAML) -> the folder export's images.

    Generated through the CLI without --width/--height: the model's native size (96 px, standing for 768).
    """
    from PIL import Image

    folder = tiny_sd_v[1].parent / "diffusers"
    out = tmp_path / "onnx"
    argv = ["export", str(sd2_files / name), "-o", str(out), "--config", str(folder)]
    argv += ["--original-config", str(sd2_files / yaml_name)] if yaml_name else []
    assert main(argv) == 0
    err = capsys.readouterr().err
    prediction_from = prediction_from.format(config=folder)
    assert f"detected prediction type: v_prediction ({prediction_from}" in err
    assert "detected family: sd2 (" in err and "detected native size: 96 (" in err
    manifest = Pipeline.load(out).manifest
    assert (manifest.family, manifest.prediction_type, manifest.native_size) == ("sd2", "v_prediction", 96)
    assert manifest.detected["prediction_type"]["from"].startswith(prediction_from)
    assert manifest.source["kind"] == "single_file" and manifest.model_name == "tiny2"

    assert (
        main(["generate", "a grey squirrel!", "-m", str(out), "--steps", "6", "--seed", "4", "-o", str(tmp_path)]) == 0
    )
    image = Image.open(capsys.readouterr().out.split()[0])
    assert image.size == (96, 96) and "Size: 96x96, " in image.info["parameters"]
    want = Pipeline.load(tiny_sd_v[1]).generate("a grey squirrel!", steps=6, seed=4, progress=False)[0]
    assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(want, dtype=np.int16)).max() <= 1


def test_sd2_inpainting_file_is_detected(tmp_path, capsys):
    """A 9-channel SD 2 UNet with its YAML (no parameterization: eps) exports as an inpainting model."""
    from tiny_sd import build_tiny_sd

    pipe = build_tiny_sd(tmp_path / "diffusers", seed=2, family="sd2", unet_in_channels=9)
    save_file(to_ldm_state_dict(pipe, text_layout="open_clip"), tmp_path / "inpaint2.safetensors")
    yaml_file = write_yaml(tmp_path / "tiny-v2-inpainting-inference.yaml", original_config(pipe, "open_clip"))
    argv = ["export", str(tmp_path / "inpaint2.safetensors"), "-o", str(tmp_path / "onnx")]
    assert main([*argv, "--config", str(tmp_path / "diffusers"), "--original-config", str(yaml_file)]) == 0
    assert "detected variant: inpainting (9-channel UNet)" in capsys.readouterr().err
    manifest = Pipeline.load(tmp_path / "onnx").manifest
    assert (manifest.family, manifest.prediction_type, manifest.unet_in_channels) == ("sd2", "epsilon", 9)
    assert manifest.detected["variant"]["value"] == "inpainting"
    assert manifest.models["unet"]["inputs"][0]["shape"][1] == 9


def checkpoint_info(state, global_step=None):
    from sdrt.export.detect import CheckpointInfo

    return CheckpointInfo({k: tuple(v.shape) for k, v in state.items()}, global_step)


def test_yaml_prediction_type_overrides_the_diffusers_config(tiny_sd_v, sd2_files):
    """SD 2 base's YAML (no parameterization: eps) wins over a --config whose scheduler says v_prediction."""
    from sdrt.export.detect import detect

    pipe = tiny_sd_v[0]
    info = checkpoint_info(to_ldm_state_dict(pipe, text_layout="open_clip"))
    found = detect(pipe, info, "--config x", str(sd2_files / "tiny-v2-inference.yaml"))
    assert found.prediction_type.value == "epsilon" and "parameterization absent" in found.prediction_type.source
    assert found.family.source == "original config tiny-v2-inference.yaml: cond_stage_config FrozenOpenCLIPEmbedder"
    assert detect(pipe, info, "--config x", None).prediction_type.value == "v_prediction"


def test_weights_alone_state_what_they_assume(tiny_sd, tiny_sd_v):
    """No YAML, no diffusers config: family from the text encoder's keys; the prediction type is an assumption."""
    from sdrt.export.detect import detect

    sd2_pipe = tiny_sd_v[0]
    sd2 = to_ldm_state_dict(sd2_pipe, text_layout="open_clip")
    found = detect(sd2_pipe, checkpoint_info(sd2), None, None)
    assert (found.family.value, found.prediction_type.value, found.native_size.value) == ("sd2", "v_prediction", 768)
    assert found.family.source.startswith("weights: OpenCLIP") and found.prediction_type.source.startswith("assumed")
    base = detect(sd2_pipe, checkpoint_info(sd2, global_step=875000), None, None)
    assert (base.prediction_type.value, base.native_size.value) == ("epsilon", 512)
    sd1 = detect(tiny_sd[0], checkpoint_info(to_ldm_state_dict(tiny_sd[0])), None, None)
    assert (sd1.family.value, sd1.prediction_type.value, sd1.native_size.value) == ("sd1", "epsilon", 512)
    assert sd1.family.source.startswith("weights: CLIP")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["model"]["params"]["unet_config"]["params"].update(in_channels=9), "loaded UNet takes 4"),
        (lambda c: c["model"]["params"]["unet_config"]["params"].update(context_dim=1024), "loaded UNet's is 32"),
        (lambda c: c["model"]["params"].update(parameterization="x0"), "'x0' is not supported"),
        (
            lambda c: c["model"]["params"]["cond_stage_config"].update(
                target="ldm.modules.encoders.modules.FrozenCLIPEmbedder"
            ),
            "says sd1, but weights: OpenCLIP",
        ),
        (lambda c: c["model"]["params"].update(network_config={}), "SDXL"),
    ],
    ids=["in_channels", "context_dim", "x0", "family", "sdxl"],
)
def test_yaml_contradicting_the_weights_is_refused(tiny_sd_v, tmp_path, edit, message):
    from sdrt.export.detect import detect
    from sdrt.runtime.errors import ModelError

    pipe = tiny_sd_v[0]
    config = original_config(pipe, "open_clip", parameterization="v")
    edit(config)
    yaml_file = write_yaml(tmp_path / "bad.yaml", config)
    with pytest.raises(ModelError, match=message):
        detect(pipe, checkpoint_info(to_ldm_state_dict(pipe, text_layout="open_clip")), "--config x", str(yaml_file))


def test_unreadable_yaml_fails_before_loading(sd2_files, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    argv = ["export", str(sd2_files / "tiny2.safetensors"), "-o", str(tmp_path / "out")]
    assert main([*argv, "--original-config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "--original-config" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
