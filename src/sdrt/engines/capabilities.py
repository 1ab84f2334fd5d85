"""What each backend's engines can do, declared once: the runtime asks these capabilities (memory planning, LoRA
checks, fused variants, parity tolerances) and never a backend's name. A new execution provider is one entry in
CAPABILITIES (and its factory in engines/__init__.py's create_engine)."""

from dataclasses import dataclass

from sdrt.engines.plan import CUDA_CONTEXT_BYTES


@dataclass(frozen=True)
class Capabilities:
    """A backend's answers to what the runtime relies on."""

    fused_target: str | None = None  # the `sdrt optimize` graph variants it runs ("cpu", "cuda"); None: plain graphs
    device_memory: bool = False  # a GPU's memory: weights planned as fp16 bytes against a VRAM budget
    arena_limit: bool = False  # a VRAM budget caps its allocator (ONNX Runtime CUDA's gpu_mem_limit)
    context_bytes: int = 0  # memory outside the engines that a VRAM budget must leave (a CUDA context)
    weight_streaming: bool = False  # the denoiser's weights stream from the host under a budget (TensorRT)
    static_shapes: bool = False  # takes a static profile (static_dims): one size, faster
    graph_replay: bool = False  # replays a static profile as a captured graph (CUDA graphs)
    f32_text_encoders: bool = False  # text encoders must be asked to keep f32 (keep_f32: OpenVINO bf16)
    replaceable_weights: bool = False  # merge_weights/set_weights: LoRAs without re-export (ORT, TensorRT refit)
    device_outputs: bool = False  # run_device keeps outputs on the device between calls (I/O binding)
    latent_tolerance: float = 2e-3  # parity: final latents' max abs difference from diffusers fp32, tiny models


# Final-latent tolerances (tests' parity suites; values up to ~216): ONNX Runtime measured up to 1.1e-3; OpenVINO f32
# (each graph within 4e-6 relative of ONNX Runtime, other kernels) up to 2.9e-3.
CAPABILITIES = {
    "cpu": Capabilities(fused_target="cpu", static_shapes=True, replaceable_weights=True),
    "cuda": Capabilities(fused_target="cuda", device_memory=True, arena_limit=True, static_shapes=True,
                         graph_replay=True, replaceable_weights=True, device_outputs=True),  # fmt: skip
    "tensorrt": Capabilities(device_memory=True, context_bytes=CUDA_CONTEXT_BYTES, weight_streaming=True,
                             replaceable_weights=True, device_outputs=True),  # fmt: skip
    "openvino": Capabilities(f32_text_encoders=True, latent_tolerance=4e-3),
}


def capabilities(backend: str) -> Capabilities:
    """The Capabilities of BACKEND: a resolved backend name ("cpu", "cuda", "tensorrt") or an OpenVINO form
    ("openvino", "openvino-gpu-bf16", ...: the part before the first "-")."""
    kind = backend.split("-")[0]
    if kind not in CAPABILITIES:
        from sdrt.errors import InvalidOption

        raise InvalidOption("backend", backend, ", ".join(CAPABILITIES) + " (auto: resolve first)")
    return CAPABILITIES[kind]
