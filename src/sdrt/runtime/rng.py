"""Seeded noise without torch: torch's CPU and CUDA normal streams, A1111's NV generator, and A1111's seed options.

Modes (the `rng` option), one generator per image seed:
- "torch" / "cpu": `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`, bit for bit on x86-64
  (TorchCPUGenerator). diffusers uses this stream; A1111 uses it with its "RNG: CPU" setting.
- "gpu": `torch.randn(shape, generator=torch.Generator("cuda").manual_seed(seed))` on an NVIDIA GPU
  (TorchCUDAGenerator), A1111's default. Same Philox words and layout; float values to about 1e-6.
- "nv": A1111's "NV" setting, its numpy imitation of the GPU stream (A1111NVGenerator), bit for bit.
ImageNoise adds A1111's variation seeds, seed resize and ENSD on top of any of them.
"""

from __future__ import annotations

import math

import numpy as np

_F32 = np.float32


def _mt19937_key(seed: int) -> np.ndarray:
    """The 624-word MT19937 state of init_genrand(seed & 0xffffffff), as torch's manual_seed builds it."""
    key = np.empty(624, dtype=np.uint32)
    word = seed & 0xFFFFFFFF
    key[0] = word
    for i in range(1, 624):
        word = (1812433253 * (word ^ (word >> 30)) + i) & 0xFFFFFFFF
        key[i] = word
    return key


def _fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add: the float32 product is exact in float64, so only the sum rounds."""
    return (np.float64(a) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(_F32)


# Constants of the Cephes-style logf/sincosf approximations torch's AVX2 Box-Muller uses (avx_mathfun.h).
_LOG_POLY = [_F32(v) for v in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                               1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                               3.3333331174e-1)]  # fmt: skip
_LOG_Q1, _LOG_Q2 = _F32(-2.12194440e-4), _F32(0.693359375)  # ln 2 split in two parts
_SQRT_HALF = _F32(0.707106781186547524)
_MINUS_PI_4 = [_F32(-0.78515625), _F32(-2.4187564849853515625e-4), _F32(-3.77489497744594108e-8)]  # -pi/4 in 3
_COS_POLY = [_F32(2.443315711809948e-5), _F32(-1.388731625493765e-3), _F32(4.166664568298827e-2)]
_SIN_POLY = [_F32(-1.9515295891e-4), _F32(8.3321608736e-3), _F32(-1.6666654611e-1)]
_FOUR_OVER_PI = _F32(1.27323954473516)


def _log_avx2(x: np.ndarray) -> np.ndarray:
    """log(x) for float32 x in (0, 1], operation for operation like torch's compiled log256_ps."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 127).astype(_F32) + _F32(1)
    m = ((bits & ~0x7F800000) | 0x3F000000).view(_F32)  # mantissa in [0.5, 1)
    small = m < _SQRT_HALF  # then use 2m - 1 and e - 1
    m = (m - _F32(1)) + np.where(small, m, _F32(0))
    e = e - small.astype(_F32)
    z = m * m
    y = np.full_like(m, _LOG_POLY[0])
    for p in _LOG_POLY[1:]:
        y = _fma(y, m, p)
    # GCC contracts the separate AVX mul/add intrinsics into FMAs; these are the contractions it made.
    y = _fma(y * m, z, e * _LOG_Q1)
    y = _fma(-z, _F32(0.5), y)
    return _fma(e, _LOG_Q2, m + y)


def _sincos_avx2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sin x, cos x) for float32 x in [0, 2 pi), operation for operation like torch's sincos256_ps."""
    j = (x * _FOUR_OVER_PI).astype(np.int32)
    j = (j + 1) & ~1  # octant, rounded up to even
    y = j.astype(_F32)
    for part in _MINUS_PI_4:  # x - j * pi/4 in extended precision
        x = _fma(y, part, x)
    z = x * x
    cos = _fma(_fma(_COS_POLY[0], z, _COS_POLY[1]), z, _COS_POLY[2]) * z
    cos = _fma(cos, z, -(z * _F32(0.5))) + _F32(1)
    sin = _fma(_fma(_SIN_POLY[0], z, _SIN_POLY[1]), z, _SIN_POLY[2]) * z
    sin = _fma(sin, x, x)
    swap = (j & 2) != 0  # octants 2-3 and 6-7: the polynomials trade places
    sin, cos = np.where(swap, cos, sin), np.where(swap, sin, cos)
    sin = np.where((j & 4) != 0, -sin, sin)
    cos = np.where((~(j - 2) & 4) != 0, -cos, cos)
    return sin, cos


