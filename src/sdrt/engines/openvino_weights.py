"""LoRAs on OpenVINO without recompiling per switch: the weights LoRAs change are inputs of a second compiled model.

With no LoRA merged, the engine runs the graph as OpenVINOEngine does (weights as constants: full speed). With one,
it runs a model in which each weight a LoRA has changed so far had its Constant replaced by a Parameter of the
same shape and type (named WEIGHT_INPUT + the initializer's name), fed a buffer holding base + the LoRAs' terms
(weight_merge.py, in the file's layout), or the file's own value, a read-only memory map of the ONNX external data
(the page cache holds it, nothing is copied), for a weight the current LoRAs leave alone. A switch is a merge into
those buffers (threads, one-thread BLAS, as on ONNX Runtime's CPU engine); that model is compiled once per input
shape and set of weights LoRAs have touched, so switches among LoRAs already seen compile nothing, and going back
to no LoRA runs the constants model again.

Chosen against the alternatives (measured in docs/guide/lora-engines.md): recompiling with new constants costs a
compile per switch; OpenVINO's stateful variables (ReadValue) are what these inputs are, with a copy into the
state per switch; low-rank inputs (x @ A @ B beside each layer) cannot hold LoHa, LoKr or full diffs exactly. The
price is that the plugin cannot pre-pack inputs as it does constants (per-step cost measured there).
"""

import numpy as np

from sdrt.engines.mapped import ReleasingPages
from sdrt.engines.onnx_weights import OnnxWeights
from sdrt.engines.openvino import (
    INSTALL_HINT,
    OpenVINOEngine,
    model_cache_dir,
    output_name,
    parse_backend,
    resolve_precision,
)
from sdrt.engines.openvino_ir import BF16_WEIGHT
from sdrt.engines.weight_merge import merge_all, merged_value
from sdrt.errors import ModelError

WEIGHT_INPUT = "sdrt_weight:"  # prefix of the inputs that replaced weight constants


class ReplaceableWeights:
    """The replaceable initializers of one ONNX file: their base values (maps), merged buffers and current values."""

    def __init__(self, model_file, threads: int):
        self.model_file, self.threads = model_file, threads
        self.base: dict[str, np.ndarray] = {}  # initializer -> read-only map of its bytes in the file
        self.buffers: dict[str, np.ndarray] = {}  # initializer -> base + terms, for those a LoRA changes (made once)
        self.current: dict[str, np.ndarray] = {}  # initializer -> its value now (a base map or a buffer)
        self.inputs: set[str] = set()  # initializers some LoRA has changed: the inputs of the LoRA variant

    def add(self, names) -> None:
        """Make NAMES replaceable (their base values mapped)."""
        new = sorted(set(names) - self.base.keys())
        if not new:
            return
        graph = OnnxWeights(self.model_file)
        try:
            missing = [name for name in new if name not in graph]
            if missing:
                raise ModelError(f"{self.model_file}: no initializer {missing[0]!r} (the weight map is out of date: "
                                 "re-export the model)")  # fmt: skip
            for name in new:
                self.base[name] = graph.view(name)
                self.current[name] = self.base[name]
        finally:
            graph.close()

    def variant(self) -> tuple[str, ...]:
        """The weights to feed as inputs now: every one a LoRA has changed so far while some LoRA is merged (so a
        switch among the LoRAs seen keeps one compiled model), none when all are the file's own (constants)."""
        if all(value is self.base[name] for name, value in self.current.items()):
            return ()
        return tuple(sorted(self.inputs))

    def patch(self, model, names) -> None:
        """Replace the Constants of the initializers NAMES in MODEL (an ov.Model) by Parameters (in a graph read
        from the bf16 IR, a MatMul weight's Convert from its bf16 constant: openvino_ir.py)."""
        import openvino.opset13 as ops

        wanted = set(names)
        params = []
        for op in model.get_ops():
            if not wanted or not is_weight(op):
                continue
            hit = wanted & (op.output(0).get_names() | {op.get_friendly_name()})
            if not hit:
                continue
            name = hit.pop()
            wanted.discard(name)
            shape, dtype = op.get_output_partial_shape(0), op.get_output_element_type(0)
            param = ops.parameter(shape, dtype, name=WEIGHT_INPUT + name)
            param.output(0).set_names({WEIGHT_INPUT + name})
            op.output(0).replace(param.output(0))
            params.append(param)
        if wanted:
            raise ModelError(f"{self.model_file}: OpenVINO's graph has no constant for {sorted(wanted)[0]!r}; LoRAs "
                             "need another backend for this model (--backend cpu)")  # fmt: skip
        model.add_parameters(params)

    def feeds(self, names) -> dict[str, np.ndarray]:
        return {WEIGHT_INPUT + name: self.current[name] for name in names}

    def merge(self, updates: dict[str, list]) -> None:
        """Values = base + UPDATES' terms for the named initializers, the base maps for every other one."""
        self.add(updates)
        jobs = []
        for name, terms in updates.items():
            base = self.base[name]
            if not terms:
                self.current[name] = base
                continue
            self.inputs.add(name)
            if base.dtype != np.float32:  # fp16 graphs: merged in float32, stored in the graph's type
                self.current[name] = self.buffers[name] = merged_value(base, terms)
                continue
            if name not in self.buffers:
                self.buffers[name] = np.empty(base.shape, np.float32)
            jobs.append((self.buffers[name], base, "same", base.shape, terms))
            self.current[name] = self.buffers[name]
        merge_all(jobs, self.threads)
        for name in self.current.keys() - updates.keys():
            self.current[name] = self.base[name]


