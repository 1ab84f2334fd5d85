"""Seeds: torch's CPU generator (MT19937 + Box-Muller over blocks of 16), reproduced in numpy."""

import numpy as np


class TorchCPUGenerator:
    """torch.Generator("cpu").manual_seed(seed) for float32 randn, stateful across calls."""

    def __init__(self, seed: int):
        key = np.zeros(624, dtype=np.uint32)
        key[0] = seed & 0xFFFFFFFF
        for i in range(1, 624):
            prev = int(key[i - 1])
            key[i] = (1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF
        self.bitgen = np.random.MT19937()
        self.bitgen.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}

    def uniform(self, n: int) -> np.ndarray:
        raw = self.bitgen.random_raw(n).astype(np.uint32)
        return (raw & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24)

    def randn(self, shape) -> np.ndarray:
        n = int(np.prod(shape))
        if n < 16:
            raise ValueError("randn of fewer than 16 values is not supported")
        data = self.uniform(n)
        out = np.empty(n, dtype=np.float32)
        full = n - n % 16
        out[:full] = _box_muller(data[:full])
        if n % 16:
            out[n - 16 :] = _box_muller(self.uniform(16))
        return out.reshape(shape)


def _box_muller(u: np.ndarray) -> np.ndarray:
    blocks = u.reshape(-1, 2, 8)
    u1, u2 = np.float32(1.0) - blocks[:, 0], blocks[:, 1]
    radius = np.sqrt(np.float32(-2.0) * np.log(u1))
    theta = np.float32(2.0 * np.pi) * u2
    return np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1).reshape(-1)
