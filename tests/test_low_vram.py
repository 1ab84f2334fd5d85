"""Low-VRAM mode on the CPU backends (--sdrt-backend): engines staged one at a time (text encoder -> UNet -> VAE)."""

import subprocess
import sys

import numpy as np
import pytest

from sdrt.runtime.errors import InvalidOption
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.memory import StagedEngine, memory_plan

ARGS = dict(width=64, height=64, steps=3, seed=7, cfg_scale=5.0, progress=False)


def loaded(pipe) -> list[str]:
    """Engines holding a model: an ONNX Runtime session, or OpenVINO's read graph or compiled models."""
    held = ("session", "model", "compiled")
    return sorted(name for name, e in pipe.engines.items() if any(getattr(e.inner, a, None) for a in held))


def test_staged_pipeline_holds_one_engine_at_a_time_and_gives_the_same_images(tiny_sd, tiny_pipeline, backend):
    from sdrt import Pipeline

    pipe = Pipeline.load(tiny_sd[1], backend=backend, low_vram=True)
    assert all(isinstance(e, StagedEngine) for e in pipe.engines.values())
    assert loaded(pipe) == []  # nothing is loaded until it runs
    seen = []
    for name, engine in pipe.engines.items():
        inner_run = engine.inner.run

        def spy(feeds, name=name, inner_run=inner_run):
            seen.append((name, loaded(pipe)))
            return inner_run(feeds)

        engine.inner.run = spy
    images = pipe.generate("a photo of a cat", **ARGS)
    assert {tuple(resident) for _, resident in seen} == {("text_encoder",), ("unet",), ("vae_decoder",)}
    order = [name for i, (name, _) in enumerate(seen) if i == 0 or seen[i - 1][0] != name]
    assert order == ["text_encoder", "unet", "vae_decoder"]
    assert pipe.engines["unet"].stager.loads == 3  # each engine loaded once per generation
    want = tiny_pipeline.generate("a photo of a cat", **ARGS)
    np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(want[0]))


def test_low_vram_tiles_the_vae_and_a_budget_stages(tiny_sd):
    manifest = Manifest.load(tiny_sd[1])
    plan = memory_plan(manifest, "cpu", low_vram=True)
    assert plan.staged and plan.vae_tile == 64
    assert not memory_plan(manifest, "cpu").staged
    # planned text encoder activations (64 MiB) + all weights (~3 MB) exceed 65 MiB; each engine alone fits
    tight = memory_plan(manifest, "cpu", vram_budget="65MB")
    assert tight.staged and tight.vram_budget == 65 * 2**20
    with pytest.raises(InvalidOption, match=r"vram_budget: got 1000; allowed: at least"):
        memory_plan(manifest, "cpu", vram_budget=1000)
    roomy = memory_plan(manifest, "cpu", vram_budget="8GB")
    assert not roomy.staged


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"vram_budget": "lots"}, "vram_budget"),
        ({"vae_tile": 100}, "vae_tile"),  # not a multiple of 8
        ({"vae_tile": 64}, "vae_tile"),  # 8 latent cells: too small to blend
        ({"low_vram": "yes"}, "low_vram"),
    ],
)
def test_bad_memory_options_name_the_field(tiny_sd, kwargs, field):
    with pytest.raises(InvalidOption, match=field):
        memory_plan(Manifest.load(tiny_sd[1]), "cpu", **kwargs)


def test_cli_low_vram_and_bad_budget(tiny_sd, tmp_path, capsys):
    from sdrt.cli import main

    model = str(tiny_sd[1])
    assert main(["generate", "a cat", "-m", model, "--steps", "2", "--low-vram", "-o", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 1
    assert main(["generate", "a cat", "-m", model, "--vram-budget", "two", "-o", str(tmp_path)]) == 2
    assert "vram_budget: got 'two'" in capsys.readouterr().err


RSS_AFTER_LOAD = """
import psutil, sys
from sdrt import Pipeline
pipe = Pipeline.load(sys.argv[1], low_vram=sys.argv[2] == "1")
print(psutil.Process().memory_info().rss)
"""


def rss_after_load(model_dir, low_vram: bool) -> int:
    """RSS in bytes of a fresh process right after Pipeline.load(MODEL_DIR)."""
    run = subprocess.run(
        [sys.executable, "-c", RSS_AFTER_LOAD, str(model_dir), "1" if low_vram else "0"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return int(run.stdout.split()[-1])


def test_staged_load_holds_no_engine_in_memory(tiny_sd):
    """Staged, load() opens no session (measured on the tiny model: 39 MiB after load vs 76 MiB). The tiny model's
    peak RSS is ONNX Runtime's own code (88 MiB either way); `sdrt bench --low-vram` measures peaks at full size."""
    assert rss_after_load(tiny_sd[1], True) < rss_after_load(tiny_sd[1], False) - 10 * 2**20
