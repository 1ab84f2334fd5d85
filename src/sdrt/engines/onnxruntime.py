"""ONNX Runtime backend: CPU, and CUDA's execution provider (onnxruntime-gpu) with I/O binding."""

import hashlib
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np

from sdrt.errors import ModelError


def cpu_signature() -> str:
    """Machine type and CPU feature flags: what an optimised ONNX Runtime CPU graph depends on."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + ":" + hashlib.sha256(flags.encode()).hexdigest()[:12]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError:
        return False


def physical_cores() -> int:
    """Cores to use for intra-op threads: hyperthreads slow convolutions down more than they help."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def cuda_providers(device_id: int = 0, gpu_mem_limit: int | None = None) -> list:
    """CUDA execution provider options (onnxruntime's documented CUDA EP keys), CPU as fallback for unsupported ops.

    kSameAsRequested keeps the arena at what was asked for (ORT's default doubles it), so peak VRAM follows the model.
    """
    options = {
        "device_id": device_id,
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",  # EXHAUSTIVE re-benchmarks every new shape: slow first steps
        "do_copy_in_default_stream": True,
        "cudnn_conv_use_max_workspace": "1",
        "prefer_nhwc": "1",
    }
    if gpu_mem_limit:
        options["gpu_mem_limit"] = int(gpu_mem_limit)
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


