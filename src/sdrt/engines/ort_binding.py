"""ONNX Runtime on a GPU: the CUDA execution provider's options, and device buffers bound once per input shape."""

from pathlib import Path

import numpy as np


def cuda_providers(
    device_id: int = 0, gpu_mem_limit: int | None = None, static: bool = False, cuda_graph: bool = False
) -> list:
    """CUDA execution provider options (onnxruntime's documented CUDA EP keys), CPU as fallback for unsupported ops.

    kSameAsRequested keeps the arena at what was asked for (ORT's default doubles it), so peak VRAM follows the model.
    STATIC (one input shape per engine): cuDNN's EXHAUSTIVE search, once per shape, cached by cuDNN for the process;
    dynamic shapes keep HEURISTIC (EXHAUSTIVE would benchmark again at every new size). CUDA_GRAPH: capture the run
    once per shape and replay it (needs every node on the GPU, which a static profile makes possible).
    """
    options = {
        "device_id": device_id,
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "EXHAUSTIVE" if static else "HEURISTIC",
        "do_copy_in_default_stream": True,
        # under a VRAM budget, cuDNN gets only the workspace its default algorithms need
        "cudnn_conv_use_max_workspace": "0" if gpu_mem_limit else "1",
        "prefer_nhwc": "1",
    }
    if gpu_mem_limit:
        options["gpu_mem_limit"] = int(gpu_mem_limit)
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


MEMCPY_OPS = ("MemcpyFromHost", "MemcpyToHost")  # what ONNX Runtime inserts where a CPU node feeds a GPU node
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_}  # fmt: skip
MAX_SHAPE_SETS = 4  # device buffer sets kept per engine (one per input shape seen), oldest dropped first


def count_ops(model_file: Path, op_types=MEMCPY_OPS) -> int | None:
    """Nodes of OP_TYPES in an ONNX file's main graph (ORT's saved optimized graph); None without the onnx package."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(model_file), load_external_data=False)
    return sum(node.op_type in op_types for node in model.graph.node)


class BoundShapes:
    """Device buffers and one I/O binding for one set of input shapes (the TensorRT demo's allocate_buffers).

    Inputs are copied into fixed buffers, so a CUDA graph captured for these shapes replays on the same addresses;
    an input passed again as the same unchanged array (text conditioning through a run) is not sent again.
    """

    def __init__(self, session, device: str, input_shapes: dict, dims: dict, graph_id: int):
        import onnxruntime as ort

        self.binding = session.io_binding()
        self.inputs, self.dtypes, self.outputs, self.sent = {}, {}, {}, {}
        self.graph_id = graph_id  # the CUDA graph captured for these shapes
        for meta in session.get_inputs():
            self.dtypes[meta.name] = ORT_DTYPES[meta.type]
            shape, dtype = input_shapes[meta.name], self.dtypes[meta.name]
            value = self.inputs[meta.name] = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)
            self.binding.bind_ortvalue_input(meta.name, value)
        for meta in session.get_outputs():
            shape = [dims.get(d) if isinstance(d, str) else d for d in meta.shape]
            if all(isinstance(d, int) for d in shape):  # known before the run: a fixed buffer
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, ORT_DTYPES[meta.type], device, 0)
                self.outputs[meta.name] = value
                self.binding.bind_ortvalue_output(meta.name, value)
            else:  # a size the inputs do not name (the VAE's pixels): ONNX Runtime allocates it on the device
                self.binding.bind_output(meta.name, device)

    def send(self, name: str, value) -> None:
        """VALUE (a numpy array, or an OrtValue already on the device: bound as is) into input NAME, unless it is
        the same array as last time, unchanged since."""
        import onnxruntime as ort

        if isinstance(value, ort.OrtValue):
            self.binding.bind_ortvalue_input(name, value)
            self.sent[name] = (None, None)  # the next array is copied into the buffer, bound again
            return
        last = self.sent.get(name)
        if last is not None and last[0] is value and np.array_equal(last[1], value):
            return  # constant through the run: sent once
        if last is not None and last[0] is None:  # an OrtValue was bound here before: back to the buffer
            self.binding.bind_ortvalue_input(name, self.inputs[name])
        self.inputs[name].update_inplace(np.ascontiguousarray(value, dtype=self.dtypes[name]))
        self.sent[name] = (value, np.array(value, copy=True))