def _box_muller_avx2(data: np.ndarray) -> np.ndarray:
    """torch's AVX2 normal_fill_16 on rows of 16 uniforms (x86-64 builds, AVX2 and AVX512 kernels)."""
    u1, u2 = _F32(1) - data[:, :8], data[:, 8:]
    radius = np.sqrt(_F32(-2) * _log_avx2(u1))
    sin, cos = _sincos_avx2(_F32(2.0 * math.pi) * u2)  # theta in float32, 2 pi rounded to float32
    return np.concatenate([radius * cos, radius * sin], axis=1)


def _box_muller_scalar(data: np.ndarray) -> np.ndarray:
    """torch's scalar normal_fill_16 (float32 libm calls; here correctly rounded, libm may differ by an ulp)."""
    u1, u2 = _F32(1) - data[:, :8], data[:, 8:]
    radius = np.sqrt(_F32(-2) * np.log(u1.astype(np.float64)).astype(_F32))
    theta = (2.0 * math.pi * u2.astype(np.float64)).astype(_F32)  # 2 pi * u2 in double, then rounded
    theta64 = theta.astype(np.float64)
    return np.concatenate([radius * np.cos(theta64).astype(_F32), radius * np.sin(theta64).astype(_F32)], axis=1)


class TorchCPUGenerator:
    """Stateful stand-in for torch.Generator("cpu").manual_seed(seed) driving torch.randn(float32)."""

    def __init__(self, seed: int, vectorized: bool = True):
        """vectorized=False follows torch builds without AVX2 kernels (ARM, ATEN_CPU_CAPABILITY=default)."""
        self.seed = seed
        self._box_muller = _box_muller_avx2 if vectorized else _box_muller_scalar
        self._mt = np.random.MT19937()
        # pos 624: the first draw regenerates the block, as torch's fresh engine does.
        self._mt.state = {"bit_generator": "MT19937", "state": {"key": _mt19937_key(seed), "pos": 624}}
        self._cached_normal: float | None = None  # torch caches the second Box-Muller value of the scalar path

    def _uniform_f32(self, n: int) -> np.ndarray:
        """n float32 uniforms in [0, 1) from the low 24 bits of one 32-bit draw each."""
        return (self._mt.random_raw(n) & 0xFFFFFF).astype(_F32) * _F32(2.0**-24)

    def _uniform_f64(self) -> float:
        """One double uniform in [0, 1) from the low 53 bits of two 32-bit draws (first draw = high word)."""
        hi, lo = (int(v) for v in self._mt.random_raw(2))
        return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0**-53

    def _scalar_normal(self) -> float:
        """torch's normal_distribution<double>: Box-Muller in double, the sine value kept for the next call."""
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        u1 = self._uniform_f64()
        u2 = self._uniform_f64()
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        """Standard normal float32 array, the same values torch.randn(shape, generator=g) gives."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        n = math.prod(shape)
        if n < 16:  # torch's element-by-element path
            return np.array([self._scalar_normal() for _ in range(n)], dtype=_F32).reshape(shape)
        data = self._uniform_f32(n)
        full = n - n % 16
        data[:full] = self._box_muller(data[:full].reshape(-1, 16)).reshape(-1)
        if n % 16:  # torch redraws the last 16 values (overlapping the last full block) from fresh uniforms
            data[n - 16 :] = self._box_muller(self._uniform_f32(16).reshape(1, 16)).reshape(-1)
        return data.reshape(shape)


# --- Philox 4x32-10: torch's CUDA generator (cuRAND's curandStatePhilox4_32_10_t) -------------------------------

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers (Salmon et al. 2011, table 2)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key increments per round: the golden ratio and sqrt(3) - 1 as 32-bit fractions
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_MASK64 = 2**64 - 1


def philox4x32(counter, key: tuple[int, int], rounds: int = PHILOX_ROUNDS) -> np.ndarray:
    """Philox4x32-R (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"; Random123's philox.h).

    counter: 4 rows of N uint32 words (ctr.x, ctr.y, ctr.z, ctr.w); key: (k0, k1). Returns (4, N) uint32.
    """
    c0, c1, c2, c3 = (np.asarray(word, dtype=np.uint64) for word in counter)
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for r in range(rounds):
        if r:  # the key schedule: a Weyl sequence, bumped before every round after the first
            k0, k1 = (k0 + PHILOX_W[0]) & _MASK32, (k1 + PHILOX_W[1]) & _MASK32
        p0, p1 = c0 * np.uint64(PHILOX_M[0]), c2 * np.uint64(PHILOX_M[1])  # 32 x 32 -> 64 bits, exact
        hi0, lo0, hi1, lo1 = p0 >> np.uint64(32), p0 & np.uint64(_MASK32), p1 >> np.uint64(32), p1 & np.uint64(_MASK32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


_TWO_POW_M32 = _F32(2.0**-32)  # curand's CURAND_2POW32_INV (its literal 2.3283064e-10f is exactly 2^-32)
_CURAND_TWO_PI = _F32(6.2831855)  # curand's float literal for 2 pi
_TWO_POW_M32_2PI = _TWO_POW_M32 * _CURAND_TWO_PI  # CURAND_2POW32_INV_2PI, a float product as in curand's header


def curand_box_muller(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cuRAND's _curand_box_muller on device, in float32: two uint32 words -> (r sin v, r cos v) (Box & Muller 1958).

    u = x 2^-32 + 2^-33 and v = (y 2^-32 + 2^-33) 2 pi (fused multiply-adds), r = sqrtf(-2 logf u).
    Not bit-exact: the GPU takes sin and cos from the __sincosf hardware approximation (absolute error about
    2^-21.4) and logf to within 1 ulp; here they are correctly rounded, so values differ by up to ~1e-6 (r <= 6.8).
    """
    u = _fma(x.astype(_F32), _TWO_POW_M32, _TWO_POW_M32 / _F32(2))  # uint32 -> float rounds to nearest, as cvt.rn
    v = _fma(y.astype(_F32), _TWO_POW_M32_2PI, _TWO_POW_M32_2PI / _F32(2))
    radius = np.sqrt(_F32(-2) * np.log(u.astype(np.float64)).astype(_F32))
    v64 = v.astype(np.float64)
    return np.sin(v64).astype(_F32) * radius, np.cos(v64).astype(_F32) * radius


def a1111_nv_box_muller(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A1111's NV Box-Muller (modules/rng_philox.py): r sin v only, from the same u and v in float64, then float32.

    A1111 multiplies the uint32 words by float32 constants, which numpy promotes to float64; the same operations in
    the same order here give the same bits.
    """
    u = x.astype(np.float64) * np.float64(_TWO_POW_M32) + np.float64(_TWO_POW_M32 / _F32(2))
    v = y.astype(np.float64) * np.float64(_TWO_POW_M32_2PI) + np.float64(_TWO_POW_M32_2PI / _F32(2))
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(_F32)


CUDA_BLOCK_SIZE = 256  # threads per block of torch's distribution kernels (block_size_bound)
CURAND4_VALUES = 4  # normals per curand_normal4 call, torch's unroll factor for float
PHILOX_OFFSET_PER_CALL = 4  # torch advances the philox offset by 4 words per curand call per thread


class TorchCUDAGenerator:
    """Stand-in for torch.Generator("cuda").manual_seed(seed) driving torch.randn(float32) on an NVIDIA GPU.

    torch (aten/src/ATen/native/cuda/DistributionTemplates.h) launches blocks of 256 threads, at most as many blocks
    as the GPU keeps resident (multiProcessorCount * (maxThreadsPerMultiProcessor // 256)). Thread t runs
    curand_init(seed, subsequence=t, offset) -- Philox counter (offset / 4, 0, t, 0), key (seed lo, seed hi) -- and
    loops over the elements in a grid stride: each curand_normal4 call turns one counter's 4 words into 4 normals for
    elements t, t + T, t + 2T, t + 3T (T = all threads), then the counter steps by 1. Each randn advances the offset
    by 4 words per call a thread made. With T >= numel (the default here) element i is the first normal of thread i.

    resident_blocks: the GPU's resident block count, for tensors of more than 256 * resident_blocks elements (an SD
    1.5 512x512 latent of 16384 needs 64 blocks, which every RTX card holds; a GTX 1650 holds 56, and an SDXL
    1024x1024 latent needs 256, more than an RTX 3060's 168). None: the layout of a large enough GPU.
    How sure: the Philox words and layout follow torch's and cuRAND's sources, and Philox passes Random123's
    known-answer tests. The values are within 7e-7 of A1111's published seed-0 example and ~1e-6 of A1111's NV
    (see curand_box_muller for why not to the bit). tests/test_seeds.py compares with torch's CUDA randn where a
    GPU is present; none was when this was written.
    """

    def __init__(self, seed: int, resident_blocks: int | None = None):
        self.seed = seed & _MASK64  # torch keeps the whole 64-bit seed (the CPU generator keeps 32 bits)
        self.resident_blocks = resident_blocks
        self.offset = 0  # torch's philox_offset_per_thread, in 32-bit words

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        """Standard normal float32 array of SHAPE, as torch.randn(shape, generator=g, device="cuda") fills it."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        n = math.prod(shape)
        if n == 0:
            return np.zeros(shape, _F32)
        blocks = -(-n // CUDA_BLOCK_SIZE)
        if self.resident_blocks is not None:
            blocks = min(blocks, self.resident_blocks)
        threads = blocks * CUDA_BLOCK_SIZE
        calls = -(-n // (threads * CURAND4_VALUES))  # curand_normal4 calls per thread
        index = np.arange(n, dtype=np.uint64)
        call, rest = np.divmod(index, np.uint64(threads * CURAND4_VALUES))
        component, thread = np.divmod(rest, np.uint64(threads))  # which of the call's 4 normals, which thread
        counter_x = np.uint64(self.offset // PHILOX_OFFSET_PER_CALL) + call  # the offset is a multiple of 4
        counter = (counter_x & np.uint64(_MASK32), counter_x >> np.uint64(32), thread, np.zeros_like(thread))
        words = philox4x32(counter, (self.seed & _MASK32, self.seed >> 32))  # (4, n) uint32
        first = component < 2  # normals 0, 1 come from words 0, 1; normals 2, 3 from words 2, 3
        sin, cos = curand_box_muller(np.where(first, words[0], words[2]), np.where(first, words[1], words[3]))
        self.offset += calls * PHILOX_OFFSET_PER_CALL
        return np.where(component % 2 == 0, sin, cos).reshape(shape)


class A1111NVGenerator:
    """A1111's "NV" random source (modules/rng_philox.py): its numpy imitation of torch's CUDA randn, reproduced.

    Element i of the k-th randn of a generator is r sin v of the first two words of Philox counter (k, 0, i, 0)
    with key (seed lo, seed hi), computed in float64 then rounded to float32 (a1111_nv_box_muller). This is the
    CUDA layout of a large enough GPU with a counter that steps by 1 per call, so it agrees with TorchCUDAGenerator
    to ~1e-6 wherever every draw fits in the GPU's threads. How sure: bit for bit with A1111's code (the same words
    and float64 operations; compared on 6 seeds x 4 shapes of successive draws during development). The tests keep
    A1111's published seed-0 example, matched to 3e-7 (A1111's code today gives sdrt's values, not those digits).
    """

    def __init__(self, seed: int):
        self.seed = seed & _MASK64
        self.calls = 0  # A1111's Generator.offset

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        """Standard normal float32 array of SHAPE, A1111's Generator(seed).randn(shape) of the same call."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        index = np.arange(math.prod(shape), dtype=np.uint64)
        zeros = np.zeros_like(index)
        counter = (np.full_like(index, self.calls & _MASK32), zeros, index & np.uint64(_MASK32), index >> np.uint64(32))
        words = philox4x32(counter, (self.seed & _MASK32, self.seed >> 32))
        self.calls += 1
        return a1111_nv_box_muller(words[0], words[1]).reshape(shape)


GENERATORS = {"torch": TorchCPUGenerator, "cpu": TorchCPUGenerator, "gpu": TorchCUDAGenerator, "nv": A1111NVGenerator}
A1111_RNG_LABELS = {"torch": "CPU", "cpu": "CPU", "gpu": None, "nv": "NV"}  # infotext "RNG"; A1111 omits its "GPU"


def make_generator(rng: str, seed: int):
    """A fresh generator of mode RNG ("torch", "cpu", "gpu", "nv") seeded with SEED, with a .randn(shape) method."""
    return GENERATORS[rng](seed)


# --- A1111's seed options (modules/rng.py ImageRNG) --------------------------------------------------------------

SLERP_LINEAR_ABOVE = 0.9995  # A1111 blends linearly when the mean cosine between the two noises is above this


def slerp(t: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A1111's variation-seed blend: spherical interpolation (Shoemake 1985) from LOW (t=0) to HIGH (t=1).

    low, high: (C, H, W) float32, one image. As in A1111 (torch.norm(..., dim=1)), the vectors are the columns along
    H: norms, cosines and angles are per (c, w). When the mean cosine is above SLERP_LINEAR_ABOVE A1111 returns
    `low * t + high * (1 - t)` -- the weights swapped, kept as A1111 has them (the noises are then all but equal).
    Computed in float64 (A1111: float32 on its device), returned as float32.
    """
    low64, high64 = low.astype(np.float64), high.astype(np.float64)
    cos = np.sum(low64 * high64, axis=1) / (np.linalg.norm(low64, axis=1) * np.linalg.norm(high64, axis=1))  # (C, W)
    if cos.mean() > SLERP_LINEAR_ABOVE:
        return (low64 * t + high64 * (1 - t)).astype(_F32)
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    sin_omega = np.sin(omega)
    w_low, w_high = np.sin((1 - t) * omega) / sin_omega, np.sin(t * omega) / sin_omega  # (C, W)
    return (w_low[:, None, :] * low64 + w_high[:, None, :] * high64).astype(_F32)


def paste_centered(canvas: np.ndarray, patch: np.ndarray) -> np.ndarray:
    """A1111's seed resize: PATCH (C, h0, w0) centred on CANVAS (C, H, W), cropped where larger; returns the canvas."""
    (_, height, width), (_, h0, w0) = canvas.shape, patch.shape
    dy, dx = (height - h0) // 2, (width - w0) // 2  # floor division, as A1111's Python ints
    h, w = (h0 if dy >= 0 else h0 + 2 * dy), (w0 if dx >= 0 else w0 + 2 * dx)
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    canvas[:, ty : ty + h, tx : tx + w] = patch[:, sy : sy + h, sx : sx + w]
    return canvas


class ImageNoise:
    """The noise of one batch, image by image, as A1111's ImageRNG draws it (modules/rng.py, webui 1.6+).

    shape: (C, h, w) latent of one image. Per image i, with generator g_i = make_generator(rng, seeds[i]):
    - initial(): g_i's first draw. With subseed_strength > 0 it is slerp(strength, that, first draw of subseeds[i]).
      With resize_from = (h0, w0) (the latent size the seed was first used at) the seed's and subseed's noises are
      drawn at that size from fresh generators, blended, and pasted centred onto g_i's first draw at full size.
    - then, if ensd != 0, g_i is replaced by a fresh generator of seeds[i] + ensd (A1111's "eta noise seed delta").
    - __call__(): the next draw of every g_i, the per-step noise of ancestral and SDE samplers.
    So image i is the same alone or in a batch.
    """

    def __init__(self, rng, shape, seeds, subseeds=None, subseed_strength=0.0, resize_from=None, ensd=0):
        self.rng, self.shape, self.seeds = rng, tuple(shape), list(seeds)
        self.subseeds = list(subseeds) if subseeds is not None else None
        self.subseed_strength, self.ensd = subseed_strength, ensd
        self.seed_shape = (self.shape[0], *resize_from) if resize_from else self.shape
        self.generators = [make_generator(rng, seed) for seed in self.seeds]

    def _first(self, i: int) -> np.ndarray:
        """Image i's initial noise (C, h, w) float32."""
        resized = self.seed_shape != self.shape
        if resized:
            noise = make_generator(self.rng, self.seeds[i]).randn(self.seed_shape)
        else:
            noise = self.generators[i].randn(self.shape)
        if self.subseeds is not None and self.subseed_strength != 0:
            subnoise = make_generator(self.rng, self.subseeds[i]).randn(self.seed_shape)
            noise = slerp(self.subseed_strength, noise, subnoise)
        if resized:
            noise = paste_centered(self.generators[i].randn(self.shape), noise)
        return noise

    def _apply_ensd(self):
        if self.ensd:
            self.generators = [make_generator(self.rng, seed + self.ensd) for seed in self.seeds]

    def initial(self) -> np.ndarray:
        """(B, C, h, w) float32 unit-variance starting noise; call once, before any __call__."""
        noise = np.stack([self._first(i) for i in range(len(self.seeds))])
        self._apply_ensd()
        return noise

    def skip_initial(self):
        """The caller brings its own starting latents: the generators start fresh (diffusers), ENSD still applies."""
        self._apply_ensd()

    def __call__(self) -> np.ndarray:
        """(B, C, h, w) float32: the next unit normal draw of every image's generator."""
        return np.stack([g.randn(self.shape) for g in self.generators])
