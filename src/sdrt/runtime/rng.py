"""numpy reproduction of torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)) in float32."""

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
