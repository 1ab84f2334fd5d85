"""Tiled VAE decode/encode (sdrt.runtime.tiling): overlapping tiles blended without seams.

Two instruments. (1) A local decoder (3x3 convolutions and 2x nearest upsamplings, ONNX, random weights) whose
receptive radius is known: 1 + 1/2 + 1/4 + 1/8 < 2 latent cells. With MARGIN >= 2 cells the tiled decode equals
the untiled one everywhere (float rounding), and with a smaller margin the "border step" metric sees the seams.
(2) The tiny SD VAE of the fixtures: its random GroupNorm layers and mid-block attention couple every pixel to the
whole latent (one latent cell moved by 1 changes pixels 20+ cells away by ~1/255, measured), which no overlap can
reproduce tile by tile: there the test checks the pipeline path, the shapes and a bound, not 2/255.
"""

import numpy as np
import pytest

from sdrt.runtime.errors import InvalidOption
from sdrt.runtime.tiling import check_tiling, edge_ramp, run_tiled, tile_starts

TOLERANCE_255 = 2.0  # brief: tiled vs untiled within 2/255 away from tile borders
STEP_TOLERANCE_255 = 0.5  # no line of the error image stands out by more than this (mean over the line)


def border_step(tiled: np.ndarray, untiled: np.ndarray) -> float:
    """Largest mean |jump| of the error image across any pixel row or column, above the median such jump, in /255.

    A seam is a line where the error changes abruptly: its mean jump along that line stands out from the rest.
    Images (B, 3, H, W) in [-1, 1].
    """
    e = (tiled.astype(np.float64) - untiled) * 127.5
    worst = 0.0
    for axis in (2, 3):
        jumps = np.abs(np.diff(e, axis=axis)).mean(axis=(0, 1, 5 - axis))  # one value per row/column boundary
        worst = max(worst, float(jumps.max() - np.median(jumps)))
    return worst


class LocalDecoder:
    """An engine with the VAE decoder's I/O: (1, 4, h, w) -> (1, 3, 8h, 8w), 4 convs and 3 nearest upsamplings."""

    RADIUS = 1 + 1 / 2 + 1 / 4 + 1 / 8  # latent cells

    def __init__(self, seed: int = 0):
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(seed)
        nodes, inits, x = [], [], "latent_sample"
        channels = [4, 16, 16, 16, 3]
        for i in range(4):
            w = rng.standard_normal((channels[i + 1], channels[i], 3, 3)) / np.sqrt(9 * channels[i])
            w = w.astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            y = "sample" if i == 3 else f"c{i}"
            nodes.append(helper.make_node("Conv", [x, f"w{i}"], [y], pads=[1, 1, 1, 1]))
            if i < 3:
                inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), f"s{i}"))
                nodes.append(helper.make_node("Tanh", [y], [f"t{i}"]))
                nodes.append(helper.make_node("Resize", [f"t{i}", "", f"s{i}"], [f"u{i}"], mode="nearest"))
                x = f"u{i}"
        graph = helper.make_graph(
            nodes,
            "local_decoder",
            [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, [1, 4, "h", "w"])],
            [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, 3, "H", "W"])],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        del onnx

    def run(self, feeds):
        return {"sample": self.session.run(["sample"], feeds)[0]}


def decode(engine, z, tile, overlap, margin):
    return run_tiled(lambda t: engine.run({"latent_sample": t}), z, tile, overlap, margin, 1, 8)["sample"]


@pytest.fixture(scope="module")
def local_decoder():
    return LocalDecoder()


@pytest.mark.parametrize("size", [(40, 40), (37, 52), (16, 70)])
def test_tiled_decode_equals_untiled_when_margin_covers_the_receptive_field(local_decoder, size):
    z = np.random.default_rng(1).standard_normal((1, 4, *size)).astype(np.float32)  # (1, 4, h, w)
    full = local_decoder.run({"latent_sample": z})["sample"]
    tiled = decode(local_decoder, z, tile=16, overlap=6, margin=2)
    assert tiled.shape == full.shape
    assert np.abs(tiled - full).max() * 127.5 < 0.01  # exact up to rounding: far below 2/255
    assert border_step(tiled, full) < 0.01


