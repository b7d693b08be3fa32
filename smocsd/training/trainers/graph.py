"""The autoencoder as an ONNX graph: the one definition both trainer backends share.

Both backends start from the same seeded weights and export through :func:`build_model`,
so a model file looks the same whichever backend produced it and can be scored with nothing
but a plain ``onnxruntime``. Several networks trained apart are exported as one
(:func:`side_by_side`): the same graph, its hidden layers as wide as all of theirs.
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


def side_by_side(
    n_features: int, hidden: Sequence[int], networks: Sequence[Mapping[str, np.ndarray]]
) -> tuple[tuple[int, ...], Weights]:
    """(hidden, weights) of one network whose reconstruction is the mean of `networks`'
    (each of `hidden`): their hidden units side by side, each layer's weights block-diagonal
    (the first layer's share the input), the output layer's divided by their number.

    One graph of the usual shape, not one branch per network: a model file stays what
    every consumer and the README's scoring recipe already read, and a hidden layer of
    3 x 32 units is one MatMul, cheaper to score than three.
    """
    k = len(networks)
    last = len(layer_sizes(n_features, hidden)) - 2
    wide: Weights = {}
    for i in range(last + 1):
        w = [np.asarray(n[weight_name(i)], dtype=np.float32) for n in networks]
        b = [np.asarray(n[bias_name(i)], dtype=np.float32) for n in networks]
        if i == last:
            wide[weight_name(i)] = np.vstack(w) / np.float32(k)
            wide[bias_name(i)] = np.mean(b, axis=0, dtype=np.float32)
            continue
        rows = w[0].shape[0] * (1 if i == 0 else k)
        block = np.zeros((rows, sum(x.shape[1] for x in w)), np.float32)
        for j, x in enumerate(w):
            r = 0 if i == 0 else j * x.shape[0]
            block[r : r + x.shape[0], j * x.shape[1] : (j + 1) * x.shape[1]] = x
        wide[weight_name(i)] = block
        wide[bias_name(i)] = np.concatenate(b)
    return tuple(h * k for h in hidden), wide
