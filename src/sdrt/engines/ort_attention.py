"""The exported graphs' attention, run by ONNX Runtime's CPU provider without the whole score matrix.

`sdrt export` traces attention as diffusers' classic AttnProcessor computes it (to_onnx.classic_attention):

    q, k, v (B, N, C) -> head_to_batch_dim: Reshape (B, N, h, d), Transpose (0, 2, 1, 3), Reshape (B*h, N, d)
    scores = q k^T * scale  [+ 0 * zeros(B*h, N, M): torch.baddbmm with beta=0 keeps its input]      (B*h, N, M)
    out = softmax(scores) v  -> batch_to_head_dim: Reshape (B, h, N, d), Transpose, Reshape (B, N, C)

Every CPU engine then holds (B*h, N, M) scores, twice (the zeros and the product): at 512x512 in SD 1.5 (4096
tokens, 8 heads, batch 2) 1 GiB per tensor, at 1024x1024 8 GiB per image: the UNet call that does not fit 24 GB.
com.microsoft MultiHeadAttention computes the same softmax(q k^T * scale) v per head from q, k, v of shape (B, N, C)
with ONNX Runtime's tiled (flash) CPU kernel, which holds a few L2-sized blocks of scores instead.

rewrite(graph) replaces each such pattern in place: one MultiHeadAttention node from the projected q, k, v to the
pattern's (B, N, C) output, with the pattern's head count and scale; everything else (every initializer: LoRA
places by name stay valid) is untouched, and nodes left without consumers are dropped. A graph it does not
recognise stays as it is. The CPU engine runs the rewritten graph from memory, its weights read from the model's
own external data file: no copy on disk or in memory.
"""

import collections
from pathlib import Path

import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
VERSION = 1  # part of the optimised-graph cache key: a new rewrite makes old cached graphs stale


class _Graph:
    """GRAPH's producers, consumers and constants, for matching."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers = collections.defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.initializers = {t.name: t for t in graph.initializer}

    def node(self, tensor: str, op_type: str):
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op_type else None

    def constant(self, tensor: str):
        """TENSOR's value if it is a small constant (a Constant node or an initializer stored inline), else None."""
        if tensor in self.initializers:
            init = self.initializers[tensor]
            stored_outside = init.data_location == onnx.TensorProto.EXTERNAL
            return None if stored_outside else numpy_helper.to_array(init)
        node = self.node(tensor, "Constant")
        if node is None:
            return None
        value = next((a for a in node.attribute if a.name == "value"), None)
        return numpy_helper.to_array(value.t) if value is not None else None


def _attr(node, name, default=None):
    found = next((a for a in node.attribute if a.name == name), None)
    return helper.get_attribute_value(found) if found is not None else default


def _heads_split(g: _Graph, tensor: str):
    """(x, heads) when TENSOR is head_to_batch_dim(x): Reshape(Transpose(Reshape(x, (B, N, h, d)), 0213), ...)."""
    outer = g.node(tensor, "Reshape")
    transpose = outer and g.node(outer.input[0], "Transpose")
    inner = transpose and g.node(transpose.input[0], "Reshape")
    if inner is None or list(_attr(transpose, "perm", [])) != [0, 2, 1, 3]:
        return None
    heads = _dim(g, inner.input[1], 2)
    return (inner.input[0], heads) if heads else None


def _dim(g: _Graph, shape: str, index: int):
    """Entry INDEX of the shape tensor SHAPE when it is a constant there (a Concat of pieces, or a whole constant)."""
    whole = g.constant(shape)
    if whole is not None:
        return int(whole.reshape(-1)[index]) if whole.size > index and whole.reshape(-1)[index] > 0 else None
    concat = g.node(shape, "Concat")
    if concat is None or len(concat.input) <= index:
        return None
    piece = g.constant(concat.input[index])
    return int(piece.reshape(-1)[0]) if piece is not None and piece.size == 1 and piece.reshape(-1)[0] > 0 else None


def _scaled_product(g: _Graph, tensor: str):
    """(matmul node, scale) when TENSOR is MatMul(q, k^T) * scale, plus 0 * zeros (baddbmm's beta=0) or not."""
    node = g.producer.get(tensor)
    if node is not None and node.op_type == "Add":  # baddbmm: alpha * (q k^T) + beta * input, beta = 0
        for keep, drop in ((0, 1), (1, 0)):
            if _is_zero_term(g, node.input[drop]):
                return _scaled_product(g, node.input[keep])
        return None
    if node is None or node.op_type not in ("Mul", "Div"):
        return None
    for product, factor in ((0, 1), (1, 0)) if node.op_type == "Mul" else ((0, 1),):
        matmul = g.node(node.input[product], "MatMul")
        value = g.constant(node.input[factor])
        if matmul is not None and value is not None and value.size == 1:
            scale = float(value.reshape(-1)[0])
            return matmul, (scale if node.op_type == "Mul" else 1.0 / scale)
    return None


