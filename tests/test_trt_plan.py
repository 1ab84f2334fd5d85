"""GPU engine planning (engines/plan.py, engine_files.py): profiles, cache keys, refused engines, buffers, budgets."""

import pytest

from sdrt.engines.engine_files import EngineIdentity, select_engine, source_fingerprint
from sdrt.engines.plan import (
    ALIGNMENT,
    TEXT_WINDOW,
    ShapeRanges,
    StageCost,
    buffer_plan,
    check_ranges,
    io_tensors,
    parse_range,
    parse_size,
    plan_profile,
    plan_vram,
    profile_covers,
    shared_workspace,
)
from sdrt.runtime.errors import InvalidOption, ModelError
from sdrt.runtime.modelspec import text_encoder_spec, unet_spec, vae_decoder_spec

GiB = 2**30
UNET_INPUTS = unet_spec(4, 4, 768).to_json()["inputs"]
UNET_OUTPUTS = unet_spec(4, 4, 768).to_json()["outputs"]


def test_dynamic_unet_profile_doubles_batch_and_uses_77k_tokens():
    ranges = ShapeRanges(batch=(1, 1, 4), height=(256, 512, 1024), width=(256, 768, 1024), text_windows=(1, 1, 3))
    profile = plan_profile("unet", UNET_INPUTS, ranges, 8)
    assert profile["sample"] == ((1, 4, 32, 32), (2, 4, 64, 96), (8, 4, 128, 128))
    assert profile["timestep"] == ((1,), (2,), (8,))
    assert profile["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (8, 231, 768))
    assert all(s[1] % TEXT_WINDOW == 0 for s in profile["encoder_hidden_states"])


def test_static_profile_is_one_shape():
    ranges = ShapeRanges.static(batch=1, height=512, width=512)
    assert ranges.is_static
    profile = plan_profile("unet", UNET_INPUTS, ranges, 8)
    assert all(lo == opt == hi for lo, opt, hi in profile.values())
    assert profile["sample"][0] == (2, 4, 64, 64)
    unguided = plan_profile("unet", UNET_INPUTS, ranges, 8, guided=False)
    assert unguided["sample"][0] == (1, 4, 64, 64)


def test_text_encoder_and_vae_profiles():
    ranges = ShapeRanges(text_windows=(1, 2, 3))
    te = plan_profile("text_encoder", text_encoder_spec("text_encoder", 768, 12, 768).to_json()["inputs"], ranges, 8)
    assert te["inputs_embeds"] == ((1, 77, 768), (4, 77, 768), (6, 77, 768))
    assert te["eos_index"] == ((1,), (4,), (6,))
    vae = plan_profile("vae_decoder", vae_decoder_spec(4).to_json()["inputs"], ranges, 8)
    assert vae["latent_sample"] == ((1, 4, 32, 32), (1, 4, 64, 64), (1, 4, 128, 128))


def test_profile_covers():
    profile = plan_profile("unet", UNET_INPUTS, ShapeRanges(), 8)
    inside = {"sample": (2, 4, 80, 48), "timestep": (2,), "encoder_hidden_states": (2, 154, 768)}
    assert profile_covers(profile, inside)
    assert not profile_covers(profile, {**inside, "sample": (2, 4, 136, 48)})  # 1088 px > 1024
    assert not profile_covers(profile, {**inside, "encoder_hidden_states": (2, 308, 768)})  # 4 windows > 3


@pytest.mark.parametrize(
    "field,ranges",
    [
        ("height", ShapeRanges(height=(512, 256, 1024))),  # min > opt
        ("width", ShapeRanges(width=(250, 512, 1024))),  # not a multiple of 8
        ("batch", ShapeRanges(batch=(0, 1, 4))),
        ("text_windows", ShapeRanges(text_windows=(1, 1, 9))),
    ],
)
def test_bad_ranges_name_the_field(field, ranges):
    with pytest.raises(InvalidOption, match=field):
        check_ranges(ranges)


def test_parse_range():
    assert parse_range("height", "512") == (512, 512, 512)
    assert parse_range("height", "256-1024") == (256, 256, 1024)
    assert parse_range("height", "256:512:1024") == (256, 512, 1024)
    with pytest.raises(InvalidOption, match="height"):
        parse_range("height", "big")


def identity(**changes) -> EngineIdentity:
    fields = dict(
        model="unet",
        compute_capability="8.6",
        trt_version="10.8.0",
        precision="fp16",
        profile=plan_profile("unet", UNET_INPUTS, ShapeRanges(), 8),
        source_hash="abc",
    )
    return EngineIdentity(**{**fields, **changes})


def test_cache_key_changes_with_every_field_and_round_trips():
    base = identity()
    changed = [
        identity(compute_capability="9.0"),
        identity(trt_version="10.9.0"),
        identity(precision="fp32"),
        identity(source_hash="abd"),
        identity(profile=plan_profile("unet", UNET_INPUTS, ShapeRanges.static(1, 512, 512), 8)),
        identity(options={"weight_streaming": True}),
    ]
    keys = {base.key(), *(c.key() for c in changed)}
    assert len(keys) == 1 + len(changed)
    assert EngineIdentity.from_json(base.to_json()).key() == base.key()


def test_engine_for_another_gpu_or_trt_version_is_refused_with_the_rebuild_offered():
    others = [identity(compute_capability="8.9"), identity(trt_version="10.3.0")]
    with pytest.raises(ModelError) as e:
        select_engine(others, "unet", "8.6", "10.8.0", "abc", model_dir="/m")
    message = str(e.value)
    assert "compute capability 8.9, this GPU is 8.6" in message
    assert "TensorRT 10.3.0, this is TensorRT 10.8.0" in message
    assert "sdrt build /m" in message


def test_select_prefers_a_static_engine_that_covers_the_shapes():
    dynamic = identity()
    static = identity(profile=plan_profile("unet", UNET_INPUTS, ShapeRanges.static(1, 512, 512), 8))
    shapes_512 = {"sample": (2, 4, 64, 64), "timestep": (2,), "encoder_hidden_states": (2, 77, 768)}
    assert select_engine([dynamic, static], "unet", "8.6", "10.8.0", "abc", shapes_512) is static
    shapes_768 = {**shapes_512, "sample": (2, 4, 96, 96)}
    assert select_engine([dynamic, static], "unet", "8.6", "10.8.0", "abc", shapes_768) is dynamic
    streaming = identity(options={"weight_streaming": True})
    assert select_engine([dynamic, streaming], "unet", "8.6", "10.8.0", "abc", streaming=True) is streaming
    assert select_engine([streaming, dynamic], "unet", "8.6", "10.8.0", "abc") is dynamic
    with pytest.raises(ModelError, match="sdrt build --weight-streaming"):
        select_engine([dynamic, static], "unet", "8.6", "10.8.0", "abc", streaming=True)
    with pytest.raises(ModelError, match="another export"):
        select_engine([dynamic], "unet", "8.6", "10.8.0", "changed")
    with pytest.raises(ModelError, match="no TensorRT engine for vae_decoder"):
        select_engine([dynamic], "vae_decoder", "8.6", "10.8.0", "abc")


def test_source_fingerprint_follows_content(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"x" * 1000)
    first = source_fingerprint(f)
    f.write_bytes(b"y" * 1000)
    assert source_fingerprint(f) != first
    (tmp_path / "model.onnx.data").write_bytes(b"z")
    assert source_fingerprint(f) != first


def test_buffer_plan_aligns_every_tensor():
    profile = plan_profile("unet", UNET_INPUTS, ShapeRanges.static(1, 512, 512), 8)
    axes = {"batch": (2, 2, 2), "latent_height": (64,) * 3, "latent_width": (64,) * 3}
    tensors = io_tensors(UNET_INPUTS, UNET_OUTPUTS, profile, axes, dtypes={"sample": "float16"})
    offsets, total = buffer_plan(tensors)
    assert offsets["sample"] == (0, 2 * 4 * 64 * 64 * 2)  # fp16
    assert all(offset % ALIGNMENT == 0 for offset, _ in offsets.values())
    assert offsets["timestep"][1] == 8 and offsets["out_sample"][1] == 2 * 4 * 64 * 64 * 4
    assert total >= sum(size for _, size in offsets.values())
    assert shared_workspace({"unet": 1000, "vae": 3000, "te": 10}) == 3072


@pytest.mark.parametrize(
    "text,want", [("2GB", 2 * GiB), ("1.5 GiB", int(1.5 * GiB)), ("3000MB", 3000 * 2**20), (12345, 12345)]
)
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["", "two GB", "-1GB", 0, True, None])
def test_parse_size_refuses(bad):
    with pytest.raises(InvalidOption, match="vram_budget"):
        parse_size(bad)