def is_weight(op) -> bool:
    """OP holds an initializer's value: a Constant, or the Convert of a bf16 MatMul weight (openvino_ir.py)."""
    kind = op.get_type_name()
    return kind == "Constant" or (kind == "Convert" and op.get_friendly_name().startswith(BF16_WEIGHT))


class OpenVINOWeightsEngine(OpenVINOEngine):
    """OpenVINOEngine that takes LoRAs: with no LoRA merged it runs the weights as constants, exactly as OpenVINOEngine;
    with one, a model compiled with the weights LoRAs have changed so far as inputs (once per input shape and set of
    such weights: a switch among LoRAs already seen compiles nothing)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replaceable = ReplaceableWeights(self.model_file, self.threads)
        self.max_shapes *= 2  # a shape's constants model and its LoRA model

    def load(self) -> None:
        """OpenVINOEngine.load, weight inputs left out of input_names (OpenVINO moves a replaced Constant's tensor names
        onto its Parameter, so they are told apart by the WEIGHT_INPUT name each one also has)."""
        if self.input_names:
            return
        model = self.read()
        self.input_names = [port.get_any_name() for port in model.inputs
                            if not any(name.startswith(WEIGHT_INPUT) for name in port.get_names())]  # fmt: skip
        self.output_names = [output_name(port) for port in model.outputs]

    def prepare_weights(self, names) -> None:
        """Map NAMES' base values now (nothing is compiled: the LoRA model is made for the weights a LoRA changes)."""
        self.replaceable.add(names)

    def merge_weights(self, updates: dict[str, list]) -> None:
        """Run with each initializer in UPDATES = the file's value + its terms; every other one the file's own."""
        self.replaceable.merge(updates)

    def compiled_for(self, shapes: tuple):
        """(compiled model, infer request) for input SHAPES and the current weight inputs, compiled on first use."""
        variant = self.replaceable.variant()
        key = (shapes, variant)
        if key in self.compiled:
            self.compiled.move_to_end(key)
            return self.compiled[key]
        import openvino

        from sdrt.engines.openvino import core

        model = self.read()
        if variant:
            self.replaceable.patch(model, variant)
        model.reshape({name: openvino.PartialShape(list(shape)) for name, shape in shapes})
        try:
            with ReleasingPages(self.mapped_files):  # the source's pages given back as the compile reads them
                compiled = core().compile_model(model, self.device, self.config())
        except Exception as e:
            self.model = None  # patched, maybe: the next compile reads the graph afresh
            message = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ModelError(f"OpenVINO could not compile {self.model_file} for {self.device}: {message}") from None
        self.model = None
        self.compiles += 1
        for old in [k for k in self.compiled if variant and k[0] == shapes and k[1]]:  # fewer inputs: never run again
            del self.compiled[old]
        while len(self.compiled) >= self.max_shapes:
            self.compiled.popitem(last=False)
        self.compiled[key] = (compiled, compiled.create_infer_request())
        return self.compiled[key]

    def weight_feeds(self) -> dict[str, np.ndarray]:
        """The replaceable weights the compiled variant takes as inputs (none while no LoRA is active)."""
        return self.replaceable.feeds(self.replaceable.variant())


def create_openvino_engine(model_file, backend: str, keep_f32: bool = False, **options) -> OpenVINOWeightsEngine:
    """An unloaded OpenVINOEngine for MODEL_FILE on BACKEND ("openvino..."); KEEP_F32: this graph runs f32 on the
    CPU whatever the backend's precision (the text encoders: one call per prompt, and their output steers every step).
    """
    from sdrt.engines import openvino

    if not openvino.openvino_available():  # looked up when called (tests replace it)
        raise ModelError(f"the {backend} backend needs OpenVINO: {INSTALL_HINT}")
    target = parse_backend(backend)
    precision = resolve_precision(target)
    if keep_f32 and target.device == "CPU":
        precision = "f32"
    return OpenVINOWeightsEngine(model_file, target.device, precision, cache_dir=model_cache_dir(), **options)
