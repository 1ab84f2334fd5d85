"""Graph edits OpenVINO needs before it compiles an exported graph.

diffusers' classic attention (what `sdrt export` traces) computes its scores as `torch.baddbmm(empty, q, k^T,
beta=0, alpha=scale)`, exported as `scale * (q k^T) + 0 * zeros(B*h, N, M)`. With dynamic shapes OpenVINO leaves the
zero term to run time; once sdrt reshapes the model to a request's static shape, its constant folding makes the zeros
a constant: 1 GiB per attention layer of SD 1.5 at 512x512 (batch 2, 8 heads, 4096^2 scores), 16 GiB at 1024. That
was the 6.6 GiB peak of compiling the UNet at 512 (2.7 GiB at 256). The term adds nothing, so it is removed from the
ov.Model first: the attention is then the plain scale * q k^T -> softmax -> v that OpenVINO fuses into its own
scaled-dot-product attention.
"""


def drop_zero_terms(model) -> int:
    """Bypass every Add(x, 0 * ...) before a Softmax in MODEL (an openvino.Model), in place: its consumers read x
    (the scores, of the zeros' shape); how many."""
    dropped = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Add" or not _feeds_softmax(node):
            continue
        for index in (0, 1):
            if _zero_term(node.input_value(index)):
                node.output(0).replace(node.input_value(1 - index))
                dropped += 1
                break
    return dropped


def _feeds_softmax(node) -> bool:
    """NODE's output goes to a Softmax, directly or through a Convert (diffusers' upcast_softmax)."""
    for target in node.output(0).get_target_inputs():
        reader = target.get_node()
        if reader.get_type_name() == "Convert":
            return _feeds_softmax(reader)
        if reader.get_type_name().startswith("Softmax"):
            return True
    return False


def _zero_term(output) -> bool:
    """OUTPUT is Multiply(x, 0) or Multiply(zeros, c): a broadcast zero constant on either side."""
    node = output.get_node()
    if node.get_type_name() != "Multiply":
        return False
    sides = (node.input_value(0), node.input_value(1))
    return any(_zero(side) for side in sides)


def _zero(output) -> bool:
    """OUTPUT is a zero scalar constant, or a Broadcast of one (ConstantOfShape(0) as OpenVINO reads it)."""
    node = output.get_node()
    if node.get_type_name() == "Broadcast":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return False
    data = node.get_data()
    return data.size == 1 and not data.any()
