"""Upscalers: export of each ESRGAN-family architecture (graph vs the torch module within 1/255), A1111's tiling
(tiled vs untiled, seams), the non-model upscalers, and bad input (non-upscaler files, pickles with code)."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_upscalers import TINY_ARCHS, tiny_module

from sdrt.errors import InvalidOption, ModelError
from sdrt.export.upscaler import export_upscaler, load_upscaler
from sdrt.export.upscaler_arch import Arch, build
from sdrt.runtime.upscale import UpscalerModel, UpscalerSet, grid_origins, upscale_tiled

ONE_LEVEL = 1 / 255


def _image(size=(37, 29), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _torch_upscale(model, pixels: np.ndarray) -> np.ndarray:
    """The torch module on (H, W, 3) RGB [0, 1] as A1111 feeds it (BGR), clamped: (sH, sW, 3) RGB."""
    x = torch.from_numpy(np.ascontiguousarray(pixels[..., ::-1].transpose(2, 0, 1)))[None]
    with torch.no_grad():
        y = model(x)[0].numpy().transpose(1, 2, 0)[..., ::-1]
    return np.clip(y, 0, 1)


@pytest.mark.parametrize("name", [*TINY_ARCHS, "rrdb_x4_old", "rrdb_x4_st"])
def test_graph_matches_torch_module(tiny_upscalers, name):
    key = name.replace("_old", "").replace("_st", "")
    model = UpscalerModel(tiny_upscalers[name])
    assert model.scale == TINY_ARCHS[key].scale
    assert model.manifest["architecture"] == TINY_ARCHS[key].name
    assert model.multiple == getattr(TINY_ARCHS[key], "window", getattr(TINY_ARCHS[key], "unshuffle", 1))
    pixels = np.asarray(_image(), dtype=np.float32) / 255  # odd sides: the x2 net pads to its multiple of 2
    got = model.run(pixels)
    m = model.multiple
    padded = np.pad(pixels, ((0, -29 % m), (0, -37 % m), (0, 0)), "reflect")
    want = _torch_upscale(tiny_module(key), padded)
    want = want[: got.shape[0], : got.shape[1]]
    assert got.shape == (29 * model.scale, 37 * model.scale, 3)
    assert np.abs(got - want).max() <= ONE_LEVEL
    assert want.std() > 0.05  # the outputs are not flat (a test on a constant image could not fail)


def test_wrong_weights_differ(tiny_upscalers):
    """Can-fail twin: another seed's module is far from the graph."""
    pixels = np.asarray(_image(), dtype=np.float32) / 255
    got = UpscalerModel(tiny_upscalers["rrdb_x4"]).run(pixels)
    assert np.abs(got - _torch_upscale(tiny_module("rrdb_x4", seed=1), pixels)).max() > 10 * ONE_LEVEL


def test_old_layout_loads_the_same_weights(tiny_upscaler_files):
    new, _ = load_upscaler(tiny_upscaler_files["rrdb_x4"])
    old, arch = load_upscaler(tiny_upscaler_files["rrdb_x4_old"])
    assert arch == TINY_ARCHS["rrdb_x4"]
    for (k, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_realesrgan_x4plus_size():
    """RRDBNet at Real-ESRGAN x4plus's sizes (nf 64, 23 blocks, gc 32) has its published 16,697,987 parameters."""
    model = build(Arch("ESRGAN", 4, 3, 3, features=64, blocks=23, growth=32))
    assert sum(p.numel() for p in model.parameters()) == 16_697_987


def test_grid_matches_a1111_split_grid():
    # A1111 split_grid(w=500, tile 192, overlap 8): cols = ceil(492 / 184) = 3, dx = 154 -> 0, 154, 308
    assert grid_origins(500, 192, 8) == [0, 154, 308]
    assert grid_origins(192, 192, 8) == [0]


def test_tiled_against_untiled(tiny_upscalers):
    """Tiles of 24 px overlapping by 8 against one run. The net sees 4 px past a tile's edge, where the tile was
    cut, and A1111's linear ramp still gives those pixels up to about half the weight: measured max 0.043, mean 1e-3
    on noise. The documented tolerance: max 0.06 and mean under 1/255 at overlap 8, the error halving as the
    overlap doubles; without overlap the seams show (max 0.38: the can-fail twin)."""
    model = UpscalerModel(tiny_upscalers["compact_prelu"])
    pixels = np.asarray(_image((70, 53)), dtype=np.float32) / 255
    whole = model.run(pixels)
    error = {ov: np.abs(upscale_tiled(model.run, pixels, model.scale, 24, ov) - whole) for ov in (0, 8, 16)}
    assert error[8].max() <= 0.06 and error[8].mean() <= ONE_LEVEL
    assert error[16].max() <= 0.6 * error[8].max()
    assert error[0].max() > 0.2
    assert error[8][:56, :56].max() < 1e-5  # before the first seams (tiles at x 0, 15, ..., y 0, 14, ...): exact


def test_builtin_upscalers():
    upscalers = UpscalerSet()
    image = _image((64, 48))
    assert upscalers.upscale(image, "Lanczos", 2).size == (128, 96)
    near = upscalers.upscale(image, "Nearest", 2)
    assert np.array_equal(np.asarray(near)[::2, ::2], np.asarray(image))
    assert upscalers.upscale(image, "None", 2).size == (128, 96)  # None: Lanczos to the size, as A1111
    assert upscalers.upscale(image, "Lanczos", 1.3).size == (80, 56)  # (64 * 1.3) // 8 * 8 = 80, 62.4 -> 56


def test_model_upscaler_runs_until_the_scale(tiny_upscalers):
    upscalers = UpscalerSet(tile=16, overlap=4)
    upscalers.load_dir(tiny_upscalers["compact_lrelu"].parent)
    assert "compact_lrelu" in upscalers.names and upscalers.names[:3] == ["None", "Lanczos", "Nearest"]
    out = upscalers.upscale(_image((20, 16)), "compact_lrelu", 3.2)  # x2 twice, then Lanczos down to 64 x 48
    assert out.size == (64, 48)
    with pytest.raises(InvalidOption, match="compact_prelu"):
        upscalers.check("hr_upscaler", "4x-UltraSharp")


def test_non_upscaler_file_is_refused(tmp_path):
    bad = tmp_path / "notes.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ModelError, match="not an upscaler"):
        export_upscaler(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["notes.pth"]


class _Code:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"params_ema": {"conv_first.weight": _Code()}}))
    with pytest.raises(ModelError, match="could run code"):
        export_upscaler(evil, tmp_path / "out")
    assert "ran code" not in capsys.readouterr().out and not (tmp_path / "out").exists()


