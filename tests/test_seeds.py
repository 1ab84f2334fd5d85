"""A1111 seeds: GPU/NV noise (Philox), variation seeds, seed resize, ENSD, their infotext, options and CLI flags.

What is verified here, and how (this machine has no GPU):
- Philox4x32-10: Random123's known-answer vectors (examples/kat_vectors), exactly.
- Box-Muller: pairs computed by hand from r = sqrt(-2 ln u), (r sin v, r cos v), u = (2x + 1) / 2^33.
- rng="nv": A1111's published output of Generator(seed=0).randn((3, 4)) (docstring of modules/rng_philox.py), to
  3e-7. During development sdrt's NV stream was also compared with A1111's own code on many seeds and shapes and
  was bit-identical; that code is not vendored, so the suite keeps only the published anchor.
- rng="gpu": the same anchor to 7e-7, and torch's grid-stride layout by hand. Against torch's CUDA randn only in
  test_gpu_stream_matches_torch_cuda, which runs where an NVIDIA GPU and a CUDA torch are present.
- Variation seeds, seed resize and ENSD: by construction from the generators, and end to end on the tiny model.
"""

import math

import numpy as np
import pytest
from PIL import Image

from sdrt.cli import main
from sdrt.runtime.errors import InvalidOption
from sdrt.runtime.rng import (
    A1111NVGenerator,
    ImageNoise,
    TorchCPUGenerator,
    TorchCUDAGenerator,
    a1111_nv_box_muller,
    curand_box_muller,
    make_generator,
    paste_centered,
    philox4x32,
    slerp,
)

PROMPT = "a photo of a grey squirrel"
SHAPE = (4, 8, 8)  # one 64x64 image's latent
PIXEL_TOL = 2  # /255, as in test_parity
RNGS = ["torch", "cpu", "gpu", "nv"]

# Random123 examples/kat_vectors, "philox4x32 10" lines: counter (4 words), key (2 words) -> output (4 words).
PHILOX_KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),  # the hex digits of pi
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
# A1111 modules/rng_philox.py docstring: Generator(seed=0).randn(shape=(3, 4)), "Expected output".
A1111_NV_SEED0 = [
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KATS, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, expected):
    words = philox4x32([np.array([c], np.uint32) for c in counter], key)
    assert words.dtype == np.uint32 and words.shape == (4, 1)
    assert [int(w) for w in words[:, 0]] == list(expected)


def test_philox_columns_are_independent_counters():
    """A (4, N) counter array gives each column's own block: the vectorised form is N single calls."""
    columns = [np.array(row, np.uint32) for row in zip(*(kat[0] for kat in PHILOX_KATS), strict=True)]  # (4, 3)
    together = philox4x32(columns, (7, 9))
    for j, (counter, _, _) in enumerate(PHILOX_KATS):
        alone = philox4x32([np.array([c], np.uint32) for c in counter], (7, 9))
        np.testing.assert_array_equal(together[:, j], alone[:, 0])
    assert not np.array_equal(together, philox4x32(columns, (7, 8)))  # the key matters


def _words(*values):
    return np.array(values, dtype=np.uint32)


def test_box_muller_hand_computed():
    """u = (2x + 1) / 2^33, v = (2y + 1) pi / 2^32, pair = sqrt(-2 ln u) (sin v, cos v), worked out by hand."""
    # x = 2^31: u = 1/2 + 2^-33, r = sqrt(2 ln 2 - 2^-31) ~ 1.1774100; y = 2^30: v = pi/2 + pi/2^32, so sin v ~ 1
    # and cos v = -sin(pi/2^32) ~ -7.3e-10.
    r = math.sqrt(-2 * math.log(0.5 + 2**-33))
    assert r == pytest.approx(1.1774100225, abs=1e-9)
    sin, cos = curand_box_muller(_words(2**31), _words(2**30))
    assert sin.dtype == np.float32 and sin[0] == pytest.approx(r, abs=2e-7) and abs(cos[0]) < 1e-7
    assert a1111_nv_box_muller(_words(2**31), _words(2**30))[0] == np.float32(r)  # float64 path: correctly rounded
    # x = y = 0: u = 2^-33, r = sqrt(66 ln 2) ~ 6.7637; v = pi / 2^32, so (r sin v, r cos v) ~ (4.9e-9, r).
    r0 = math.sqrt(66 * math.log(2))
    sin, cos = curand_box_muller(_words(0), _words(0))
    assert cos[0] == pytest.approx(r0, abs=1e-6) and abs(sin[0]) < 1e-7
    # x = 2^32 - 1: in float32 x rounds to 2^32, u to 1.0 and r to exactly 0 (the GPU's float path); A1111's float64
    # path keeps u = 1 - 2^-33, r = sqrt(2^-32) = 2^-16.
    sin, cos = curand_box_muller(_words(2**32 - 1), _words(2**30))
    assert sin[0] == 0 and cos[0] == 0
    assert a1111_nv_box_muller(_words(2**32 - 1), _words(2**30))[0] == pytest.approx(2**-16, rel=1e-6)