class OnnxRuntimeEngine:
    """One ONNX model in an onnxruntime.InferenceSession; on DEVICE "cuda" it runs through an I/O binding."""

    def __init__(self, model_file: Path, providers: list, threads: int | None = None, device: str = "cpu"):
        self.model_file = Path(model_file)
        self.providers = providers
        self.threads = threads or physical_cores()
        self.device = device
        self.io_binding = device != "cpu"  # tests set it on the CPU too: the same code path
        self.session = None
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.weights: dict[str, np.ndarray] = {}  # initializer name -> replacement (set_weights)
        self._placed = None  # the OrtValues the session runs on in place of initializers: kept alive with it
        self._live: dict | None = None  # file initializer -> (the buffer the session reads, its layout there)

    def load(self) -> None:
        """Create the session, from the optimised-graph cache when it holds this model for this machine."""
        if self.session is not None:
            return
        cached = self.cache_path()
        if cached is not None and not cached.is_file() and self.weights:
            self._session(self.model_file, optimize=True, save_to=cached)  # fill the cache with the file's own weights
        if cached is not None and cached.is_file():
            try:
                overrides = self._overrides_for(cached)
                if overrides is not None:
                    self.session = self._session(cached, optimize=False, overrides=overrides, live=True)
            except ModelError:
                self.session = None  # a damaged cache entry: fall back to the model itself
        if self.session is None:
            self._live = None  # an un-optimised graph's session: a new set of weights rebuilds it
            overrides = {name: _ortvalue(array) for name, array in self.weights.items()}
            self.session = self._session(self.model_file, optimize=True, save_to=None if overrides else cached,
                                         overrides=overrides)  # fmt: skip
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def cache_path(self) -> Path | None:
        """Where this model's optimised graph lives: keyed by ONNX Runtime version, providers, CPU and file."""
        import onnxruntime as ort

        if os.environ.get("SDRT_NO_ORT_CACHE") or not self.model_file.is_file():
            return None
        stat = self.model_file.stat()
        key = f"{ort.__version__}|{self.providers}|{cpu_signature()}|{stat.st_size}|{stat.st_mtime_ns}"
        return self.model_file.parent / ".ort-cache" / hashlib.sha256(key.encode()).hexdigest()[:16] / "model.onnx"

    def read_weights(self, names) -> dict[str, np.ndarray]:
        """Copies of the named initializers of the model file, as stored there (what set_weights replaces)."""
        from sdrt.engines.onnx_weights import OnnxWeights

        graph = OnnxWeights(self.model_file)
        try:
            return {name: graph.read(name) for name in names}
        finally:
            graph.close()

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Run with WEIGHTS (initializer name -> array of its shape, dtype and layout in the model file) in place of
        the file's values; every initializer not named, and all of them after set_weights({}), is the file's own.

        A new set of names rebuilds the session from the optimised-graph cache with the replacements passed as
        initializers (SessionOptions.add_initializer) in buffers the engine owns: the cached graph is never
        rewritten, so it keeps the file's weights. Where the optimiser re-laid a weight out (ONNX Runtime's NCHWc
        convolutions), the replacement is laid out the same way (nchwc.py; the place of each weight is found once
        per cache by matching the file's values, and kept beside it). Such a session is built without prepacking
        ("session.disable_prepacking"), so every kernel reads the weights from those buffers at run time: the same
        names with new values are then copied into the buffers, and no session is built (measured: the same
        outputs as a rebuilt session, bit for bit; with prepacking, MatMul keeps its packed copy of the old values).
        """
        self.weights = dict(weights)
        if self.session is None:
            return
        if self._live is not None and set(self.weights) == set(self._live):
            from sdrt.engines import nchwc

            for name, array in self.weights.items():
                buffer, layout = self._live[name]
                nchwc.write_layout(buffer, array, layout)
            return
        self.session = self._placed = self._live = None  # free the old session's memory before the new one is built
        self.load()

    def _overrides_for(self, cached: Path) -> dict | None:
        """{cached-graph initializer: OrtValue} for self.weights, or None if some weight has no known place there."""
        if not self.weights:
            return {}
        from sdrt.engines import nchwc

        slots = nchwc.find_slots(self.model_file, cached, list(self.weights))
        if any(slots.get(name) is None for name in self.weights):
            return None
        live = {}
        for name, array in self.weights.items():  # buffers of the engine's own: set_weights writes into them
            slot, layout = slots[name]
            laid = nchwc.to_layout(array, layout)
            live[name] = (np.array(laid, copy=True) if laid is array else np.ascontiguousarray(laid), layout)
        overrides = {slots[name][0]: _ortvalue(buffer) for name, (buffer, _) in live.items()}
        self._live = live
        return overrides

    def _session(self, path: Path, optimize: bool, save_to: Path | None = None, overrides: dict | None = None,
                 live: bool = False):  # fmt: skip
        import onnxruntime as ort

        options = ort.SessionOptions()
        for name, value in (overrides or {}).items():
            options.add_initializer(name, value)
        if live and overrides:  # kernels read the replaced weights' buffers at run time (set_weights writes them)
            options.add_session_config_entry("session.disable_prepacking", "1")
        level = ort.GraphOptimizationLevel
        options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # No arena: each session's arena would keep its own peak activations for good (three sessions, three
        # peaks); plain allocations give that memory back: 0.5 GB less peak RSS for SD 1.5 at 256x256.
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = True
        options.log_severity_level = 3  # errors only
        staging = None
        if save_to is not None and _writable(save_to.parent.parent):
            # Optimising a 3.4 GB UNet takes ~20 s; the saved graph then loads in ~1 s (same machine only:
            # ONNX Runtime lays convolutions out for this CPU's vector width).
            staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=save_to.parent.parent))
            options.optimized_model_filepath = str(staging / "model.onnx")
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", "model.onnx.data"
            )
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            # Measured (ORT 1.32): the NCHWc transformer lays filters out from the file's values and ignores
            # add_initializer's, so a replaced weight of an un-optimised graph needs it off.
            disabled = ["NchwcTransformer"] if overrides and optimize else None
            session = ort.InferenceSession(str(path), options, providers=self.providers, disabled_optimizers=disabled)
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            message = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ModelError(f"cannot load {str(path)!r} (truncated or corrupt ONNX file?): {message}") from None
        finally:
            if staging is not None and not (staging / "model.onnx").is_file():
                shutil.rmtree(staging, ignore_errors=True)
        if staging is not None:
            try:
                staging.rename(save_to.parent)
            except OSError:  # another process filled the cache first
                shutil.rmtree(staging, ignore_errors=True)
        self._placed = overrides  # ONNX Runtime reads these buffers for as long as the session runs
        return session

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            self.load()
        if self.io_binding:
            return self.run_bound(feeds)
        outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs, strict=True))

    def run_bound(self, feeds: dict) -> dict[str, np.ndarray]:
        """Run with inputs copied once to the device and outputs allocated there, then copied back.

        A feed may be an onnxruntime.OrtValue already on the device (latents kept there between steps): bound as is.
        """
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))

    def unload(self) -> None:
        self.session = self._placed = self._live = None


def _ortvalue(array: np.ndarray):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
