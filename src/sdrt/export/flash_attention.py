"""Self-attention that ONNX Runtime's CPU provider runs without the full score matrix: a graph pass over the CPU
variant `sdrt optimize --target cpu` writes.

ONNX Runtime's transformer optimizer fuses a UNet's self-attention (the same input for q, k and v) into the
com.microsoft `Attention` operator (one packed (C, 3C) weight, columns [q | k | v]). Its CPU kernel (1.32,
contrib_ops/cpu/bert/attention.cc) computes the whole (batch, heads, tokens, tokens) score matrix: at 1024 px in
SD 1.5 (128x128 latents, 16384 tokens, 8 heads) that is 8 GiB per image in fp32, the hires fix's second pass on
the CPU. `MultiHeadAttention` (separate q, k, v of shape (B, S, C)) has a tiled flash-attention kernel on the CPU
(MlasFlashAttention, used when no mask, past or present state is given) that holds a few L2-sized blocks instead.
Cross-attention is fused to `MultiHeadAttention` already.

The pass turns each `Attention(x, W, b)` into `MatMul(x, W) -> Split(3, last axis) -> MultiHeadAttention(q, k, v, b)`:
the same packed weight and bias initializers (LoRA places found by value stay valid, engines/fused_weights.py), the
same arithmetic (one GEMM for q, k, v; the bias added per q/k/v block; softmax(q k^T * scale) v per head).
"""

import onnx
from onnx import helper

MS_DOMAIN = "com.microsoft"
# Attributes Attention and MultiHeadAttention share with the same meaning (scale 0: 1/sqrt(head size)).
SHARED_ATTRIBUTES = ("num_heads", "scale", "mask_filter_value")


def unpack_self_attention(graph: onnx.GraphProto) -> int:
    """Replace GRAPH's com.microsoft Attention nodes (packed weight and bias, nothing else) in place; their count.
    An Attention node with a mask, past state, extra outputs or attributes MultiHeadAttention lacks is left."""
    replaced = []
    for index, node in enumerate(graph.node):
        if node.op_type == "Attention" and node.domain == MS_DOMAIN and _plain(node):
            replaced.append((index, _unpacked(node, f"{node.name or 'Attention'}_{index}")))
    for index, nodes in reversed(replaced):  # from the end: earlier indices stay valid
        graph.node.pop(index)
        for offset, new in enumerate(nodes):
            graph.node.insert(index + offset, new)
    return len(replaced)


def _plain(node: onnx.NodeProto) -> bool:
    inputs = [name for name in node.input]
    outputs = [name for name in node.output if name]
    names = {a.name for a in node.attribute}
    return len(inputs) == 3 and all(inputs) and len(outputs) == 1 and names <= set(SHARED_ATTRIBUTES)


def _unpacked(node: onnx.NodeProto, prefix: str) -> list[onnx.NodeProto]:
    """Attention(x (B, S, C), W (C, 3C), b (3C)) -> [MatMul, Split, MultiHeadAttention] with its output name."""
    x, weight, bias = node.input
    packed, q, k, v = (f"{prefix}/{part}" for part in ("qkv", "q", "k", "v"))
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return [
        helper.make_node("MatMul", [x, weight], [packed], name=f"{prefix}/MatMul_qkv"),  # (B, S, 3C)
        helper.make_node("Split", [packed], [q, k, v], name=f"{prefix}/Split_qkv", axis=-1),  # 3 x (B, S, C)
        helper.make_node("MultiHeadAttention", [q, k, v, bias], [node.output[0]], name=f"{prefix}/MultiHeadAttention",
                         domain=MS_DOMAIN, **attributes),  # fmt: skip
    ]