def test_nv_and_gpu_match_a1111_published_output():
    """A1111's example: within 3e-7 for NV (its own code gives the same bits as sdrt), 7e-7 for the float32 path."""
    np.testing.assert_allclose(A1111NVGenerator(0).randn((3, 4)), A1111_NV_SEED0, atol=3e-7, rtol=0)
    np.testing.assert_allclose(TorchCUDAGenerator(0).randn((3, 4)), A1111_NV_SEED0, atol=7e-7, rtol=0)
    assert np.abs(TorchCPUGenerator(0).randn((3, 4)) - A1111_NV_SEED0).max() > 0.5  # the CPU stream is another one


def test_gpu_and_nv_share_the_stream_while_every_draw_fits_the_grid():
    """Element i of call k is Philox counter (k, 0, i, 0) in both, so they differ only by Box-Muller arithmetic."""
    gpu, nv = TorchCUDAGenerator(42), A1111NVGenerator(42)
    for shape in [SHAPE, (4, 64, 64), (5,), SHAPE]:
        a, b = gpu.randn(shape), nv.randn(shape)
        assert a.shape == b.shape == shape and a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=0)  # ~1e-6 typically; more where float32 rounds u near 1
        assert np.mean(np.abs(a - b) < 1e-6) > 0.99
    assert np.abs(TorchCUDAGenerator(43).randn(SHAPE) - TorchCUDAGenerator(42).randn(SHAPE)).max() > 0.5


def test_gpu_grid_stride_layout_by_hand():
    """One resident block (256 threads, T = 256): a curand_normal4 call of thread t fills t, t+T, t+2T, t+3T."""
    seed, threads = 7, 256
    n = 4 * threads + 300  # two calls per thread: torch advances the offset by 8 words
    g = TorchCUDAGenerator(seed, resident_blocks=1)
    values = g.randn((n,))

    def normals(call, thread):  # the 4 normals of one curand_normal4 call, by hand
        words = philox4x32([_words(call), _words(0), _words(thread), _words(0)], (seed, 0))[:, 0]
        (s01, c01), (s23, c23) = curand_box_muller(words[0:1], words[1:2]), curand_box_muller(words[2:3], words[3:4])
        return [s01[0], c01[0], s23[0], c23[0]]

    for element, (call, thread, component) in {
        0: (0, 0, 0),
        threads + 3: (0, 3, 1),
        2 * threads + 5: (0, 5, 2),
        3 * threads + 9: (0, 9, 3),
        4 * threads + 17: (1, 17, 0),
    }.items():
        assert values[element] == normals(call, thread)[component]
    assert g.offset == 8
    assert g.randn((3,))[0] == normals(2, 0)[0]  # the next randn starts at counter 2
    # Without the limit (a large GPU) the same draw is element i = thread i's first normal.
    assert TorchCUDAGenerator(seed).randn((n,))[threads + 3] == normals(0, threads + 3)[0]


