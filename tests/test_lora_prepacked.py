"""The prepacked session made behind the in-place LoRA weights (engines/prepacked_swap.py), tiny SD 1.x on the CPU
engine: after each switch the engine runs its in-place session until a prepacked one of the same weights is made in
the background, then runs that one; both give the same outputs as an engine without the swap, and a prepacked
session left running while the buffers change (the twin) gives stale ones.
"""

import numpy as np
import pytest
from test_lora import (
    PIXEL_TOL,
    PROMPT,
    SEED,
    loras,  # noqa: F401  (the test LoRA files: a module fixture)
    max_diff,
)
from test_lora import RUN as LORA_RUN

from sdrt.engines.onnxruntime import OnnxRuntimeEngine
from sdrt.runtime.lora import parse_prompt

RUN = {**LORA_RUN, "seed": SEED, "progress": False}
SWITCHES = ["<lora:locon:0.8>", "<lora:style:1>", "<lora:locon:0.5><lora:loha:0.7>", "", "<lora:lokr:0.9>"]


@pytest.fixture(scope="module")
def pipelines(tiny_sd, loras):  # noqa: F811
    """(a pipeline whose engines swap prepacked sessions in, one that always runs in place), same LoRA folder."""
    from sdrt import Pipeline

    behind = Pipeline.load(tiny_sd[1], loras=loras[0], backend="cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(OnnxRuntimeEngine, "PREPACK_BEHIND", False)
        in_place = Pipeline.load(tiny_sd[1], loras=loras[0], backend="cpu")
    for engine in in_place.engines.values():
        engine.PREPACK_BEHIND = False
    return behind, in_place


@pytest.fixture(scope="module")
def feeds():
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
            "timestep": np.array([500.0, 20.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}  # fmt: skip


def unet_output(engine, feeds) -> np.ndarray:
    return engine.run(feeds)[engine.output_names[0]]


def test_each_switch_runs_prepacked_once_ready(pipelines, feeds):
    """Right after a switch the in-place session runs (nothing waits) and starts the background build; once it is
    done the next run swaps the prepacked session in; every output equals the always-in-place engine's."""
    behind, in_place = pipelines
    unet, plain = behind.engines["unet"], in_place.engines["unet"]
    for tags in SWITCHES:
        for pipe in (behind, in_place):
            pipe.loras.apply(parse_prompt(tags)[1])
        assert unet.session is unet._swap.live, f"{tags}: a prepacked session of the old weights still runs"
        want = unet_output(plain, feeds)
        assert plain.session is plain._swap.live, "the engine without the swap left its in-place session"
        np.testing.assert_allclose(unet_output(unet, feeds), want, rtol=0, atol=1e-5)
        assert unet._swap.wait(120), f"{tags}: no prepacked session made"
        np.testing.assert_allclose(unet_output(unet, feeds), want, rtol=0, atol=1e-5)
        assert unet.session is not unet._swap.live, f"{tags}: the prepacked session was not swapped in"


def test_images_match_the_in_place_engine(pipelines):
    behind, in_place = pipelines
    for tags in ("<lora:locon:0.8>", ""):
        want = np.asarray(in_place.generate(f"{PROMPT} {tags}", **RUN)[0])
        behind.loras.apply(parse_prompt(tags)[1])
        behind.generate(f"{PROMPT} {tags}", **RUN)  # starts the builds
        for engine in behind.engines.values():
            engine._swap.wait(120)
        assert max_diff(np.asarray(behind.generate(f"{PROMPT} {tags}", **RUN)[0]), want) <= PIXEL_TOL


def test_a_stale_prepacked_session_is_wrong(pipelines, feeds):
    """The twin: buffers rewritten while the prepacked session stays (no _writing) give outputs off from the
    in-place session's on the same buffers: the swap back before each write is what keeps images right."""
    behind, _ = pipelines
    unet = behind.engines["unet"]
    behind.loras.apply(parse_prompt("<lora:locon:0.8>")[1])
    unet_output(unet, feeds)
    assert unet._swap.wait(120)
    unet_output(unet, feeds)
    assert unet.session is not unet._swap.live
    unet._live.merge(behind.loras.updates("unet", (("locon", -0.8),)))  # behind the engine's back
    stale = unet_output(unet, feeds)
    fresh = unet._swap.live.run(unet.output_names, feeds)[0]
    assert np.abs(stale - fresh).max() > 1e-3, "the prepacked session read the rewritten buffers"
    behind.loras.applied["unet"] = ("stale",)  # the next apply rewrites every buffer through the engine
    behind.loras.apply([])


def test_no_prepacked_session_without_the_memory(pipelines, feeds, monkeypatch):
    """Where the available memory is under twice the packed copies, no prepacked session is made: the in-place
    session keeps running, with the same outputs."""
    from sdrt.engines import prepacked_swap

    behind, in_place = pipelines
    unet = behind.engines["unet"]
    monkeypatch.setattr(prepacked_swap, "available_bytes", lambda: 1000)
    for pipe in (behind, in_place):
        pipe.loras.apply(parse_prompt("<lora:locon:0.3>")[1])
    want = unet_output(in_place.engines["unet"], feeds)
    unet_output(unet, feeds)  # would start the build
    assert not unet._swap.wait(120)
    np.testing.assert_allclose(unet_output(unet, feeds), want, rtol=0, atol=1e-5)
    assert unet.session is unet._swap.live