def test_too_small_a_margin_shows_seams(local_decoder):
    """The rule can fail: a margin below the receptive radius leaves tile-edge errors the metrics catch."""
    z = np.random.default_rng(1).standard_normal((1, 4, 40, 40)).astype(np.float32)
    full = local_decoder.run({"latent_sample": z})["sample"]
    tiled = decode(local_decoder, z, tile=16, overlap=3, margin=0)
    assert np.abs(tiled - full).max() * 127.5 > TOLERANCE_255
    assert border_step(tiled, full) > STEP_TOLERANCE_255


def test_blend_weights_sum_to_one_across_an_overlap():
    ramp = edge_ramp(20, overlap=10, margin=2)
    assert ramp[:2].tolist() == [0, 0] and ramp[8:].tolist() == [1] * 12
    rising, falling = ramp[:10], ramp[:10][::-1]  # neighbours over the shared 10 cells
    np.testing.assert_allclose(rising + falling, 1.0, atol=1e-12)


def test_tile_starts_cover_with_at_least_the_overlap():
    for length in range(1, 200, 7):
        starts = tile_starts(length, 32, 12)
        assert starts[0] == 0 and min(starts[-1] + 32, length) == length
        assert all(b - a <= 32 - 12 for a, b in zip(starts, starts[1:], strict=False))


def test_bad_tiling_is_refused():
    with pytest.raises(InvalidOption, match="tile_overlap"):
        check_tiling(64, overlap=8, margin=4)  # needs overlap >= 2 * margin + 1
    with pytest.raises(InvalidOption, match="vae_tile"):
        check_tiling(20, overlap=12, margin=4)


def test_tiny_sd_vae_tiled_through_the_pipeline(tiny_sd):
    """The pipeline decodes in tiles when vae_tile is set; the tiny random VAE is globally coupled (module doc)."""
    from sdrt import Pipeline

    _, model_dir = tiny_sd
    tiled = Pipeline.load(model_dir, vae_tile=256)  # 32 latent cells
    plain = Pipeline.load(model_dir)
    latents = np.random.default_rng(2).standard_normal((1, 4, 64, 64)).astype(np.float32) * 0.18215
    a, b = tiled.decode(latents), plain.decode(latents)  # (1, 3, 512, 512)
    assert a.shape == b.shape == (1, 3, 512, 512) and np.isfinite(a).all()
    assert not np.array_equal(a, b)  # tiles did run
    assert np.abs(a - b).mean() * 127.5 < 10  # measured 4.0/255 mean (max 110/255): GroupNorm/attention coupling
    small = latents[:, :, :32, :32]  # no larger than a tile: decoded whole
    np.testing.assert_array_equal(tiled.decode(small), plain.decode(small))


def test_tiled_encode_matches_untiled_on_the_local_rule():
    """Encoding runs the same blend with 8 input pixels per latent cell: a pixel-space 8x8 average pool is exact."""

    class Pool:
        def run(self, feeds):
            x = feeds["sample"]  # (1, 3, H, W)
            b, c, h, w = x.shape
            mean = x.reshape(b, c, h // 8, 8, w // 8, 8).mean(axis=(3, 5))
            return {"latent_mean": mean, "latent_logvar": -mean}

    images = np.random.default_rng(3).uniform(-1, 1, (1, 3, 320, 256)).astype(np.float32)
    want = Pool().run({"sample": images})
    got = run_tiled(lambda t: Pool().run({"sample": t}), images, 16, 6, 2, 8, 1)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6)


def test_img2img_encodes_in_tiles_through_the_pipeline(tiny_sd, monkeypatch):
    """A 384 px init image with 256 px tiles: the VAE encoder runs on tiles (4 calls), the result has the size."""
    from PIL import Image

    from sdrt import Pipeline

    pipe = Pipeline.load(tiny_sd[1], vae_tile=256)
    encoder = pipe.engines["vae_encoder"]
    calls = []
    original = encoder.run
    monkeypatch.setattr(encoder, "run", lambda feeds: calls.append(feeds["sample"].shape) or original(feeds))
    init = Image.fromarray(np.random.default_rng(4).integers(0, 255, (384, 384, 3), dtype=np.uint8))
    images = pipe.generate("a cat", init_image=init, strength=0.5, steps=2, seed=1, progress=False)
    assert images[0].size == (384, 384)
    assert calls == [(1, 3, 256, 256)] * 4
