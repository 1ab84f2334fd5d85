"""TensorRT backend: serialised engines built by `sdrt build`, run with tensorrt + cuda-python (no torch).

Written against the TensorRT 10 Python API (Runtime.deserialize_cuda_engine, IExecutionContext with a
user-managed activation workspace, set_input_shape / set_tensor_address / execute_async_v3, weight streaming
budget) and cuda-python's runtime bindings. NOT YET RUN ON A GPU: tests/test_gpu.py (marked tensorrt) checks it
wherever tensorrt and a GPU exist. Everything that needs no GPU lives in plan.py and is tested in CI.

Memory: one activation workspace is shared by all engines (they run one after another on one stream); each
engine keeps one device buffer per I/O tensor, grown to the largest shape seen. For static profiles the UNet step
is captured once into a CUDA graph and replayed (inputs and outputs stay at the same device addresses).
"""

import json
from pathlib import Path

import numpy as np

from sdrt.engines.engine_files import EngineIdentity, select_engine, source_fingerprint
from sdrt.engines.plan import aligned, static_profile
from sdrt.engines.weight_merge import WholeArrays
from sdrt.errors import ModelError, SdrtError

ENGINES_DIR = "engines"  # MODEL_DIR/engines/<model name>/<key>.plan + <key>.json


def cudart():
    """cuda-python's runtime module (cuda.bindings.runtime since cuda-python 12.6, cuda.cudart before)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def check(result):
    """cuda-python calls return (error, *values): raise on error, return the values (one value unwrapped)."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1]
        raise RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def device_count() -> int:
    return check(cudart().cudaGetDeviceCount())


def compute_capability(device: int = 0) -> str:
    """'8.6' for an RTX 30x0, '9.0' for an H100: the GPU generation a TensorRT engine is built for."""
    props = check(cudart().cudaGetDeviceProperties(device))
    return f"{props.major}.{props.minor}"


def device_name(device: int = 0) -> str:
    name = check(cudart().cudaGetDeviceProperties(device)).name
    return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")


def trt_version() -> str:
    import tensorrt as trt

    return trt.__version__


class DeviceBuffer:
    """cudaMalloc'd bytes, freed explicitly or when collected."""

    def __init__(self, nbytes: int):
        self.nbytes = aligned(max(int(nbytes), 1))
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes)))

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr))
            self.ptr = 0

    def __del__(self):
        try:
            self.free()
        except Exception:  # interpreter shutdown: CUDA may be gone already
            pass


class Workspace:
    """One activation workspace for every engine of a pipeline: sized to the largest engine's need."""

    def __init__(self):
        self.buffer: DeviceBuffer | None = None
        self.users = 0

    def ensure(self, nbytes: int) -> int:
        """A device pointer to at least NBYTES (a new allocation when it must grow: set it on every context again)."""
        if self.buffer is None or self.buffer.nbytes < nbytes:
            if self.buffer is not None:
                self.buffer.free()
            self.buffer = DeviceBuffer(nbytes)
        return self.buffer.ptr

    def release(self) -> None:
        self.users = max(0, self.users - 1)
        if self.users == 0 and self.buffer is not None:
            self.buffer.free()
            self.buffer = None


SHARED_WORKSPACE = Workspace()
_STREAM = None


def stream() -> int:
    """The one CUDA stream sdrt runs on."""
    global _STREAM
    if _STREAM is None:
        _STREAM = check(cudart().cudaStreamCreate())
    return _STREAM


