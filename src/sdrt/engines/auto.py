"""What `backend="auto"` runs on when no NVIDIA backend is there: OpenVINO where it is faster at the same or lower
memory, ONNX Runtime's CPU provider everywhere else; and the one line that says so.

The table (docs/guide/backends.md shows it to users), in order:

| the machine                                     | auto picks   | why                                           |
|-------------------------------------------------|--------------|-----------------------------------------------|
| LoRAs asked for, a CPU with AVX512_BF16 or AMX  | openvino     | bf16 LoRA steps measured 0.72x ONNX Runtime's |
| LoRAs asked for, any other CPU                  | cpu          | f32 LoRA steps: up to 1.6x OpenVINO's own     |
| OpenVINO sees an Intel GPU                      | openvino-gpu | an accelerator, f16: half the bytes of f32    |
| OpenVINO sees an Intel NPU (and no GPU)         | openvino-npu | the same, on the NPU                          |
| a CPU with AVX512_BF16 or AMX                   | openvino     | bf16: faster than f32, half the weight bytes  |
| any other CPU (AVX2 only: most laptops)         | cpu          | OpenVINO f32 is no faster than ONNX Runtime   |
| OpenVINO not installed                          | cpu          |                                               |

Measured on a 2-core AVX2-only AMD EPYC (issue 25, full-size SD 1.5, 256x256, 10 steps): OpenVINO f32 ran within 5%
of ONNX Runtime fp32's speed; on such a CPU OpenVINO buys nothing the user would notice, so ONNX Runtime, the
engine with the fewest moving parts, runs. docs/benchmarks/cpu-memory.md has this machine's figures.

With LoRAs (engines that take new weights) the choice is between OpenVINO's LoRA model, whose changed weights are
inputs (engines/openvino_weights.py), and ONNX Runtime's in-place weights (a prepacked session swapped in behind
them: engines/prepacked_swap.py), by LORA_STEP_VS_ONNXRUNTIME; LoRAs on an Intel GPU or NPU are not measured, so
their machines get the CPU's choice.
"""

import sys
from dataclasses import dataclass

from sdrt.engines.openvino import INSTALL_HINT, cpu_has_bf16, openvino_available

_said: set[str] = set()  # the lines announce() printed in this process

# A UNet call of OpenVINO's LoRA model with every mapped weight an input (a LoCon on every layer: the worst case)
# over ONNX Runtime's CPU engine's with the same LoRA, on the same inputs (`python -m sdrt.bench.lora_engines MODEL
# --pipelines openvino,cpu`, docs/benchmarks/lora-engines.md). bf16: 0.72 on full-size SD 1.5 at 256x256 (1.55 and
# 1.80 s against 2.36 and 2.32 s; the base: 0.95 against 2.18 s) on a 2-core AVX512_BF16 EPYC. f32: weights as
# inputs 1.6x OpenVINO's own constants on full-size SD 1.5, and OpenVINO f32 runs at ONNX Runtime's speed.
LORA_STEP_VS_ONNXRUNTIME = {"bf16": 0.72, "f32": 1.6}


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
    if new_weights:
        return choose_for_loras()
    devices = openvino_devices()
    if any(d == "GPU" or d.startswith("GPU.") for d in devices):
        return Choice("openvino-gpu", "OpenVINO sees an Intel GPU: it runs f16 there, half the weight bytes of f32")
    if "NPU" in devices:
        return Choice("openvino-npu", "OpenVINO sees an Intel NPU: it runs f16 there, half the weight bytes of f32")
    if cpu_has_bf16():
        return Choice("openvino", "the CPU has AVX512_BF16 or AMX: OpenVINO bf16 is faster than f32 at half the "
                      "weight bytes")  # fmt: skip
    return Choice("cpu", "the CPU has no AVX512_BF16 or AMX: OpenVINO would run f32, no faster than ONNX Runtime")


def choose_for_loras() -> Choice:
    """auto's pick with LoRAs (OpenVINO installed), by the measured LoRA step of each engine."""
    precision = "bf16" if cpu_has_bf16() else "f32"
    ratio = LORA_STEP_VS_ONNXRUNTIME[precision]
    if ratio < 1:
        return Choice("openvino", f"LoRAs on a CPU with AVX512_BF16 or AMX: OpenVINO bf16's LoRA steps measured "
                      f"{ratio:.2f}x ONNX Runtime's (each new set of LoRA layers compiles once)")  # fmt: skip
    return Choice("cpu", f"OpenVINO: its LoRA steps run the merged weights as inputs, f32 on this CPU (up to "
                  f"{ratio:.1f}x a step; --backend openvino to choose it)")  # fmt: skip


def announce(line: str) -> None:
    """Print LINE on stderr, once per process (a server loading models again says it once)."""
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr)