SD15 = {  # fp16 bytes: text encoder 246 MB, UNet 1.72 GB, VAE decoder 99 MB (weights); activations at 512x512
    "text_encoder": StageCost(246 * 2**20, 64 * 2**20),
    "unet": StageCost(1720 * 2**20, 1000 * 2**20, streamable=1720 * 2**20),
    "vae_decoder": StageCost(99 * 2**20, 2500 * 2**20),
}


def test_budget_plans_escalate():
    roomy = plan_vram(8 * GiB, SD15)
    assert not roomy.staged and roomy.unet_streaming_budget is None and roomy.vae_tile is None
    two = plan_vram(2 * GiB, SD15)
    assert two.staged and two.unet_streaming_budget is not None and two.vae_tile is not None
    assert two.unet_streaming_budget <= 2 * GiB - 300 * 2**20 - 1000 * 2**20
    assert two.peak <= 2 * GiB
    big_vae = {**SD15, "vae_decoder": StageCost(99 * 2**20, 4000 * 2**20)}
    three = plan_vram(3.2 * GiB, big_vae)
    assert three.staged and three.unet_streaming_budget is None  # the UNet fits alone; the VAE is tiled
    assert three.vae_tile is not None and three.vae_tile < 64 and three.peak <= 3.2 * GiB


def test_budget_too_small_is_refused_with_the_minimum():
    with pytest.raises(InvalidOption, match=r"vram_budget.*at least"):
        plan_vram(1 * GiB, SD15)