def test_manifest_facts(tiny_upscalers):
    manifest = json.loads((tiny_upscalers["rrdb_x2"] / "upscaler.json").read_text())
    assert (manifest["scale"], manifest["size_multiple"], manifest["in_channels"]) == (2, 2, 3)
    assert (manifest["tile"], manifest["tile_overlap"], manifest["channel_order"]) == (192, 8, "BGR")


def _a1111_swinir(model, image: Image.Image, tile: int, overlap: int, window: int, scale: int) -> np.ndarray:
    """A1111's SwinIR upscale in torch (extensions-builtin/SwinIR: mirror padding past the next window multiple,
    tiles averaged where they overlap, BGR, rounded), as the reference of the runtime's "average" tiling."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)[..., ::-1].transpose(2, 0, 1).copy() / 255)[None]
    h, w = x.shape[2:]
    x = torch.cat([x, torch.flip(x, [2])], 2)[:, :, : (h // window + 1) * window]
    x = torch.cat([x, torch.flip(x, [3])], 3)[:, :, :, : (w // window + 1) * window]
    ph, pw = x.shape[2:]
    tile = min(tile, ph, pw)
    total, count = torch.zeros(1, 3, ph * scale, pw * scale), torch.zeros(1, 3, ph * scale, pw * scale)
    with torch.no_grad():
        for y in [*range(0, ph - tile, tile - overlap), ph - tile]:
            for x0 in [*range(0, pw - tile, tile - overlap), pw - tile]:
                out = model(x[..., y : y + tile, x0 : x0 + tile])
                total[..., y * scale : (y + tile) * scale, x0 * scale : (x0 + tile) * scale] += out
                count[..., y * scale : (y + tile) * scale, x0 * scale : (x0 + tile) * scale] += 1
    out = (total / count)[0, :, : h * scale, : w * scale].clamp(0, 1).numpy()[[2, 1, 0]].transpose(1, 2, 0)
    return (out * 255).round().astype(np.uint8)


def test_swinir_tiling_matches_a1111(tiny_upscalers):
    """The "average" tiling of SwinIR against A1111's torch code on the same module: within one 8-bit level."""
    model = UpscalerModel(tiny_upscalers["swinir_x2"])
    assert model.averaged
    image = _image((30, 21))
    got = np.asarray(model.upscale_once(image, 12, 4), dtype=np.int16)
    want = _a1111_swinir(tiny_module("swinir_x2"), image, 12, 4, 4, 2).astype(np.int16)
    assert got.shape == want.shape == (42, 60, 3)
    assert np.abs(got - want).max() <= 1
    other = _a1111_swinir(tiny_module("swinir_x2"), image, 12, 0, 4, 2).astype(np.int16)  # can-fail: no overlap
    assert np.abs(got - other).max() > 4


def test_openvino_runs_the_graph(tiny_upscalers):
    pytest.importorskip("openvino")
    pixels = np.asarray(_image(), dtype=np.float32) / 255
    cpu = UpscalerModel(tiny_upscalers["rrdb_x4"]).run(pixels)
    assert np.abs(UpscalerModel(tiny_upscalers["rrdb_x4"], "openvino-f32").run(pixels) - cpu).max() <= ONE_LEVEL


