"""The autoencoder as an ONNX graph: the one definition both trainer backends share.

Both backends start from the same seeded weights and export through :func:`build_model`
(ORT via its training artifacts, numpy directly), so a model file looks the same whichever
backend produced it and can be scored with nothing but a plain ``onnxruntime``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_NAME = "input"
OUTPUT_NAME = "reconstruction"
# Opset 17 / IR 8: loadable by onnxruntime-training 1.19 (IR <= 10) and by every newer
# plain onnxruntime; onnxblock's ReduceMean-based MSE loss is also built for opset < 18.
OPSET = 17
IR_VERSION = 8

Weights = dict[str, np.ndarray]


def layer_sizes(n_features: int, hidden: Sequence[int]) -> list[int]:
    """Widths from input to output: n -> hidden... -> mirrored hidden -> n."""
    hidden = list(hidden)
    return [n_features, *hidden, *reversed(hidden[:-1]), n_features]


def weight_name(layer: int) -> str:
    return f"layer{layer}.weight"


def bias_name(layer: int) -> str:
    return f"layer{layer}.bias"


def param_shapes(n_features: int, hidden: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every trainable tensor; a checkpoint fits iff it matches this exactly."""
    sizes = layer_sizes(n_features, hidden)
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
        shapes[weight_name(i)] = (fan_in, fan_out)
        shapes[bias_name(i)] = (fan_out,)
    return shapes


def init_weights(n_features: int, hidden: Sequence[int], seed: int) -> Weights:
    """Deterministic initial weights: He normal for ReLU layers, Glorot normal for the linear
    output layer, zero biases (float32)."""
    rng = np.random.default_rng(seed)
    sizes = layer_sizes(n_features, hidden)
    last = len(sizes) - 2
    weights: Weights = {}
    for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
        std = np.sqrt(2.0 / (fan_in + fan_out)) if i == last else np.sqrt(2.0 / fan_in)
        weights[weight_name(i)] = (rng.standard_normal((fan_in, fan_out)) * std).astype(np.float32)
        weights[bias_name(i)] = np.zeros(fan_out, dtype=np.float32)
    return weights


def build_model(
    n_features: int, hidden: Sequence[int], weights: Mapping[str, np.ndarray]
) -> onnx.ModelProto:
    """The inference graph: MatMul+Add per layer, ReLU after all but the last, batch dim dynamic."""
    sizes = layer_sizes(n_features, hidden)
    n_layers = len(sizes) - 1
    nodes = []
    current = INPUT_NAME
    for i in range(n_layers):
        mm, out = f"layer{i}.matmul", f"layer{i}.out"
        nodes.append(helper.make_node("MatMul", [current, weight_name(i)], [mm], name=mm))
        if i == n_layers - 1:
            nodes.append(helper.make_node("Add", [mm, bias_name(i)], [OUTPUT_NAME], name=out))
        else:
            relu = f"layer{i}.relu"
            nodes.append(helper.make_node("Add", [mm, bias_name(i)], [out], name=out))
            nodes.append(helper.make_node("Relu", [out], [relu], name=relu))
            current = relu
    initializers = [
        numpy_helper.from_array(np.asarray(weights[name], dtype=np.float32), name)
        for name in param_shapes(n_features, hidden)
    ]
    graph = helper.make_graph(
        nodes,
        "smocsd_autoencoder",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", n_features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", n_features])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="smocsd"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model
