"""What `backend="auto"` runs on when no NVIDIA backend is there: OpenVINO where it is faster at the same or lower
memory, ONNX Runtime's CPU provider everywhere else; and the one line that says so.

The table (docs/guide/backends.md shows it to users), in order:

| the machine                                     | auto picks   | why                                           |
|-------------------------------------------------|--------------|-----------------------------------------------|
| OpenVINO sees an Intel GPU                      | openvino-gpu | an accelerator, f16: half the bytes of f32    |
| OpenVINO sees an Intel NPU (and no GPU)         | openvino-npu | the same, on the NPU                          |
| a CPU with AVX512_BF16 or AMX                   | openvino     | bf16: faster than f32, half the weight bytes  |
| any other CPU (AVX2 only: most laptops)         | cpu          | OpenVINO f32 is no faster than ONNX Runtime   |
| LoRAs asked for (engines that take new weights) | cpu          | OpenVINO's LoRA steps: up to 1.6x slower      |
| OpenVINO not installed                          | cpu          |                                               |

Measured on a 2-core AVX2-only AMD EPYC (issue 25, full-size SD 1.5, 256x256, 10 steps): OpenVINO f32 ran within 5%
of ONNX Runtime fp32's speed; on such a CPU OpenVINO buys nothing the user would notice, so ONNX Runtime, the
engine with the fewest moving parts, runs. docs/benchmarks/cpu-memory.md has this machine's figures.
"""

import sys
from dataclasses import dataclass

from sdrt.engines.openvino import INSTALL_HINT, cpu_has_bf16, openvino_available

_said: set[str] = set()  # the lines announce() printed in this process


@dataclass(frozen=True)
class Choice:
    """The backend auto runs on (a name resolve_backend returns) and the reason, one clause for the user."""

    backend: str
    reason: str


def openvino_devices() -> tuple[str, ...]:
    """OpenVINO's devices on this machine ("CPU", "GPU", "GPU.1", "NPU", ...); () where OpenVINO cannot say."""
    try:
        from sdrt.engines.openvino import core

        return tuple(core().available_devices)
    except Exception:  # a broken plugin or driver: OpenVINO's accelerators are as good as absent
        return ()


def choose_without_nvidia(new_weights: bool = False) -> Choice:
    """auto's pick when neither TensorRT nor ONNX Runtime CUDA runs here; NEW_WEIGHTS: engines must take new weights
    (LoRAs), which OpenVINO runs slower."""
    if not openvino_available():
        return Choice("cpu", f"OpenVINO: not installed ({INSTALL_HINT})")
    if new_weights:  # LoRAs: OpenVINO's LoRA steps run the merged weights as inputs (measured up to 1.6x a step)
        return Choice("cpu", "OpenVINO: its LoRA steps run the merged weights as inputs (up to 1.6x a step; "
                      "--backend openvino to choose it)")  # fmt: skip
    devices = openvino_devices()
    if any(d == "GPU" or d.startswith("GPU.") for d in devices):
        return Choice("openvino-gpu", "OpenVINO sees an Intel GPU: it runs f16 there, half the weight bytes of f32")
    if "NPU" in devices:
        return Choice("openvino-npu", "OpenVINO sees an Intel NPU: it runs f16 there, half the weight bytes of f32")
    if cpu_has_bf16():
        return Choice("openvino", "the CPU has AVX512_BF16 or AMX: OpenVINO bf16 is faster than f32 at half the "
                      "weight bytes")  # fmt: skip
    return Choice("cpu", "the CPU has no AVX512_BF16 or AMX: OpenVINO would run f32, no faster than ONNX Runtime")


def announce(line: str) -> None:
    """Print LINE on stderr, once per process (a server loading models again says it once)."""
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr)