TRANSFORMERS = [k for k in TINY_ARCHS if k.startswith(("swin2sr", "hat"))]


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_upscalers_tiled_against_untiled(tiny_upscalers, name):
    """A1111's grid tiling (24 px tiles, overlap 8) of the window-attention nets against one run of the graph. Their
    receptive field is wider than a conv net's (shifted windows; HAT's channel attention averages the whole tile, so
    no pixel of a tile is exact): documented tolerance max 0.1 and mean under 1/255 at overlap 8 (measured: Swin2SR
    up to 0.045 / 3e-3, HAT up to 0.074 / 2.7e-3); without overlap the seams show (0.2 to 0.56: the can-fail twin)."""
    model = UpscalerModel(tiny_upscalers[name])
    assert not model.averaged  # SwinIR alone takes A1111's SwinIR extension's averaged tiles
    m = model.multiple
    pixels = np.asarray(_image((70, 53)), dtype=np.float32) / 255
    pixels = np.pad(pixels, ((0, -53 % m), (0, -70 % m), (0, 0)), "reflect")
    whole = model.run(pixels)
    tile = 24 // m * m
    error = {ov: np.abs(upscale_tiled(model.run, pixels, model.scale, tile, ov) - whole) for ov in (0, 8)}
    assert error[8].max() <= 0.1 and error[8].mean() <= ONE_LEVEL
    assert error[0].max() > 0.15


def test_unsupported_swin2sr_kind_is_named(tiny_upscaler_files, tmp_path):
    state = torch.load(tiny_upscaler_files["swin2sr_x2"], weights_only=True)["params_ema"]
    state["conv_after_body_hf.weight"] = torch.zeros(16, 16, 3, 3)
    torch.save(state, tmp_path / "hf.pth")
    with pytest.raises(ModelError, match="Swin2SR with the pixelshuffle_hf upsampler is not supported"):
        export_upscaler(tmp_path / "hf.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("depths, dim, cab, params", [
    ((6,) * 6, 144, 6, 9_621_183),  # HAT-S: compress ratio 24, squeeze factor 24
    ((6,) * 6, 180, 60, 20_772_507),  # HAT: compress ratio 3, squeeze factor 30
    ((6,) * 12, 180, 60, 40_846_575),  # HAT-L
])  # fmt: skip
def test_hat_sizes_have_the_published_parameter_counts(depths, dim, cab, params):
    """HAT at the x4 configurations of the paper (window 16, overlap ratio 0.5, MLP ratio 2) has its published sizes
    (9.6 M, 20.8 M, 40.8 M; exact counts of the official code's modules)."""
    from sdrt.export.upscaler_hat import HAT, HATArch

    arch = HATArch(4, 3, dim, depths, (6,) * len(depths), 16, 24, 2 * dim, cab, 6)
    assert sum(p.numel() for p in HAT(arch).parameters()) == params


def test_dat_is_refused_by_name(tmp_path):
    state = {"conv_first.weight": torch.zeros(8, 3, 3, 3), "before_RG.1.weight": torch.zeros(8),
             "layers.0.blocks.0.attn.attns.0.pos.pos_proj.weight": torch.zeros(2, 2)}  # fmt: skip
    torch.save(state, tmp_path / "dat.pth")
    with pytest.raises(ModelError, match=r"DAT \(Dual Aggregation Transformer\) is not supported.*HAT.*"
                                         r"through spandrel: pip install 'sdrt\[spandrel\]'"):  # fmt: skip
        export_upscaler(tmp_path / "dat.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _FakeSpandrel:
    """Stands in for spandrel (not installed here) to check how the export answers what it reports."""

    class UnsupportedModelError(Exception):
        pass

    class ImageModelDescriptor:
        def __init__(self, purpose: str):
            self.purpose, self.architecture = purpose, type("A", (), {"name": "GFPGAN"})

    def __init__(self, purpose: str | None):
        self.purpose = purpose

    def ModelLoader(self):  # noqa: N802 - spandrel's name
        fake = self

        class Loader:
            def load_from_state_dict(self, state):
                if fake.purpose is None:
                    raise fake.UnsupportedModelError()
                return fake.ImageModelDescriptor(fake.purpose)

        return Loader()


@pytest.mark.parametrize("purpose, message", [
    (None, "not an upscaler sdrt can export.*spandrel detects no architecture in it either"),
    ("FaceSR", "is a GFPGAN model for FaceSR, not an upscaler"),
])  # fmt: skip
def test_through_spandrel_refusals(monkeypatch, tmp_path, purpose, message):
    """With spandrel installed, a file neither sdrt nor spandrel exports (nothing detected, or a face restorer) is
    one clear error and nothing is written."""
    import sys

    from sdrt.export import upscaler_spandrel

    monkeypatch.setitem(sys.modules, "spandrel", _FakeSpandrel(purpose))
    monkeypatch.setattr(upscaler_spandrel, "available", lambda: True)
    torch.save({"some.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match=message):
        export_upscaler(tmp_path / "other.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()