def test_philox_seeds_keep_64_bits():
    """torch's CUDA generator keys Philox with the whole 64-bit seed (the CPU one keeps 32 bits)."""
    for gen in (TorchCUDAGenerator, A1111NVGenerator):
        assert not np.array_equal(gen(2**32 + 5).randn(SHAPE), gen(5).randn(SHAPE))
    np.testing.assert_array_equal(TorchCPUGenerator(2**32 + 5).randn(SHAPE), TorchCPUGenerator(5).randn(SHAPE))


@pytest.mark.gpu
def test_gpu_stream_matches_torch_cuda():
    """rng="gpu" against torch.randn on this GPU, with its resident block count: within 1e-5 (sincos approximation)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA")
    props = torch.cuda.get_device_properties(0)
    resident = props.multi_processor_count * (getattr(props, "max_threads_per_multi_processor", 2048) // 256)
    for seed in (0, 42, 2**32 + 5):
        ref = torch.Generator("cuda").manual_seed(seed)
        ours = TorchCUDAGenerator(seed, resident_blocks=resident)
        for shape in [(4, 64, 64), (3,), (4, 128, 128), (4, 64, 64), (7, 1000, 100)]:  # the last spans many calls
            want = torch.randn(shape, generator=ref, device="cuda").cpu().numpy()
            np.testing.assert_allclose(ours.randn(shape), want, atol=1e-5, rtol=0)


# --- slerp and seed resize ---------------------------------------------------------------------------------------


def test_slerp_endpoints_and_a_hand_case():
    rng = np.random.default_rng(0)
    low, high = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
    np.testing.assert_array_equal(slerp(0.0, low, high), low)
    np.testing.assert_array_equal(slerp(1.0, low, high), high)
    # Orthogonal columns [3, 0] and [0, 5] (C=1, H=2, W=1): omega = pi/2, t = 1/2 -> sin(pi/4) (low + high).
    low1, high1 = np.array([[[3.0], [0.0]]], np.float32), np.array([[[0.0], [5.0]]], np.float32)
    np.testing.assert_allclose(slerp(0.5, low1, high1)[0, :, 0], [3 * math.sqrt(0.5), 5 * math.sqrt(0.5)], rtol=1e-6)
    # Equal inputs take A1111's linear branch and give the input back.
    np.testing.assert_array_equal(slerp(0.3, low, low), low)


def test_slerp_works_column_by_column_along_height():
    """A1111 normalises with dim=1 of the (C, H, W) noise: one angle per (channel, column), computed here in a loop."""
    rng = np.random.default_rng(1)
    low, high = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    t = 0.3
    want = np.empty(SHAPE)
    for c in range(SHAPE[0]):
        for w in range(SHAPE[2]):
            a, b = low[c, :, w], high[c, :, w]
            omega = math.acos(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            want[c, :, w] = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    got = slerp(t, low.astype(np.float32), high.astype(np.float32))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-6)
    whole = math.acos(np.sum(low * high) / (np.linalg.norm(low) * np.linalg.norm(high)))  # one angle for everything
    one_angle = (math.sin((1 - t) * whole) * low + math.sin(t * whole) * high) / math.sin(whole)
    assert np.abs(got - one_angle).max() > 0.05


def test_paste_centered_by_hand():
    patch = np.arange(1 * 4 * 4, dtype=np.float32).reshape(1, 4, 4)
    out = paste_centered(np.full((1, 8, 6), -1, np.float32), patch)  # bigger canvas: offsets (2, 1)
    np.testing.assert_array_equal(out[:, 2:6, 1:5], patch)
    assert (out == -1).sum() == 8 * 6 - 16
    small = paste_centered(np.zeros((1, 2, 3), np.float32), patch)  # smaller: the centre crop
    # dy = (2 - 4) // 2 = -1, dx = (3 - 4) // 2 = -1: a 2x2 crop from (1, 1) into the canvas corner.
    np.testing.assert_array_equal(small[:, :, :2], patch[:, 1:3, 1:3])
    assert not small[:, :, 2].any()  # A1111's floor division leaves the canvas's last column as it was


# --- ImageNoise: A1111's ImageRNG ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rng", RNGS)
def test_plain_seeds_are_each_generators_draws(rng):
    noise = ImageNoise(rng, SHAPE, [5, 9])
    first, second = noise.initial(), noise()
    assert first.shape == (2, *SHAPE) and first.dtype == np.float32
    for i, seed in enumerate([5, 9]):
        g = make_generator(rng, seed)
        np.testing.assert_array_equal(first[i], g.randn(SHAPE))
        np.testing.assert_array_equal(second[i], g.randn(SHAPE))


@pytest.mark.parametrize("rng", ["torch", "gpu"])
def test_variation_seed_is_a_slerp_of_fresh_streams(rng):
    noise = ImageNoise(rng, SHAPE, [5, 5], [20, 21], subseed_strength=0.25)
    first, second = noise.initial(), noise()
    for i, subseed in enumerate([20, 21]):
        want = slerp(0.25, make_generator(rng, 5).randn(SHAPE), make_generator(rng, subseed).randn(SHAPE))
        np.testing.assert_array_equal(first[i], want)
    g = make_generator(rng, 5)
    g.randn(SHAPE)
    np.testing.assert_array_equal(second[0], g.randn(SHAPE))  # per-step noise still comes from the seed
    plain = ImageNoise(rng, SHAPE, [5], [20], subseed_strength=0.0).initial()
    np.testing.assert_array_equal(plain[0], make_generator(rng, 5).randn(SHAPE))  # strength 0: the subseed is unused


def test_seed_resize_pastes_the_seeds_noise_at_its_first_size():
    # From a 96x96 image (12x12 latent) to 64x64: the centre of the seed's 12x12 noise.
    noise = ImageNoise("torch", SHAPE, [3], resize_from=(12, 12))
    first, second = noise.initial()[0], noise()[0]
    np.testing.assert_array_equal(first, TorchCPUGenerator(3).randn((4, 12, 12))[:, 2:10, 2:10])
    g = TorchCPUGenerator(3)
    g.randn(SHAPE)  # the image's own generator drew one full-size tensor, as in A1111
    np.testing.assert_array_equal(second, g.randn(SHAPE))
    # From 48x48 (6x6): the seed's 6x6 noise in the middle, the rest from the generator's own full-size draw.
    first = ImageNoise("torch", SHAPE, [3], resize_from=(6, 6)).initial()[0]
    np.testing.assert_array_equal(first[:, 1:7, 1:7], TorchCPUGenerator(3).randn((4, 6, 6)))
    border = TorchCPUGenerator(3).randn(SHAPE)
    np.testing.assert_array_equal(first[:, 0], border[:, 0])
    # The same size as the image changes nothing.
    same = ImageNoise("torch", SHAPE, [3], resize_from=(8, 8)).initial()
    np.testing.assert_array_equal(same[0], TorchCPUGenerator(3).randn(SHAPE))


@pytest.mark.parametrize("rng", ["torch", "nv"])
def test_ensd_reseeds_the_per_step_noise_only(rng):
    noise = ImageNoise(rng, SHAPE, [5, 6], ensd=31337)
    first, second = noise.initial(), noise()
    np.testing.assert_array_equal(first, ImageNoise(rng, SHAPE, [5, 6]).initial())
    for i, seed in enumerate([5, 6]):
        np.testing.assert_array_equal(second[i], make_generator(rng, seed + 31337).randn(SHAPE))
    given = ImageNoise(rng, SHAPE, [5], ensd=31337)  # latents given: nothing drawn, ENSD still applies
    given.skip_initial()
    np.testing.assert_array_equal(given()[0], make_generator(rng, 5 + 31337).randn(SHAPE))


def test_image_noise_is_the_same_alone_or_in_a_batch():
    kw = dict(subseed_strength=0.4, resize_from=(10, 6), ensd=7)
    batch = ImageNoise("gpu", SHAPE, [1, 1, 1], [30, 31, 32], **kw)
    alone = ImageNoise("gpu", SHAPE, [1], [31], **kw)
    np.testing.assert_array_equal(batch.initial()[1], alone.initial()[0])
    np.testing.assert_array_equal(batch()[1], alone()[0])


# --- end to end on the tiny model ----------------------------------------------------------------------------------


def run(pipeline, **kw):
    kw = {"width": 64, "height": 64, "steps": 3, "seed": 11, "progress": False, **kw}
    return pipeline.generate(PROMPT, **kw)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def params(image) -> dict[str, str]:
    """The "Key: value" pairs of an image's infotext, in order."""
    line = image.info["parameters"].split("\n")[-1]
    return dict(pair.split(": ", 1) for pair in line.split(", "))