def engine_candidates(folder: Path) -> list[tuple[EngineIdentity, Path]]:
    """(identity, .plan path) of every engine built under FOLDER (MODEL_DIR/engines/<model>)."""
    found = []
    for meta in sorted(Path(folder).glob("*.json")):
        try:
            identity = EngineIdentity.from_json(json.loads(meta.read_text())["identity"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a foreign or damaged file: not an engine of ours
        if meta.with_suffix(".plan").is_file():
            found.append((identity, meta.with_suffix(".plan")))
    return found


class TensorRTEngine:
    """One model's TensorRT engine: load picks the engine built for this GPU and TensorRT, run(feeds) -> outputs."""

    def __init__(self, model_file: Path, workspace: Workspace | None = None, streaming_budget: int | None = None,
                 cuda_graph: bool = True):  # fmt: skip
        self.model_file = Path(model_file)
        self.name = self.model_file.parent.name  # "unet", ...
        self.model_dir = self.model_file.parent.parent
        self.workspace = workspace or SHARED_WORKSPACE
        self.streaming_budget = streaming_budget
        self.cuda_graph = cuda_graph
        self.engine = self.context = self.identity = None
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.buffers: dict[str, DeviceBuffer] = {}
        self.graph = None  # (input shapes, graph exec) of the captured static step
        self._workspace_ptr = 0
        self.weights: dict[str, np.ndarray] = {}  # ONNX initializer name -> replacement (set_weights, refit)
        self._whole: WholeArrays | None = None  # merge_weights: the base values of the weights merged
        self._refitted: set[str] = set()  # names the engine now holds replaced values of

    def load(self, shapes: dict | None = None) -> None:
        """Deserialize the engine built for this GPU / TensorRT / ONNX file (covering SHAPES); refuse any other."""
        if self.engine is not None:
            return
        try:
            import tensorrt as trt
        except ImportError as e:
            message = f"backend 'tensorrt' needs TensorRT and cuda-python: pip install 'sdrt[tensorrt]' ({e})"
            raise SdrtError(message) from None
        candidates = engine_candidates(self.model_dir / ENGINES_DIR / self.name)
        identity = select_engine(
            [c for c, _ in candidates], self.name, compute_capability(), trt.__version__,
            source_fingerprint(self.model_file), shapes, str(self.model_dir), self.streaming_budget is not None,
        )  # fmt: skip
        path = dict((c.key(), p) for c, p in candidates)[identity.key()]
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ModelError(f"TensorRT could not load {path}: rebuild it with `sdrt build {self.model_dir}`")
        if self.streaming_budget is not None and getattr(engine, "streamable_weights_size", 0) > 0:
            engine.weight_streaming_budget_v2 = int(min(self.streaming_budget, engine.streamable_weights_size))
        self.engine, self.identity, self._runtime = engine, identity, runtime
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) != mode]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.workspace.users += 1
        self._refitted = set()
        if self.weights:
            self._refit()

    def read_weights(self, names) -> dict[str, np.ndarray]:
        """Copies of the named initializers of the ONNX file the engine was built from."""
        from sdrt.engines.onnx_weights import read_initializers

        return read_initializers(self.model_file, names)

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Run with WEIGHTS (ONNX initializer name -> array in the ONNX layout) in place of the built ones; names
        set before and not now go back to the ONNX file's values. A refit (trt.Refitter.refit_cuda_engine) of an
        engine built with `sdrt build --refit`: no rebuild, the engine stays loaded."""
        self.weights = dict(weights)
        if self.engine is not None:
            self._refit()

    def merge_weights(self, updates: dict[str, list]) -> None:
        """Run with each initializer named in UPDATES = the ONNX file's value + its terms (weight_merge.py), the
        others the file's own: the merged arrays refitted (set_weights)."""
        if self._whole is None:
            self._whole = WholeArrays(self)
        self._whole.merge(updates)

    def _refit(self) -> None:
        import tensorrt as trt

        from sdrt.engines.engine_files import refit_plan

        refitter = trt.Refitter(self.engine, trt.Logger(trt.Logger.WARNING))
        prototypes = {}
        for name in refitter.get_all_weights():  # refittable weights, named as the ONNX parser named them
            proto = refitter.get_weights_prototype(name)
            prototypes[name] = (tuple(proto.shape), np.dtype(trt.nptype(proto.dtype)))
        plan = refit_plan(prototypes, self.weights, self._refitted, self.read_weights)
        for name, array in plan.arrays.items():
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise ModelError(f"TensorRT refused the weight {name!r} for {self.name}")
        self._refit_arrays = plan.arrays  # TensorRT reads host memory until refit_cuda_engine returns
        if not refitter.refit_cuda_engine():
            raise ModelError(f"TensorRT could not refit {self.name} (missing: {refitter.get_missing_weights()})")
        self._refit_arrays = None
        self._refitted = set(self.weights)
        self.graph = None  # a captured CUDA graph is re-captured on the refitted engine

    def _device_memory(self) -> int:
        size = getattr(self.engine, "device_memory_size_v2", None)
        return int(size if size is not None else self.engine.device_memory_size)

    def _bind(self, name: str, nbytes: int) -> int:
        buf = self.buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.free()
            self.buffers[name] = buf = DeviceBuffer(nbytes)
            self.graph = None  # addresses changed: a captured graph is stale
        self.context.set_tensor_address(name, buf.ptr)
        return buf.ptr

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy FEEDS to the device (cast to the engine's I/O dtypes), run, copy the outputs back as float32."""
        shapes = {n: tuple(np.shape(v)) for n, v in feeds.items()}
        if self.engine is None:
            self.load(shapes)
        from sdrt.engines.plan import profile_covers

        if not profile_covers(self.identity.profile, shapes):  # another built engine may cover these shapes
            self.unload()
            self.load(shapes)
        rt, s = cudart(), stream()
        ptr = self.workspace.ensure(self._device_memory())
        if ptr != self._workspace_ptr:
            if hasattr(self.context, "set_device_memory"):  # TensorRT >= 10.1
                self.context.set_device_memory(ptr, self._device_memory())
            else:
                self.context.device_memory = ptr
            self._workspace_ptr, self.graph = ptr, None
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        hosts = {}
        for name in self.input_names:
            host = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])  # no copy when already so
            hosts[name] = host
            self.context.set_input_shape(name, host.shape)
            dev = self._bind(name, host.nbytes)
            check(rt.cudaMemcpyAsync(dev, host.ctypes.data, host.nbytes, h2d, s))
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = np.empty(shape, dtype=self.dtypes[name])
            self._bind(name, outputs[name].nbytes)
        self._execute(shapes, s)
        for name, host in outputs.items():
            check(rt.cudaMemcpyAsync(host.ctypes.data, self.buffers[name].ptr, host.nbytes, d2h, s))
        check(rt.cudaStreamSynchronize(s))
        return {n: v.astype(np.float32, copy=False) if v.dtype == np.float16 else v for n, v in outputs.items()}

    def _execute(self, shapes: dict, s: int) -> None:
        """execute_async_v3, or for a static profile a CUDA graph of it, captured on the second call and replayed."""
        rt = cudart()
        if self.graph is not None and self.graph[0] == shapes:
            check(rt.cudaGraphLaunch(self.graph[1], s))
            return
        if not self.context.execute_async_v3(s):
            raise RuntimeError(f"TensorRT failed to run {self.name}")
        if self.cuda_graph and static_profile(self.identity.profile):
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
            check(rt.cudaStreamSynchronize(s))  # the first enqueue did TensorRT's deferred set-up
            check(rt.cudaStreamBeginCapture(s, mode))
            try:
                captured = self.context.execute_async_v3(s)
            finally:
                err, graph = rt.cudaStreamEndCapture(s)
            if captured and err == rt.cudaError_t.cudaSuccess:
                self.graph = (shapes, check(rt.cudaGraphInstantiate(graph, 0)))
            else:  # an engine that cannot be captured (some plugins, weight streaming): run it uncaptured
                self.cuda_graph = False

    def unload(self) -> None:
        for buf in self.buffers.values():
            buf.free()
        self.buffers.clear()
        if self.engine is not None:
            self.workspace.release()
        self.graph = self.context = self.engine = self.identity = None
        self._workspace_ptr = 0
