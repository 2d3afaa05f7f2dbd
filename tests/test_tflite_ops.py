"""Every operator the tflite target claims: parity with ONNX Runtime on random inputs, over several
shapes and attribute sets, on LiteRT with XNNPACK on (as devices run it) and with the builtin
kernels only (as TFLite Micro-style runtimes do). Error bound: max |ORT - LiteRT| <= 1e-4 x the
output's scale (its largest magnitude).

Many cases put a Conv in front of the operator under test so that it sees a channels-last tensor,
which is how it meets real CNNs after layout conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from edgeopt.converters.targets.tflite.flatbuffer import builtin_op_names

from tflite_harness import convert, litert_outputs, ort_outputs

RNG = np.random.default_rng(1234)
TOLERANCE = 1e-4


@dataclass
class Case:
    id: str
    op: str
    inputs: dict[str, tuple[int, ...]]
    attrs: dict = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)  # extra inputs given as initializers
    input_order: list[str] | None = None  # node inputs ('' for an absent optional input)
    outputs: int = 1
    opset: int = 17
    after_conv: bool = False  # feed the first input through a 1x1 Conv (channels-last inside)
    positive: bool = False  # inputs > 0 (Log, Sqrt, Pow)
    layout: str = "nhwc"  # "nhwc" or "keep" (keep_io_layout)
    reference: str = "onnxruntime"  # or "onnx" (onnx.reference) where ONNX Runtime lacks the feature
    lowered_to: str | None = None  # a builtin the converted graph must contain
    not_lowered_to: str | None = None  # one it must not ("TRANSPOSE": the layout needs no transposes)


def _const(shape, positive=False):
    a = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.5 if positive else a


def build(case: Case) -> onnx.ModelProto:
    nodes, inits, graph_inputs = [], [], []
    names = list(case.inputs)
    for name, shape in case.inputs.items():
        graph_inputs.append(h.make_tensor_value_info(name, T.FLOAT, list(shape)))
    node_inputs = list(case.input_order or names + list(case.consts))
    if case.after_conv:
        first = names[0]
        c = case.inputs[first][1]
        w = np.eye(c, dtype=np.float32).reshape(c, c, *([1] * (len(case.inputs[first]) - 2)))
        w += 0.1 * RNG.standard_normal(w.shape).astype(np.float32)
        inits.append(numpy_helper.from_array(w, "conv_w"))
        nodes.append(h.make_node("Conv", [first, "conv_w"], ["conv_out"], name="pre_conv"))
        node_inputs = ["conv_out" if n == first else n for n in node_inputs]
    for name, value in case.consts.items():
        inits.append(numpy_helper.from_array(np.asarray(value), name))
    outs = [f"y{i}" for i in range(case.outputs)]
    nodes.append(h.make_node(case.op, node_inputs, outs, name="node_under_test", **case.attrs))
    graph = h.make_graph(nodes, case.id, graph_inputs, [h.make_tensor_value_info(o, T.FLOAT, None) for o in outs],
                         initializer=inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", case.opset)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


def c(*shape, positive=False):
    return _const(shape, positive)


X4 = {"x": (1, 4, 6, 6)}
X3 = {"x": (2, 3, 10)}
CASES: list[Case] = []


def add(*cases: Case) -> None:
    CASES.extend(cases)


# -- convolutions ---------------------------------------------------------------------------------------
add(
    Case("conv_pad1", "Conv", X4, {"pads": [1, 1, 1, 1]}, {"w": c(5, 4, 3, 3), "b": c(5)}),
    Case("conv_stride2_valid", "Conv", {"x": (2, 3, 9, 9)}, {"strides": [2, 2]}, {"w": c(4, 3, 3, 3)}),
    Case("conv_asym_pads", "Conv", X4, {"pads": [0, 1, 2, 0]}, {"w": c(3, 4, 3, 2), "b": c(3)}),
    Case("conv_same_upper_s2", "Conv", {"x": (1, 2, 7, 8)}, {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
         {"w": c(3, 2, 3, 3), "b": c(3)}),
    Case("conv_same_lower", "Conv", X4, {"auto_pad": "SAME_LOWER", "strides": [2, 2]}, {"w": c(3, 4, 4, 4)}),
    Case("conv_dilated", "Conv", {"x": (1, 3, 11, 11)}, {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
         {"w": c(4, 3, 3, 3), "b": c(4)}),
    Case("conv_grouped", "Conv", {"x": (1, 4, 7, 7)}, {"group": 2, "pads": [1, 1, 1, 1]}, {"w": c(6, 2, 3, 3), "b": c(6)}),
    Case("conv_depthwise", "Conv", X4, {"group": 4, "pads": [1, 1, 1, 1]}, {"w": c(4, 1, 3, 3), "b": c(4)},
         not_lowered_to="TRANSPOSE"),
    Case("conv_depthwise_mult2_s2", "Conv", X4, {"group": 4, "strides": [2, 2], "pads": [1, 1, 1, 1]},
         {"w": c(8, 1, 3, 3), "b": c(8)}),
    Case("conv_1x1_keep_layout", "Conv", X4, {}, {"w": c(3, 4, 1, 1)}, layout="keep"),
    Case("conv1d_pad_stride", "Conv", X3, {"pads": [1, 1], "strides": [2]}, {"w": c(5, 3, 3), "b": c(5)}),
    Case("conv1d_dilated_depthwise", "Conv", X3, {"group": 3, "dilations": [2], "pads": [2, 2]}, {"w": c(3, 1, 3)}),
    Case("conv_transpose_s2_p1_op1", "ConvTranspose", X4,
         {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, {"w": c(4, 3, 3, 3), "b": c(3)}),
    Case("conv_transpose_s1", "ConvTranspose", X4, {}, {"w": c(4, 2, 3, 3)}),
    # stride = kernel: a 1x1 CONV_2D and DEPTH_TO_SPACE (XNNPACK's INT8 TRANSPOSE_CONV is slow)
    Case("conv_transpose_s2_k2", "ConvTranspose", X4, {"strides": [2, 2]}, {"w": c(4, 2, 2, 2), "b": c(2)},
         lowered_to="DEPTH_TO_SPACE", not_lowered_to="TRANSPOSE_CONV"),
    Case("conv_transpose_s3_k3_batch2", "ConvTranspose", {"x": (2, 3, 4, 5)}, {"strides": [3, 3]},
         {"w": c(3, 5, 3, 3), "b": c(5)}, after_conv=True, lowered_to="DEPTH_TO_SPACE", not_lowered_to="TRANSPOSE_CONV"),
    Case("conv_transpose_s2_k2_cropped", "ConvTranspose", X4, {"strides": [2, 2], "pads": [1, 0, 0, 1]},
         {"w": c(4, 2, 2, 2)}, lowered_to="TRANSPOSE_CONV"),
    Case("conv_transpose_same_upper", "ConvTranspose", X4, {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
         {"w": c(4, 2, 3, 3)}),
    Case("conv_transpose_output_shape", "ConvTranspose", X4, {"strides": [2, 2], "output_shape": [12, 12]},
         {"w": c(4, 2, 3, 3)}),
    Case("conv_transpose_1d", "ConvTranspose", X3, {"strides": [2], "pads": [1, 0]}, {"w": c(3, 2, 4), "b": c(2)}),
)

# -- dense -----------------------------------------------------------------------------------------------
add(
    Case("gemm_transb_bias", "Gemm", {"a": (3, 8)}, {"transB": 1}, {"b": c(5, 8), "c": c(5)}),
    Case("gemm_transa_alpha_beta", "Gemm", {"a": (8, 3)}, {"transA": 1, "alpha": 0.5, "beta": 2.0},
         {"b": c(8, 4), "c": c(1, 4)}),
    Case("gemm_full_c", "Gemm", {"a": (3, 6)}, {}, {"b": c(6, 4), "c": c(3, 4)}),
    Case("gemm_no_c", "Gemm", {"a": (2, 6)}, {}, {"b": c(6, 4)}),
    Case("gemm_runtime_b", "Gemm", {"a": (3, 6), "b": (4, 6)}, {"transB": 1, "alpha": 2.0}, {"c": c(4)}),
    Case("matmul_2d_const", "MatMul", {"a": (4, 7)}, {}, {"b": c(7, 3)}),
    Case("matmul_3d_const", "MatMul", {"a": (2, 5, 7)}, {}, {"b": c(7, 3)}),
    Case("matmul_1d_b", "MatMul", {"a": (2, 5, 7)}, {}, {"b": c(7)}),
    Case("matmul_runtime_3d", "MatMul", {"a": (2, 4, 6), "b": (2, 6, 3)}),
    Case("matmul_runtime_broadcast", "MatMul", {"a": (2, 3, 4, 6), "b": (6, 5)}, input_order=["a", "b"]),
)

# -- elementwise ----------------------------------------------------------------------------------------
for op in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
    add(
        Case(f"{op.lower()}_same", op, {"a": (2, 3, 4), "b": (2, 3, 4)}),
        Case(f"{op.lower()}_channel_const_nhwc", op, {"x": (1, 3, 5, 5)},
             consts={"k": c(3, 1, 1, positive=op == "Div")}, after_conv=True, not_lowered_to="TRANSPOSE"),
        Case(f"{op.lower()}_row_runtime_nhwc", op, {"x": (1, 3, 4, 5), "r": (5,)}, after_conv=True),
        Case(f"{op.lower()}_scalar_const", op, {"x": (2, 5)}, consts={"k": np.array(1.5 if op != "Sub" else -0.5,
                                                                                   np.float32)}),
    )
add(
    Case("max_three_inputs", "Max", {"a": (2, 4), "b": (2, 4), "c": (1, 4)}),
    Case("min_three_inputs", "Min", {"a": (3, 4), "b": (4,), "c": (3, 1)}),
    Case("add_nhwc_plus_nchw_runtime", "Add", {"x": (1, 3, 4, 4), "y": (1, 3, 4, 4)}, after_conv=True),
)

for op in ("Relu", "Sigmoid", "Tanh", "HardSwish", "Exp", "Abs", "Neg", "Identity"):
    add(Case(f"{op.lower()}_2d", op, {"x": (3, 7)}),
        Case(f"{op.lower()}_nhwc", op, {"x": (1, 4, 5, 5)}, after_conv=True, not_lowered_to="TRANSPOSE"))
for op in ("Log", "Sqrt"):
    add(Case(f"{op.lower()}_2d", op, {"x": (3, 7)}, positive=True))
add(
    Case("leaky_relu", "LeakyRelu", {"x": (2, 9)}, {"alpha": 0.1}),
    Case("leaky_relu_nhwc", "LeakyRelu", X4, {}, after_conv=True),
    Case("prelu_channel_nhwc", "PRelu", {"x": (1, 3, 5, 5)}, consts={"slope": c(3, 1, 1)}, after_conv=True,
         not_lowered_to="TRANSPOSE"),
    Case("prelu_scalar", "PRelu", {"x": (2, 6)}, consts={"slope": np.array([0.25], np.float32)}),
    Case("clip_relu6", "Clip", {"x": (2, 8)}, consts={"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)},
         input_order=["x", "lo", "hi"]),
    Case("clip_min_only", "Clip", {"x": (2, 8)}, consts={"lo": np.array(-0.3, np.float32)}, input_order=["x", "lo"]),
    Case("clip_n1_1", "Clip", {"x": (2, 8)}, consts={"lo": np.array(-1, np.float32), "hi": np.array(1, np.float32)},
         input_order=["x", "lo", "hi"]),
    Case("clip_arbitrary_nhwc", "Clip", X4, consts={"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)},
         input_order=["x", "lo", "hi"], after_conv=True),
    Case("clip_max_only", "Clip", {"x": (2, 8)}, consts={"hi": np.array(0.2, np.float32)}, input_order=["x", "", "hi"]),
    Case("clip_opset10_attrs", "Clip", {"x": (2, 8)}, {"min": -0.2, "max": 0.4}, opset=10),
    Case("hard_sigmoid_default", "HardSigmoid", {"x": (3, 8)}),
    Case("hard_sigmoid_mobilenet", "HardSigmoid", X4, {"alpha": 1 / 6, "beta": 0.5}, after_conv=True),
    Case("gelu_exact", "Gelu", {"x": (3, 8)}, opset=20),
    Case("gelu_tanh_nhwc", "Gelu", X4, {"approximate": "tanh"}, opset=20, after_conv=True),
    Case("erf", "Erf", {"x": (4, 9)}),
    Case("erf_nhwc", "Erf", X4, after_conv=True),
    Case("pow_square", "Pow", {"x": (3, 5)}, consts={"e": np.array(2.0, np.float32)}),
    Case("pow_sqrt", "Pow", {"x": (3, 5)}, consts={"e": np.array(0.5, np.float32)}, positive=True),
    Case("pow_cube", "Pow", {"x": (3, 5)}, consts={"e": np.array(3.0, np.float32)}),
    Case("pow_runtime", "Pow", {"x": (3, 5), "e": (3, 5)}, positive=True),
    Case("dropout_inference", "Dropout", {"x": (3, 5)}),
    Case("batchnorm_nhwc", "BatchNormalization", X4,
         consts={"s": c(4), "bb": c(4), "m": c(4), "v": c(4, positive=True)}, after_conv=True, not_lowered_to="TRANSPOSE"),
    Case("batchnorm_2d", "BatchNormalization", {"x": (5, 3)},
         consts={"s": c(3), "bb": c(3), "m": c(3), "v": c(3, positive=True)}, attrs={"epsilon": 1e-3}),
)

# -- softmax, pools, reductions, norms -----------------------------------------------------------------
add(
    Case("softmax_last", "Softmax", {"x": (3, 10)}),
    Case("softmax_axis1_nhwc", "Softmax", X4, {"axis": 1}, after_conv=True, not_lowered_to="TRANSPOSE"),
    Case("softmax_axis2_3d", "Softmax", {"x": (2, 3, 5)}, {"axis": 1}),
    Case("softmax_opset11_flatten", "Softmax", {"x": (2, 3, 4)}, {"axis": 1}, opset=11),
    Case("log_softmax_last", "LogSoftmax", {"x": (3, 10)}),
    Case("log_softmax_axis0", "LogSoftmax", {"x": (4, 3)}, {"axis": 0}),
    Case("maxpool_k2s2", "MaxPool", X4, {"kernel_shape": [2, 2], "strides": [2, 2]}, after_conv=True,
         not_lowered_to="TRANSPOSE"),
    Case("maxpool_k3s1p1", "MaxPool", X4, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    Case("maxpool_ceil", "MaxPool", {"x": (1, 2, 7, 7)}, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    Case("maxpool_asym_pads", "MaxPool", X4, {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0]}),
    Case("maxpool_same_upper", "MaxPool", {"x": (1, 3, 7, 8)}, {"kernel_shape": [3, 3], "strides": [2, 2],
                                                                "auto_pad": "SAME_UPPER"}),
    Case("maxpool_1d", "MaxPool", X3, {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    Case("avgpool_k2s2", "AveragePool", X4, {"kernel_shape": [2, 2], "strides": [2, 2]}),
    Case("avgpool_k3p1_exclude", "AveragePool", X4, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    Case("avgpool_k3p1_include", "AveragePool", X4, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                                     "count_include_pad": 1}),
    Case("avgpool_ceil", "AveragePool", {"x": (1, 2, 7, 7)}, {"kernel_shape": [3, 3], "strides": [2, 2],
                                                              "ceil_mode": 1}),
    Case("avgpool_same_upper", "AveragePool", {"x": (1, 3, 7, 8)}, {"kernel_shape": [3, 3], "strides": [2, 2],
                                                                    "auto_pad": "SAME_UPPER"}),
    Case("avgpool_1d", "AveragePool", X3, {"kernel_shape": [4], "strides": [2], "pads": [1, 2]}),
    Case("global_avgpool", "GlobalAveragePool", X4, after_conv=True, not_lowered_to="TRANSPOSE"),
    Case("global_maxpool", "GlobalMaxPool", X4),
    Case("global_avgpool_1d", "GlobalAveragePool", X3),
    Case("reduce_mean_spatial_nhwc", "ReduceMean", X4, {"keepdims": 1},
         consts={"axes": np.array([2, 3], np.int64)}, opset=18, after_conv=True, not_lowered_to="TRANSPOSE"),
    Case("reduce_mean_axis1_nokeep", "ReduceMean", {"x": (2, 3, 4)}, {"axes": [1], "keepdims": 0}),
    Case("reduce_max_all", "ReduceMax", {"x": (2, 3, 4)}, {"keepdims": 0}),
    Case("reduce_max_channel_nhwc", "ReduceMax", X4, {"axes": [1], "keepdims": 0}, after_conv=True),
    Case("reduce_min_nhwc", "ReduceMin", X4, {"axes": [2], "keepdims": 1}, after_conv=True, not_lowered_to="TRANSPOSE"),
    Case("reduce_sum_axes_input", "ReduceSum", {"x": (2, 3, 4)}, consts={"axes": np.array([0, 2], np.int64)}),
    Case("reduce_sum_keep", "ReduceSum", X4, {"keepdims": 1}, consts={"axes": np.array([-1], np.int64)},
         after_conv=True),
    Case("instance_norm", "InstanceNormalization", X4, {"epsilon": 1e-4}, {"s": c(4), "bb": c(4)}, after_conv=True),
    Case("instance_norm_1d", "InstanceNormalization", X3, {}, {"s": c(3), "bb": c(3)}),
    Case("layer_norm_last", "LayerNormalization", {"x": (2, 5, 8)}, {}, {"s": c(8), "bb": c(8)}),
    Case("layer_norm_with_mean_inv_std", "LayerNormalization", {"x": (2, 5, 8)}, {}, {"s": c(8), "bb": c(8)},
         outputs=3),
    Case("layer_norm_axis1", "LayerNormalization", {"x": (2, 5, 8)}, {"axis": 1}, {"s": c(5, 8)}),
)

# -- shape ops ------------------------------------------------------------------------------------------
add(
    Case("flatten_nhwc", "Flatten", X4, {"axis": 1}, after_conv=True),
    Case("flatten_axis2", "Flatten", X4, {"axis": 2}),
    Case("flatten_after_global_pool", "Flatten", {"x": (2, 6, 1, 1)}, after_conv=True, not_lowered_to="TRANSPOSE"),
    Case("reshape", "Reshape", {"x": (2, 3, 4)}, consts={"s": np.array([4, -1, 2], np.int64)}),
    Case("reshape_nhwc", "Reshape", X4, consts={"s": np.array([1, 4, 36], np.int64)}, after_conv=True),
    Case("transpose_2d", "Transpose", {"x": (3, 5)}),
    Case("transpose_nchw_to_nhwc", "Transpose", X4, {"perm": [0, 2, 3, 1]}, after_conv=True, not_lowered_to="TRANSPOSE"),
    Case("transpose_3d", "Transpose", {"x": (2, 3, 4)}, {"perm": [1, 0, 2]}),
    Case("squeeze", "Squeeze", {"x": (2, 1, 4, 1)}, consts={"axes": np.array([1, 3], np.int64)}),
    Case("squeeze_opset11", "Squeeze", {"x": (2, 1, 4)}, {"axes": [1]}, opset=11),
    Case("unsqueeze", "Unsqueeze", {"x": (2, 4)}, consts={"axes": np.array([0, 3], np.int64)}),
    Case("concat_channels_nhwc", "Concat", {"x": (1, 3, 4, 4), "y": (1, 2, 4, 4)}, {"axis": 1}, after_conv=True),
    Case("concat_axis0", "Concat", {"a": (2, 3), "b": (1, 3)}, {"axis": 0}),
    Case("concat_with_const", "Concat", {"a": (2, 3)}, {"axis": -1}, consts={"k": c(2, 2)}),
    Case("split_equal_nhwc", "Split", {"x": (1, 4, 3, 3)}, {"axis": 1, "num_outputs": 2}, outputs=2, opset=18,
         after_conv=True, not_lowered_to="TRANSPOSE"),
    Case("split_sizes", "Split", {"x": (2, 7)}, {"axis": 1}, consts={"sp": np.array([2, 5], np.int64)}, outputs=2),
    Case("split_opset11_attr", "Split", {"x": (6, 2)}, {"axis": 0, "split": [1, 2, 3]}, outputs=3, opset=11),
    Case("slice_basic", "Slice", {"x": (4, 6)}, consts={"st": np.array([1, 0], np.int64),
                                                         "en": np.array([3, 5], np.int64)}),
    Case("slice_steps_axes", "Slice", {"x": (3, 8, 5)}, consts={
        "st": np.array([1, -4], np.int64), "en": np.array([8, 100], np.int64), "ax": np.array([1, 2], np.int64),
        "sp": np.array([2, 1], np.int64)}),
    Case("slice_negative_step", "Slice", {"x": (3, 7)}, consts={
        "st": np.array([-1], np.int64), "en": np.array([-100], np.int64), "ax": np.array([1], np.int64),
        "sp": np.array([-2], np.int64)}),
    Case("slice_nhwc_channels", "Slice", X4, consts={"st": np.array([1], np.int64), "en": np.array([3], np.int64),
                                                      "ax": np.array([1], np.int64)}, after_conv=True,
         not_lowered_to="TRANSPOSE"),
    Case("gather_scalar_axis0", "Gather", {"x": (5, 4)}, {"axis": 0}, consts={"i": np.array(2, np.int64)}),
    Case("gather_vector_axis1", "Gather", {"x": (3, 5, 2)}, {"axis": 1}, consts={"i": np.array([4, 0, -1], np.int64)}),
    Case("gather_matrix_indices", "Gather", {"x": (6, 3)}, {"axis": 0}, consts={"i": np.array([[0, 1], [5, 2]],
                                                                                              np.int64)}),
    Case("gather_channels_nhwc", "Gather", X4, {"axis": 1}, consts={"i": np.array([3, 1], np.int64)},
         after_conv=True, not_lowered_to="TRANSPOSE"),
    Case("pad_constant", "Pad", {"x": (2, 3)}, consts={"p": np.array([0, 1, 1, 2], np.int64)}),
    Case("pad_value_nhwc", "Pad", X4, consts={"p": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64),
                                              "v": np.array(0.5, np.float32)}, after_conv=True, not_lowered_to="TRANSPOSE"),
    Case("pad_reflect", "Pad", {"x": (1, 2, 5, 5)}, {"mode": "reflect"},
         consts={"p": np.array([0, 0, 2, 1, 0, 0, 1, 2], np.int64)}),
    Case("pad_axes_opset18", "Pad", {"x": (2, 3, 4)}, consts={"p": np.array([1, 2], np.int64), "v": np.array(
        -1.0, np.float32), "ax": np.array([2], np.int64)}, opset=18),
    Case("resize_nearest_x2", "Resize", X4, {"mode": "nearest"},
         consts={"roi": np.array([], np.float32), "sc": np.array([1, 1, 2, 2], np.float32)}, after_conv=True,
         not_lowered_to="TRANSPOSE"),
    Case("resize_nearest_asym_floor", "Resize", X4, {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                                     "nearest_mode": "floor"},
         consts={"roi": np.array([], np.float32), "sc": np.array([1, 1, 3, 2], np.float32)}),
    Case("resize_bilinear_half_pixel", "Resize", X4, {"mode": "linear"},
         consts={"roi": np.array([], np.float32), "sc": np.array([1, 1, 2, 2], np.float32)}, after_conv=True),
    Case("resize_bilinear_align_corners_sizes", "Resize", X4,
         {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
         consts={"roi": np.array([], np.float32), "sc": np.array([], np.float32),
                 "sz": np.array([1, 4, 11, 9], np.int64)}),
    Case("resize_bilinear_pytorch_down", "Resize", {"x": (1, 2, 8, 8)},
         {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
         consts={"roi": np.array([], np.float32), "sc": np.array([1, 1, 0.5, 0.5], np.float32)}),
    Case("resize_nearest_1d", "Resize", X3, {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                            "nearest_mode": "floor"},
         consts={"roi": np.array([], np.float32), "sc": np.array([1, 1, 2], np.float32)}),
)


# -- recurrent ------------------------------------------------------------------------------------------
def _rnn_case(op, id_, seq=5, batch=2, feat=3, hidden=4, direction="forward", initial=False, peephole=False,
              layout=0, **attrs):
    gates = 4 if op == "LSTM" else 3
    dirs = 2 if direction == "bidirectional" else 1
    x_shape = (batch, seq, feat) if layout else (seq, batch, feat)
    state_shape = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
    consts = {"W": c(dirs, gates * hidden, feat) * 0.5, "R": c(dirs, gates * hidden, hidden) * 0.5,
              "B": c(dirs, 2 * gates * hidden) * 0.5}
    order = ["x", "W", "R", "B", ""]
    inputs = {"x": x_shape}
    if initial:
        inputs["h0"] = state_shape
        order.append("h0")
        if op == "LSTM":
            inputs["c0"] = state_shape
            order.append("c0")
    if peephole:
        while len(order) < 7:
            order.append("")
        consts["P"] = c(dirs, 3 * hidden) * 0.5
        order.append("P")
    while order and order[-1] == "":
        order.pop()
    outputs = 3 if op == "LSTM" else 2
    # ONNX Runtime has no batch-major (layout=1) RNN kernels: the ONNX reference implementation checks those
    return Case(id_, op, inputs, {"hidden_size": hidden, "direction": direction, "layout": layout, **attrs},
                consts, input_order=order, outputs=outputs, opset=14, reference="onnx" if layout else "onnxruntime")


add(
    _rnn_case("LSTM", "lstm_forward"),
    _rnn_case("LSTM", "lstm_initial_states", initial=True),
    _rnn_case("LSTM", "lstm_bidirectional_initial", direction="bidirectional", initial=True),
    _rnn_case("LSTM", "lstm_reverse_peephole", direction="reverse", peephole=True, initial=True),
    _rnn_case("LSTM", "lstm_batch_major", layout=1, initial=True),
    _rnn_case("LSTM", "lstm_single_step", seq=1),
    _rnn_case("GRU", "gru_forward"),
    _rnn_case("GRU", "gru_initial_state", initial=True),
    _rnn_case("GRU", "gru_linear_before_reset", initial=True, linear_before_reset=1),
    _rnn_case("GRU", "gru_bidirectional", direction="bidirectional", initial=True),
    _rnn_case("GRU", "gru_reverse_batch_major", direction="reverse", layout=1),
)


def reference_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    outs = ReferenceEvaluator(model).run(None, feeds)
    return {o.name: np.asarray(v) for o, v in zip(model.graph.output, outs, strict=True)}


def _feeds(model: onnx.ModelProto, case: Case) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(abs(hash(case.id)) % 2**32)
    feeds = {}
    for name, shape in case.inputs.items():
        x = rng.standard_normal(shape).astype(np.float32)
        feeds[name] = np.abs(x) + 0.5 if case.positive else x
    return feeds


@pytest.mark.parametrize("case", CASES, ids=[cs.id for cs in CASES])
def test_op_parity_with_onnxruntime(case: Case, tmp_path):
    model = build(case)
    conv = convert(model, tmp_path, keep_io_layout=case.layout == "keep")
    feeds = _feeds(model, case)
    ref = ort_outputs(model, feeds) if case.reference == "onnxruntime" else reference_outputs(model, feeds)
    ops = builtin_op_names(conv.path)
    assert not any(o.startswith("CUSTOM") for o in ops), ops
    assert case.lowered_to is None or case.lowered_to in ops, ops
    assert case.not_lowered_to is None or case.not_lowered_to not in ops, ops
    for xnnpack in (True, False):
        got = litert_outputs(conv, feeds, xnnpack=xnnpack)
        for name, r in ref.items():
            g = got[name]
            assert g.shape == r.shape, (name, g.shape, r.shape)
            scale = float(np.abs(r).max())
            err = float(np.abs(g.astype(np.float64) - r).max())
            assert err <= TOLERANCE * scale, f"{name} (xnnpack={xnnpack}): max abs err {err:.3g}, scale {scale:.3g}"


def test_every_claimed_op_has_a_parity_case():
    from edgeopt.converters.targets.tflite.lowering import RULES

    claimed = set(RULES) - {"Constant"}
    tested = {cs.op for cs in CASES}
    assert claimed - tested == set()
