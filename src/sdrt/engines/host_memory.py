"""What an engine holds in host memory, for RAM budgets (runtime/ram_budget.py asks these, never a backend's name).

Weights count once (ONNX Runtime runs on its mapped weights; OpenVINO holds its compiled copy alone: mapped.py), at
half their f32 bytes where OpenVINO runs bf16 (text encoders stay f32). Activations per latent cell per image, fp32
on the CPU, from `python -m sdrt.bench.graph_memory` on SD 1.5 at 256x256 (each graph's peak RSS less its weights and
the bare interpreter's 0.08 GiB), rounded up. ONNX Runtime, whose memory pattern plans every intermediate of a run at
once: UNet 0.45 GiB for 2 x 1024 cells, VAE decoder 0.67 GiB and encoder 0.31 GiB for 1024. OpenVINO f32: UNet 0.27
GiB (bf16: 0.21 GiB beyond half-size weights since its MatMul weights are read in bf16, openvino_ir.py; 0.79
before), VAE decoder 0.42 GiB (bf16 0.33), encoder 0.26.
"""

from sdrt.engines.openvino import is_openvino_backend, parse_backend, resolve_precision

ACTIVATION_PER_CELL = {
    "onnxruntime": {"unet": 240_000, "vae_decoder": 700_000, "vae_encoder": 350_000},
    "openvino": {"unet": 200_000, "vae_decoder": 450_000, "vae_encoder": 300_000},
}
BF16_SHARE = 0.5  # OpenVINO's compiled bf16 weights: half the f32 file's bytes


def holds_weights_in_host_memory(backend: str) -> bool:
    """Whether BACKEND's engines live in this machine's RAM (ONNX Runtime CPU, OpenVINO on the CPU)."""
    from sdrt.engines.capabilities import capabilities

    if is_openvino_backend(backend):
        return parse_backend(backend).device == "CPU"
    return not capabilities(backend).device_memory


def weight_share(backend: str, graph: str) -> float:
    """The fraction of GRAPH's f32 file bytes its engine holds: 0.5 for OpenVINO bf16 (text encoders stay f32)."""
    if not is_openvino_backend(backend) or graph.startswith("text_encoder"):
        return 1.0
    return BF16_SHARE if resolve_precision(parse_backend(backend)) == "bf16" else 1.0


def activation_per_cell(backend: str, graph: str) -> int:
    """Activation bytes per latent cell per image of GRAPH (unet, vae_decoder, vae_encoder) on BACKEND."""
    return ACTIVATION_PER_CELL["openvino" if is_openvino_backend(backend) else "onnxruntime"][graph]