def test_rng_modes_end_to_end(tiny_pipeline):
    torch_img, cpu_img = run(tiny_pipeline, rng="torch")[0], run(tiny_pipeline, rng="cpu")[0]
    gpu_img, nv_img = run(tiny_pipeline, rng="gpu")[0], run(tiny_pipeline, rng="nv")[0]
    assert np.array_equal(pixels([torch_img]), pixels([cpu_img]))  # "cpu" is A1111's name for the same stream
    assert np.abs(pixels([torch_img]) - pixels([gpu_img])).max() > 4 * PIXEL_TOL
    assert np.abs(pixels([gpu_img]) - pixels([nv_img])).max() <= 1  # the same Philox stream
    labels = [params(im).get("RNG") for im in (torch_img, cpu_img, gpu_img, nv_img)]
    assert labels == ["CPU", "CPU", None, "NV"]  # A1111 writes no RNG for its default, GPU


def test_variation_strength_0_is_the_seed_and_1_the_subseed(tiny_pipeline):
    kw = dict(sampler="Euler")
    plain, plain_sub = pixels(run(tiny_pipeline, **kw)), pixels(run(tiny_pipeline, seed=77, **kw))
    zero = run(tiny_pipeline, subseed=77, subseed_strength=0.0, **kw)
    assert np.array_equal(pixels(zero), plain) and "Variation seed" not in params(zero[0])
    one = run(tiny_pipeline, subseed=77, subseed_strength=1.0, **kw)
    assert np.abs(pixels(one) - plain_sub).max() <= 1  # the subseed's noise (slerp at t=1; Euler draws no more)
    half = pixels(run(tiny_pipeline, subseed=77, subseed_strength=0.5, **kw))
    assert np.abs(half - plain).max() > 4 * PIXEL_TOL and np.abs(half - plain_sub).max() > 4 * PIXEL_TOL
    # An ancestral sampler keeps drawing from the seed's generator, so strength 1 is not the subseed's image there.
    ancestral = run(tiny_pipeline, subseed=77, subseed_strength=1.0, sampler="Euler a")
    assert np.abs(pixels(ancestral) - pixels(run(tiny_pipeline, seed=77, sampler="Euler a"))).max() > PIXEL_TOL