def _is_zero_term(g: _Graph, tensor: str) -> bool:
    """TENSOR = zeros * c or c * zeros (ConstantOfShape of 0), or 0 * anything: a term that adds nothing."""
    node = g.node(tensor, "Mul")
    if node is None:
        return False
    for a, b in ((0, 1), (1, 0)):
        value = g.constant(node.input[b])
        if value is not None and value.size == 1 and float(value.reshape(-1)[0]) == 0.0:
            return True
        filler = g.node(node.input[a], "ConstantOfShape")
        fill = filler is not None and _attr(filler, "value")
        if filler is not None and (fill is None or not numpy_helper.to_array(fill).any()):
            return True
    return False


def _heads_merge(g: _Graph, tensor: str, heads: int):
    """The output name when TENSOR (B*h, N, d) only feeds batch_to_head_dim: Reshape (B, h, N, d), Transpose 0213,
    Reshape (B, N, C)."""
    reshape = _only_consumer(g, tensor, "Reshape")
    transpose = reshape and _only_consumer(g, reshape.output[0], "Transpose")
    merged = transpose and _only_consumer(g, transpose.output[0], "Reshape")
    if merged is None or list(_attr(transpose, "perm", [])) != [0, 2, 1, 3] or _dim(g, reshape.input[1], 1) != heads:
        return None
    return merged.output[0]


def _only_consumer(g: _Graph, tensor: str, op_type: str):
    """The one non-Shape node reading TENSOR, if it is an OP_TYPE (Shape nodes only feed the pattern's reshapes)."""
    readers = [n for n in g.consumers.get(tensor, []) if n.op_type != "Shape"]
    return readers[0] if len(readers) == 1 and readers[0].op_type == op_type else None


def _match(g: _Graph, softmax: onnx.NodeProto):
    """A MultiHeadAttention node that replaces the attention around SOFTMAX, or None."""
    if _attr(softmax, "axis", -1) not in (-1, 2):
        return None
    scores_in = softmax.input[0]
    upcast = g.node(scores_in, "Cast")
    if upcast is not None and _attr(upcast, "to") == onnx.TensorProto.FLOAT:  # upcast_softmax (the VAE's attention)
        scores_in = upcast.input[0]
    found = _scaled_product(g, scores_in)
    if found is None:
        return None
    scores, scale = found
    key_t = g.node(scores.input[1], "Transpose")
    if key_t is None or list(_attr(key_t, "perm", [])) != [0, 2, 1]:
        return None
    q, k = _heads_split(g, scores.input[0]), _heads_split(g, key_t.input[0])
    probs = softmax.output[0]
    cast = _only_consumer(g, probs, "Cast")
    if cast is not None:  # diffusers casts the probabilities back to the query's dtype: float to float here
        probs = cast.output[0]
    weighted = _only_consumer(g, probs, "MatMul")
    v = weighted and weighted.input[0] == probs and _heads_split(g, weighted.input[1])
    if not (q and k and v) or len({q[1], k[1], v[1]}) != 1:
        return None
    heads = q[1]
    output = _heads_merge(g, weighted.output[0], heads)
    if output is None:
        return None
    return helper.make_node(
        "MultiHeadAttention", [q[0], k[0], v[0]], [output], name=f"{softmax.name}/MultiHeadAttention",
        domain=MS_DOMAIN, num_heads=heads, scale=scale,
    )  # fmt: skip


def rewrite(graph: onnx.GraphProto) -> int:
    """Replace GRAPH's classic attention patterns by MultiHeadAttention, in place; how many were replaced."""
    g = _Graph(graph)
    fused = [m for m in (_match(g, n) for n in graph.node if n.op_type == "Softmax") if m is not None]
    if not fused:
        return 0
    replaced = {node.output[0] for node in fused}
    kept = [n for n in graph.node if not set(n.output) & replaced]  # the old producers of the patterns' outputs
    for node in fused:  # each right after the producer of its last input: the graph stays topologically sorted
        last = max((i for i, n in enumerate(kept) if set(n.output) & set(node.input)), default=-1)
        kept.insert(last + 1, node)
    del graph.node[:]
    graph.node.extend(_live(kept, graph))
    return len(fused)


def _live(nodes: list, graph: onnx.GraphProto) -> list:
    """NODES without those whose outputs nothing reads (the replaced patterns' remains), in order."""
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(nodes):
        if any(out in needed for out in node.output):
            live.append(node)
            needed.update(name for name in node.input if name)
    return live[::-1]


def rewritten_model(model_file) -> bytes | None:
    """MODEL_FILE's graph with its attention rewritten, serialized, its external data still referenced by location
    (run it with the model's folder as the external initializers' folder); None when it has no such attention."""
    model = onnx.load(str(model_file), load_external_data=False)
    if not rewrite(model.graph):
        return None
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model.SerializeToString()


def tiled_attention(model_file, options) -> bytes | None:
    """MODEL_FILE's graph rewritten for an onnxruntime InferenceSession, OPTIONS (SessionOptions) told where its
    external data lives; None when it has no attention to rewrite (run the file itself)."""
    model = rewritten_model(model_file)
    if model is not None:
        folder = str(Path(model_file).parent)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    return model
