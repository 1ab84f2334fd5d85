"""PyTorch modules -> ONNX graphs named and shaped as sdrt.runtime.modelspec declares, then verified."""

import collections
import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from sdrt.errors import ModelError
from sdrt.runtime.modelspec import ModelSpec

OPSET = 17
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes; protobuf files cannot exceed 2 GiB
# Max error allowed against the PyTorch module, relative to the output's largest magnitude (floor 1).
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}


class _CastIO(torch.nn.Module):
    """Runs MODULE in its own dtype behind float32 inputs and outputs (fp16 engines keep fp32 I/O)."""

    def __init__(self, module: torch.nn.Module, forward):
        super().__init__()
        self.module = module
        self._forward = forward

    def forward(self, *inputs):
        dtype = next(self.module.parameters()).dtype
        inputs = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
        outputs = self._forward(self.module, *inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return tuple(y.float() for y in outputs)


def text_encoder_forward(text_encoder, inputs_embeds, eos_index):
    """transformers' CLIPTextTransformer.forward from token embeddings, keeping every layer's output.

    inputs_embeds (B, T, C) float, eos_index (B,) int64 -> hidden_states and normed_hidden_states
    (layers + 1, B, T, C), pooled (B, P).
    """
    model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5: CLIPTextModel is the transformer
    x = model.embeddings(inputs_embeds=inputs_embeds)  # + position embeddings, (B, T, C)
    positions = torch.arange(inputs_embeds.shape[1], device=x.device)
    future = positions[None, :] > positions[:, None]  # (T, T): causal attention hides later tokens
    mask = torch.zeros(future.shape, dtype=x.dtype).masked_fill(future, torch.finfo(x.dtype).min)[None, None]
    hidden = [x]
    for layer in model.encoder.layers:
        x = layer(x, mask)
        hidden.append(x)
    stack = torch.stack(hidden)  # (layers + 1, B, T, C)
    normed = model.final_layer_norm(stack)
    pooled = normed[-1][torch.arange(normed.shape[1]), eos_index]  # (B, C)
    projection = getattr(text_encoder, "text_projection", None)
    return stack, normed, pooled if projection is None else projection(pooled)


def unet_forward(unet, sample, timestep, encoder_hidden_states):
    return unet(sample, timestep.float(), encoder_hidden_states, return_dict=False)[0]


def vae_decoder_forward(vae, latent_sample):
    return vae.decode(latent_sample, return_dict=False)[0]


def vae_encoder_forward(vae, sample):
    dist = vae.encode(sample, return_dict=False)[0]
    return dist.mean, dist.logvar


@contextlib.contextmanager
def classic_attention(module):
    """MODULE's attention traced as MatMul-Softmax-MatMul (diffusers' AttnProcessor) instead of through SDPA: the
    pattern ONNX Runtime's attention fusions recognise (sdrt.export.optimize); the same arithmetic."""
    if not hasattr(module, "set_attn_processor"):
        yield
        return
    from diffusers.models.attention_processor import AttnProcessor

    before = module.attn_processors
    module.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        module.set_attn_processor(before)


def export_onnx(module, forward, spec: ModelSpec, example_inputs: tuple, out_file: Path) -> None:
    """Trace MODULE with EXAMPLE_INPUTS into OUT_FILE (one data file beside it if over 2 GB)."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _CastIO(module, forward).eval()
    with tempfile.TemporaryDirectory(dir=out_file.parent) as tmp, classic_attention(module):
        tmp_file = Path(tmp) / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about every Python branch on a shape; the verification below is what counts.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                example_inputs,
                str(tmp_file),
                dynamo=False,
                opset_version=OPSET,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(),
                do_constant_folding=True,
            )
        data_bytes = sum(f.stat().st_size for f in Path(tmp).iterdir())
        if data_bytes < EXTERNAL_DATA_THRESHOLD and not any(p.name != "model.onnx" for p in Path(tmp).iterdir()):
            shutil.move(str(tmp_file), out_file)
        else:
            gather_external_data(tmp_file, out_file, consume=True)
    onnx.checker.check_model(str(out_file))


EXTERNAL_DATA_ALIGNMENT = 4096  # bytes: tensors start on page boundaries, so a runtime can memory-map them
EXTERNAL_DATA_MIN_BYTES = 1024  # smaller tensors stay inside the protobuf


def gather_external_data(src: Path, out_file: Path, consume: bool = False) -> None:
    """SRC (the exporter's protobuf, its large tensors in one file each or inline) -> OUT_FILE plus one
    OUT_FILE.data, streamed one tensor at a time: never more than the largest tensor in memory (onnx.load with
    its external data would hold the whole model a second time beside the PyTorch module). CONSUME: each of SRC's
    data files is deleted once its last tensor is copied, so the disk holds the weights about once, not twice (a
    9 GB transformer needs 9 GB free, not 18)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(src), load_external_data=False)
    tensors_left = collections.Counter(  # data file -> its tensors not yet copied
        e.value for t in _get_all_tensors(model) if uses_external_data(t) for e in t.external_data
        if e.key == "location"
    )  # fmt: skip
    location = out_file.name + ".data"
    offset = 0
    with open(out_file.parent / location, "wb") as data:
        for tensor in _get_all_tensors(model):
            if uses_external_data(tensor):
                info = {e.key: e.value for e in tensor.external_data}
                with open(src.parent / info["location"], "rb") as f:
                    f.seek(int(info.get("offset", 0)))
                    chunk = f.read(int(info["length"])) if "length" in info else f.read()
                tensors_left[info["location"]] -= 1
                if consume and tensors_left[info["location"]] == 0:
                    (src.parent / info["location"]).unlink()
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_DATA_MIN_BYTES:
                chunk = tensor.raw_data
                tensor.ClearField("raw_data")
            else:
                continue
            del tensor.external_data[:]
            offset = -(-offset // EXTERNAL_DATA_ALIGNMENT) * EXTERNAL_DATA_ALIGNMENT
            data.seek(offset)
            data.write(chunk)
            for key, value in (("location", location), ("offset", offset), ("length", len(chunk))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            offset += len(chunk)
            del chunk
    onnx.save_model(model, str(out_file))


def max_error(onnx_file: Path, feeds: dict[str, np.ndarray], reference: list[np.ndarray]) -> float:
    """Largest |ONNX Runtime - PyTorch| over all outputs, divided by max(1, largest |reference|)."""
    import onnxruntime as ort

    from sdrt.export.optimize import relative_error

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, feeds)
    del session
    try:
        return relative_error(outputs, reference)
    except ModelError as e:
        raise ModelError(f"{onnx_file}: {e}") from None


def reference_outputs(module, forward, inputs: tuple) -> list[np.ndarray]:
    """PyTorch outputs for INPUTS (computed before any fp16 conversion), as float32 arrays."""
    with torch.no_grad():
        outputs = forward(module, *inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [y.float().numpy() for y in outputs]