def test_variation_seeds_in_a_batch(tiny_pipeline):
    """A1111: with a strength every image keeps the seed and image i takes subseed + i; alone = in the batch."""
    kw = dict(seed=10, subseed=20, subseed_strength=0.4, sampler="Euler a")
    images = run(tiny_pipeline, batch_size=2, batch_count=2, **kw)
    got = [(params(im)["Seed"], params(im)["Variation seed"], params(im)["Variation seed strength"]) for im in images]
    assert got == [("10", str(20 + i), "0.4") for i in range(4)]
    alone = run(tiny_pipeline, **{**kw, "subseed": 23})
    assert np.array_equal(pixels(images[3:]), pixels(alone))
    assert np.abs(pixels(images[:1]) - pixels(images[1:2])).max() > PIXEL_TOL


@pytest.mark.parametrize("sampler", ["Euler a", "Euler", "DPM++ 2M", "DDIM"])
def test_ensd_changes_only_ancestral_images(tiny_pipeline, sampler):
    plain = run(tiny_pipeline, sampler=sampler, steps=6)  # Euler a: ENSD moves pixels by 28/255 here (9 at 3 steps)
    delta = run(tiny_pipeline, sampler=sampler, steps=6, ensd=31337)
    diff = np.abs(pixels(plain) - pixels(delta)).max()
    if sampler == "Euler a":
        assert diff > 4 * PIXEL_TOL and params(delta[0])["ENSD"] == "31337"
        still = run(tiny_pipeline, sampler=sampler, ensd=31337, eta=0.0)  # no noise added: A1111 records no ENSD
        assert "ENSD" not in params(still[0])
    else:
        assert diff == 0 and "ENSD" not in params(delta[0])
    assert "ENSD" not in params(plain[0])


