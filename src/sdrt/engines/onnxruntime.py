"""ONNX Runtime backend: CPU, and CUDA's execution provider (onnxruntime-gpu) with I/O binding."""

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from sdrt import cache_files
from sdrt.engines.cpu_host import cpu_signature, physical_cores
from sdrt.engines.ort_attention import VERSION as ATTENTION_VERSION
from sdrt.engines.ort_attention import tiled_attention
from sdrt.engines.ort_binding import MAX_SHAPE_SETS, BoundShapes, count_ops
from sdrt.engines.ort_weights import LiveWeights
from sdrt.engines.prepacked_swap import PrepackedSwap, SwapsPrepacked
from sdrt.engines.weight_merge import WholeArrays
from sdrt.errors import ModelError

log = logging.getLogger("sdrt.engines")


def _complete(cached: Path | None) -> bool:
    """CACHED (an optimised graph's path) is in a complete cache entry (its marker, its files at their sizes)."""
    return cached is not None and cache_files.is_complete(cached.parent)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.access(folder, os.W_OK)
    except OSError:
        return False


class OnnxRuntimeEngine(SwapsPrepacked):
    """One ONNX model in an onnxruntime.InferenceSession; on DEVICE "cuda" it runs through an I/O binding.

    STATIC_DIMS ({axis name: size}, a static profile) fixes the graph's dynamic axes when the session is created
    (free dimension overrides): ONNX Runtime then folds the shape arithmetic away, which leaves no CPU node (no
    Memcpy) in a CUDA graph and lets CUDA_GRAPH capture the run once per shape and replay it.
    """

    PREPACK_BEHIND = True  # LoRA weights in place: a prepacked session made in the background (prepacked_swap.py)

    def __init__(self, model_file: Path, providers: list, threads: int | None = None, device: str = "cpu",
                 static_dims: dict | None = None, cuda_graph: bool = False):  # fmt: skip
        self.model_file = Path(model_file)
        self.providers = providers
        self.threads = threads or physical_cores()
        self.device = device
        self.io_binding = device != "cpu"  # tests set it on the CPU too: the same code path
        self.static_dims = dict(static_dims or {})
        self.cuda_graph = cuda_graph
        self.session = None
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.memcpy_nodes: int | None = None  # Memcpy nodes ONNX Runtime added (from its optimized graph)
        self.optimized_file: Path | None = None
        self._shape_sets: dict = {}  # input shapes -> BoundShapes
        self.weights: dict[str, np.ndarray] = {}  # initializer -> replacement for a session built with it (set_weights)
        self._placed = None  # the OrtValues the session runs on in place of initializers: kept alive with it
        self._live: LiveWeights | None = None  # initializers rewritten in place (CPU, optimised-graph cache)
        self._whole: WholeArrays | None = None  # merge_weights where weights cannot be rewritten in place
        self._swap = PrepackedSwap(self._prepacked)  # its .live: the in-place session while loaded
        # A fused variant's engine: the export's graph, whose initializer names merge_weights takes (fused_weights.py)
        self.export_file: Path | None = None
        self._places = None

    def load(self) -> None:
        """Create the session, from the optimised-graph cache when it holds this model for this machine."""
        if self.session is not None:
            return
        try:
            cached = self._open()
        except ModelError as e:
            if not self.cuda_graph:
                raise
            # ONNX Runtime refuses CUDA graphs when a node stays on the CPU (a dynamic shape left): run without
            log.warning("%s: no CUDA graph (%s); running without", self.model_file, e)
            self.cuda_graph = False
            self.providers = [(p[0], {k: v for k, v in p[1].items() if k != "enable_cuda_graph"})
                              if isinstance(p, tuple) else p for p in self.providers]  # fmt: skip
            cached = self._open()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        if _complete(cached):
            self.optimized_file = cached
            if self.device != "cpu":
                self.memcpy_nodes = count_ops(cached)
                if self.memcpy_nodes:  # expected with dynamic shapes; at a static profile, a lost optimisation
                    report = log.warning if self.static_dims else log.info
                    report("%s: %d Memcpy nodes (CPU nodes between GPU kernels)", self.model_file, self.memcpy_nodes)

    def _open(self) -> Path | None:
        """The session, from the optimised-graph cache when it holds this model; the cache file (None: no cache)."""
        cached = self.cache_path()
        made = self._fill_cache(cached) if cached is not None and not _complete(cached) else None
        if self._live is not None:  # its buffers hold the values set: they must be what the session runs on
            if cached != self._live.optimised_file or not _complete(cached):
                raise ModelError(f"{self.model_file}: the optimised graph {self._live.optimised_file} its replaced "
                                 "weights are laid out for is gone: load the model again")  # fmt: skip
            self.session = self._swap.live = self._session(cached, False, overrides=self._live.overrides(), live=True)
            if not self._live.unfilled:
                self._written()
            return cached
        if made is not None and not self.weights:  # the session that filled the cache runs the file's weights
            self.session = made
            return cached
        if _complete(cached):
            try:
                overrides = self._overrides_for(cached)
                if overrides is not None:
                    self.session = self._session(cached, optimize=False, overrides=overrides)
            except ModelError as e:  # a damaged entry (its files at their sizes): removed, made again next load
                log.warning("%s: removing a damaged optimised graph (%s)", cached.parent, e)
                with cache_files.entry_lock(cached.parent, f"optimising {self.model_file}"):
                    cache_files.discard(cached.parent)
                self.session = None
        if self.session is None:
            overrides = {name: _ortvalue(array) for name, array in self.weights.items()}
            self.session = self._session(self.model_file, optimize=True, overrides=overrides)
        return cached

    def _fill_cache(self, cached: Path):
        """Optimise the model file into the cache entry of CACHED once, whatever the number of processes asking (the
        others wait, then read it: sdrt/cache_files.py); the session that wrote it, or None (another process did, the
        folder is read-only, or writing failed: no cache this time)."""
        if not _writable(cached.parent.parent):
            return None
        made = []

        def make(staging: Path) -> None:
            made.append(self._session(self.model_file, optimize=True, save_to=staging / cached.name))

        try:
            cache_files.ensure(cached.parent, f"optimising {self.model_file}", make)
        except (OSError, ModelError) as e:  # a full disk, say: run from the model file itself
            log.warning("%s: no optimised-graph cache (%s)", self.model_file, e)
        return made[0] if made else None

    def cache_path(self) -> Path | None:
        """Where this model's optimised graph lives: keyed by ONNX Runtime version, providers, CPU, static shapes and
        file."""
        import onnxruntime as ort

        if os.environ.get("SDRT_NO_ORT_CACHE") or not self.model_file.is_file():
            return None
        stat = self.model_file.stat()
        key = f"{ort.__version__}|{self.providers}|{cpu_signature()}|{stat.st_size}|{stat.st_mtime_ns}"
        key += f"|attention-v{ATTENTION_VERSION}" if self.device == "cpu" else ""  # older cached graphs are stale
        if self.static_dims:
            key += f"|{sorted(self.static_dims.items())}"
        return self.model_file.parent / ".ort-cache" / hashlib.sha256(key.encode()).hexdigest()[:16] / "model.onnx"

    def read_weights(self, names) -> dict[str, np.ndarray]:
        """Copies of the named initializers of the model file, as stored there (what set_weights replaces)."""
        from sdrt.engines.onnx_weights import read_initializers

        return read_initializers(self.model_file, names)

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Run with WEIGHTS (initializer name -> array of its shape, dtype and layout in the model file) in place of
        the file's values; every initializer not named is the file's own, and set_weights({}) gives back a session
        without replacements.

        On the CPU, with the optimised-graph cache, WEIGHTS are copied into buffers the session reads (ort_weights.py):
        only names not replaceable before make a new session. Elsewhere (CUDA: the session's initializers live on
        the device; no cache) every call makes a session with the replacements passed as initializers (on an
        un-optimised graph, with the NCHWc transformer off: it would lay filters out from the file's values).
        """
        if weights and self._in_place(weights.keys()):
            self._writing()
            self._live.write(weights)
            self._written()
            return
        self.weights, self._live = dict(weights), None
        self._rebuild()

    def merge_weights(self, updates: dict[str, list]) -> None:
        """Run with each initializer named in UPDATES = the file's value + its terms (weight_merge.py: low-rank
        products or whole arrays, in the file's layout); every other initializer is the file's own, so
        merge_weights({}) gives the file's values back, exactly.

        On the CPU, with the optimised-graph cache, the merge is written straight into the session's buffers from the
        base values kept beside them (no file read, no new session: measured 1.2 s for every layer of SD 1.5's UNet
        on 2 cores); elsewhere the merged arrays go to set_weights."""
        updates = self._fused_names(updates)
        if (updates or self._live is not None) and self._in_place(updates.keys()):
            self._writing()
            self._live.merge(updates)
            self._written()
            return
        if self._whole is None:
            self._whole = WholeArrays(self)
        self._whole.merge(updates)

    def prepare_weights(self, names) -> None:
        """Make NAMES replaceable now (the in-place session, its buffers holding the file's values), so that the first
        merge costs what later ones do; called before load, the engine's one session is that one. CPU only: on CUDA
        every merge makes a session anyway."""
        if self.device != "cpu" or self.weights:
            return
        names = list(self._fused_names({name: [] for name in names}))
        if self._in_place(names):
            self._writing()
            self._live.merge({})  # the buffers just made get the base values
            self._written()

    def _fused_names(self, updates: dict[str, list]) -> dict[str, list]:
        """UPDATES with the fused graph's initializers for the export's (a fused variant; as they are otherwise)."""
        if self.export_file is None or Path(self.export_file) == self.model_file:
            return updates
        if self._places is None:
            from sdrt.engines.fused_weights import FusedPlaces

            self._places = FusedPlaces(self.export_file, self.model_file)
        return self._places.translate(updates)

    def _in_place(self, names) -> bool:
        """Whether NAMES can be rewritten in place, making them replaceable (one new session) where they were not."""
        if self.device != "cpu" or (self._live is None and self.weights):
            return False
        cached = self.cache_path()
        if cached is not None and not _complete(cached) and self.session is None:
            self.load()  # the first session of a model fills the cache
        if not _complete(cached):
            return False
        live = self._live or LiveWeights(self.model_file, cached, self.threads)
        covered = live.cover(names)
        if covered is None:
            return False
        if self._live is None or covered:
            self._live = live
            self._rebuild()
        return True

    def _rebuild(self) -> None:
        """The session made again for the current weights (the old one's memory freed first); an unloaded engine
        stays unloaded (a staged engine loads when it runs)."""
        loaded = self.session is not None
        self.unload()
        if loaded:
            self.load()

    def _overrides_for(self, cached: Path) -> dict | None:
        """{cached-graph initializer: OrtValue} for self.weights, or None if some weight has no known place there."""
        if not self.weights:
            return {}
        from sdrt.engines import nchwc

        slots = nchwc.find_slots(self.model_file, cached, list(self.weights))
        if any(slots.get(name) is None for name in self.weights):
            return None
        laid = {slots[name][0]: nchwc.to_layout(array, slots[name][1]) for name, array in self.weights.items()}
        return {slot: _ortvalue(array) for slot, array in laid.items()}

    def _session(self, path: Path, optimize: bool, save_to: Path | None = None, overrides: dict | None = None,
                 live: bool = False, keep: bool = True):  # fmt: skip
        import onnxruntime as ort

        options = ort.SessionOptions()
        for name, value in (overrides or {}).items():
            options.add_initializer(name, value)
        if live and overrides:  # kernels read the replaced weights' buffers at run time (LiveWeights writes them)
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
        for axis, size in self.static_dims.items():
            options.add_free_dimension_override_by_name(axis, int(size))
        if save_to is not None:
            # Optimising a 3.4 GB UNet takes ~20 s; the saved graph then loads in ~1 s (same machine only:
            # ONNX Runtime lays convolutions out for this CPU's vector width).
            options.optimized_model_filepath = str(save_to)
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", save_to.name + ".data"
            )
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            # Measured (ORT 1.32): the NCHWc transformer lays filters out from the file's values and ignores
            # add_initializer's, so a replaced weight of an un-optimised graph needs it off.
            disabled = ["NchwcTransformer"] if overrides and optimize else None
            # The CPU runs the attention tiled (ort_attention.py): the graph from memory, weights from PATH's folder
            tiled = optimize and self.device == "cpu" and path == self.model_file and tiled_attention(path, options)
            session = ort.InferenceSession(tiled or str(path), options, providers=self.providers,
                                           disabled_optimizers=disabled)  # fmt: skip
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            message = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ModelError(f"cannot load {str(path)!r} (truncated or corrupt ONNX file?): {message}") from None
        if keep:
            self._placed = overrides  # ONNX Runtime reads these buffers for as long as the session runs
        return session

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            self.load()
        self._swap_in()
        if self.io_binding:
            return {name: _host(value) for name, value in self.run_device(feeds).items()}
        self._check_static(feeds)
        outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs, strict=True))

    def prepare(self, input_shapes: dict) -> BoundShapes:
        """Device buffers and the binding for INPUT_SHAPES ({input name: shape}), made once before the loop."""
        if self.session is None:
            self.load()
        key = tuple(sorted((name, tuple(int(d) for d in shape)) for name, shape in input_shapes.items()))
        bound = self._shape_sets.get(key)
        if bound is None:
            dims = dict(self.static_dims)
            for meta in self.session.get_inputs():  # axis names -> sizes, from the inputs' declared shapes
                for d, size in zip(meta.shape, input_shapes[meta.name], strict=True):
                    if isinstance(d, str):
                        dims[d] = int(size)
            while len(self._shape_sets) >= MAX_SHAPE_SETS:
                self._shape_sets.pop(next(iter(self._shape_sets)))
            graph_id = max((b.graph_id for b in self._shape_sets.values()), default=-1) + 1
            bound = self._shape_sets[key] = BoundShapes(self.session, self.device, dict(key), dims, graph_id)
        return bound

    def run_device(self, feeds: dict) -> dict:
        """Run through the binding of these input shapes: {output name: OrtValue on the device}, valid until the
        next run of this engine (fixed buffers are reused). A feed may be an OrtValue already on the device."""
        import onnxruntime as ort

        if self.session is None:
            self.load()
        self._swap_in()
        self._check_static(feeds)
        shapes = {name: tuple(value.shape() if isinstance(value, ort.OrtValue) else np.shape(value))
                  for name, value in feeds.items()}  # fmt: skip
        bound = self.prepare(shapes)
        for name, value in feeds.items():
            bound.send(name, value)
        run_options = None
        if self.cuda_graph:
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("gpu_graph_id", str(bound.graph_id))
        self.session.run_with_iobinding(bound.binding, run_options)
        values = bound.binding.get_outputs()
        return dict(zip(self.output_names, values, strict=True))

    def _check_static(self, feeds: dict) -> None:
        """Under a static profile, every input's named axes must have the profile's sizes."""
        if not self.static_dims:
            return
        from sdrt.errors import InvalidOption

        for meta in self.session.get_inputs():
            value = feeds.get(meta.name)
            shape = tuple(value.shape()) if hasattr(value, "device_name") else np.shape(value)
            want = tuple(self.static_dims.get(d, "?") if isinstance(d, str) else d for d in meta.shape)
            if len(shape) != len(want) or any(w != "?" and w != s for w, s in zip(want, shape, strict=False)):
                raise InvalidOption(
                    f"{self.model_file.parent.name} input {meta.name}", shape,
                    f"{want} (the static profile this engine was loaded for; load without `static` for other sizes)",
                )  # fmt: skip

    def unload(self) -> None:
        """Free the session; replaced weights stay (a later load runs on them again)."""
        self._swap.stale()
        self.session = self._placed = self._swap.live = None
        self._shape_sets = {}  # bindings of the old session


def _host(value) -> np.ndarray:
    """An output OrtValue as a numpy array the caller owns (a CPU OrtValue's numpy() is a view of its buffer)."""
    array = value.numpy()
    return np.array(array, copy=True) if value.device_name().lower() == "cpu" else array


def _ortvalue(array: np.ndarray):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
