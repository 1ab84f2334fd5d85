"""RAM budgets on the CPU backends (runtime/ram_budget.py): the low-VRAM plan priced in host memory, on SD 1.5's
real file sizes (sparse files) and end to end on the tiny model."""

import numpy as np
import pytest

import sdrt.engines.openvino as ov_backend
from sdrt.engines import host_memory
from sdrt.errors import InvalidOption
from sdrt.runtime import ram_budget
from sdrt.runtime.ram_budget import plan_ram

GiB = 2**30
SD15_FILES = {"text_encoder": 492_000_000, "unet": 3_438_000_000, "vae_decoder": 198_000_000,
              "vae_encoder": 137_000_000}  # bytes of SD 1.5's fp32 graphs as sdrt exports them  # fmt: skip


class Sd15:
    native_size, latent_downsample = 512, 8


@pytest.fixture
def sd15_paths(tmp_path):
    """{graph: ONNX file} with SD 1.5's sizes, as sparse files (no disk used)."""
    paths = {}
    for name, size in SD15_FILES.items():
        (tmp_path / name).mkdir()
        paths[name] = tmp_path / name / "model.onnx"
        paths[name].write_bytes(b"\0" * 1024)
        with open(tmp_path / name / "model.onnx.data", "wb") as f:
            f.truncate(size)
    return paths


def test_a_roomy_budget_keeps_everything_resident(sd15_paths):
    plan = plan_ram(Sd15(), "cpu", "16GB", sd15_paths)
    assert not plan.staged and plan.vae_tile is None and plan.peak <= 16 * GiB


def test_a_tighter_budget_stages(sd15_paths):
    plan = plan_ram(Sd15(), "cpu", "5.5GB", sd15_paths)
    assert plan.staged and plan.peak <= 5.5 * GiB


def test_a_budget_the_unet_cannot_fit_is_refused_with_the_least_that_works(sd15_paths):
    with pytest.raises(InvalidOption, match=r"ram_budget: got '3GB'; allowed: at least \d\.\d\d GiB \(unet alone"):
        plan_ram(Sd15(), "cpu", "3GB", sd15_paths)
    with pytest.raises(InvalidOption, match="ram_budget: got 'lots'; allowed: a positive size"):
        plan_ram(Sd15(), "cpu", "lots", sd15_paths)


def test_bf16_weights_count_half(sd15_paths, monkeypatch):
    monkeypatch.setattr(ov_backend, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert plan_ram(Sd15(), "openvino", "4GB", sd15_paths).staged  # the 3.4 GB UNet holds 1.7 GB in bf16
    with pytest.raises(InvalidOption, match="ram_budget"):  # can fail: f32 needs the whole UNet
        plan_ram(Sd15(), "openvino-f32", "4GB", sd15_paths)


def test_gpu_backends_take_no_ram_budget(sd15_paths):
    with pytest.raises(InvalidOption, match="cuda plans device memory with vram_budget"):
        plan_ram(Sd15(), "cuda", "8GB", sd15_paths)


def test_pipeline_under_a_ram_budget_stages_and_gives_the_same_image(tiny_sd, monkeypatch):
    from sdrt import Pipeline

    args = dict(width=64, height=64, steps=3, seed=5, progress=False)
    want = np.asarray(Pipeline.load(tiny_sd[1]).generate("a cat", **args)[0])
    roomy = Pipeline.load(tiny_sd[1], ram_budget="8GB")
    assert not roomy.memory.staged
    np.testing.assert_array_equal(np.asarray(roomy.generate("a cat", **args)[0]), want)
    # The tiny model's engines are a few MB: price its weights up 100x, and give it a budget between the staged
    # plan's peak (the largest engine alone) and everything resident.
    monkeypatch.setattr(host_memory, "weight_share", lambda backend, name: 100.0)
    from sdrt.runtime.manifest import Manifest

    manifest = Manifest.load(tiny_sd[1])
    stages = ram_budget.ram_stage_costs(manifest, "cpu", {n: manifest.graph_path(n) for n in manifest.models})
    alone = ram_budget.PROCESS_OVERHEAD + max(s.weights + s.activations for s in stages.values())
    everything = ram_budget.PROCESS_OVERHEAD + sum(s.weights for s in stages.values()) + max(
        s.activations for s in stages.values())  # fmt: skip
    assert alone < everything
    budget = (alone + everything) // 2
    with pytest.raises(InvalidOption, match="ram_budget"):  # can fail: below the largest engine alone
        Pipeline.load(tiny_sd[1], ram_budget=alone - 2**20)
    tight = Pipeline.load(tiny_sd[1], ram_budget=budget)
    assert tight.memory.staged and type(tight.engines["unet"]).__name__ == "StagedEngine"
    np.testing.assert_allclose(np.asarray(tight.generate("a cat", **args)[0]), want, atol=2)  # tiled VAE: 2/255


def test_cli_ram_budget_too_small_exits_2(tiny_sd, capsys):
    from sdrt.cli import main

    assert main(["generate", "a cat", "-m", str(tiny_sd[1]), "--ram-budget", "100MB", "--steps", "1"]) == 2
    assert "ram_budget: got '100MB'; allowed: at least" in capsys.readouterr().err
