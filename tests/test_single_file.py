"""Single-file checkpoints: a tiny model renamed to the original LDM layout exports to the same images."""

import numpy as np
import pytest
import torch
from ldm_layout import to_ldm_state_dict
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
