"""`python -m sdrt.bench.deepcache_switch_memory MODEL_DIR` (a folder with DeepCache's graphs, e.g. the speed bench's
SDXL copy): host memory through the product path: Pipeline.load (text encoders,
plain UNet, VAE), a plain image, a DeepCache image, a plain image again, in one process; host memory after each and
which UNet graphs are loaded (ONNX Runtime CPU engines). Before runtime/deepcache_memory.py the DeepCache image
loaded its full graph beside the plain UNet. Results: docs/benchmarks/speed.md."""
import sys
import time

import numpy as np

from sdrt.bench.load_memory import memory_status, reset_peak
from sdrt.runtime.pipeline import Pipeline

GIB = 2**30
KW = dict(negative_prompt="blue sky", width=512, height=512, cfg_scale=7.5, sampler="Euler", seed=1234, progress=False)


def report(pipe, label, t0):
    m = memory_status()
    held = [n for n in ("unet", "unet_deepcache", "unet_shallow") if pipe.engines[n].session is not None]
    print(f"{label}: {time.perf_counter() - t0:.1f} s, RSS {m['VmRSS'] / GIB:.2f} GiB, peak since the last step "
          f"{m['VmHWM'] / GIB:.2f} GiB; UNet graphs loaded: {held}", flush=True)
    reset_peak()


def main(model: str) -> None:
    t0 = time.perf_counter()
    reset_peak()
    pipe = Pipeline.load(model)
    report(pipe, "Pipeline.load", t0)
    t0 = time.perf_counter()
    plain = np.asarray(pipe.generate("a photo of a grey squirrel", steps=1, **KW)[0])
    report(pipe, "plain image, 1 step", t0)
    t0 = time.perf_counter()
    pipe.generate("a photo of a grey squirrel", steps=2, deepcache_interval=2, **KW)
    report(pipe, "DeepCache image, interval 2, 2 steps", t0)
    t0 = time.perf_counter()
    again = np.asarray(pipe.generate("a photo of a grey squirrel", steps=1, **KW)[0])
    report(pipe, "plain image again, 1 step", t0)
    print("plain image identical after the switches:", bool(np.array_equal(plain, again)))


if __name__ == "__main__":
    main(sys.argv[1])