def test_seed_resize_end_to_end(tiny_pipeline):
    plain = run(tiny_pipeline)
    same = run(tiny_pipeline, seed_resize_from_w=64, seed_resize_from_h=64)
    assert np.array_equal(pixels(plain), pixels(same)) and params(same[0])["Seed resize from"] == "64x64"
    other = run(tiny_pipeline, seed_resize_from_w=96, seed_resize_from_h=80)
    assert np.abs(pixels(other) - pixels(plain)).max() > PIXEL_TOL
    assert params(other[0])["Seed resize from"] == "96x80" and "Seed resize from" not in params(plain[0])


def test_infotext_fields_in_a1111_order(tiny_pipeline):
    image = run(
        tiny_pipeline,
        sampler="Euler a",
        subseed=5,
        subseed_strength=0.25,
        seed_resize_from_w=72,
        seed_resize_from_h=64,
        ensd=31337,
        rng="nv",
    )[0]
    fields = params(image)
    keys = list(fields)
    ours = ["Variation seed", "Variation seed strength", "Seed resize from", "ENSD", "RNG"]
    assert [k for k in keys if k in ours] == ours
    assert keys.index("Model") < keys.index("Variation seed") and keys.index("RNG") < keys.index("Version")
    assert [fields[k] for k in ours] == ["5", "0.25", "72x64", "31337", "NV"]
    assert fields["Seed"] == "11"


BAD = [
    (dict(rng="cuda"), "rng"),
    (dict(rng=None), "rng"),
    (dict(subseed=-2), "subseed"),
    (dict(subseed=2**32), "subseed"),
    (dict(subseed=1.5), "subseed"),
    (dict(subseed_strength=1.5), "subseed_strength"),
    (dict(subseed_strength=-0.1), "subseed_strength"),
    (dict(subseed_strength=float("nan")), "subseed_strength"),
    (dict(subseed_strength="0.5"), "subseed_strength"),
    (dict(seed_resize_from_w=65, seed_resize_from_h=64), "seed_resize_from_w"),
    (dict(seed_resize_from_w=64, seed_resize_from_h=8), "seed_resize_from_h"),
    (dict(seed_resize_from_w=4096, seed_resize_from_h=64), "seed_resize_from_w"),
    (dict(seed_resize_from_w=64), "seed_resize_from_h"),
    (dict(seed_resize_from_h=64), "seed_resize_from_w"),
    (dict(seed_resize_from_w=True, seed_resize_from_h=64), "seed_resize_from_w"),
    (dict(ensd=-1), "ensd"),
    (dict(ensd=0.5), "ensd"),
]


@pytest.mark.parametrize(("kw", "field"), BAD, ids=[f"{f}={next(iter(k.values()))!r}" for k, f in BAD])
def test_bad_seed_options(tiny_pipeline, kw, field):
    with pytest.raises(InvalidOption) as err:
        run(tiny_pipeline, **kw)
    assert err.value.field == field and err.value.allowed


def test_cli_seed_flags(tiny_sd, tmp_path, capsys):
    argv = ["generate", PROMPT, "-m", str(tiny_sd[1]), "--steps", "2", "--seed", "3", "--sampler", "Euler a"]
    argv += ["--rng", "nv", "--subseed", "8", "--subseed-strength", "0.5", "--ensd", "31337", "-o", str(tmp_path)]
    argv += ["--seed-resize-from-w", "64", "--seed-resize-from-h", "72"]
    assert main(argv) == 0
    fields = params(Image.open(capsys.readouterr().out.split()[0]))
    assert (fields["Seed"], fields["Variation seed"], fields["Variation seed strength"]) == ("3", "8", "0.5")
    assert (fields["Seed resize from"], fields["ENSD"], fields["RNG"]) == ("64x72", "31337", "NV")
    assert main(["generate", "x", "-m", str(tiny_sd[1]), "--rng", "mps", "-o", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rng" in err and "nv" in err and not (tmp_path / "bad").exists()
