"""The ONNX-TensorRT parser's operator table at TensorRT 10.5, the strictest production target (docs/design/engines.md
§4): which ONNX operators the parser imports, for which element types, with which restrictions.

Source (data, not code): onnx/onnx-tensorrt ``docs/operators.md``. The 10.5 release of the parser is commit
``886aff917b63f10a81c5f31e89752a3b46169623`` (the ``parsers/onnx`` submodule of NVIDIA/TensorRT tag ``v10.5.0``), whose
copy of the file is not in this project's reference store. The rows below are therefore the table of the newest
release available here, ``10.1-GA`` (commit ``96e781103cfc4adf4a6bb557e94bac8e693f6f4c``, blob
``f32b1da71687773afb6ad032677c9c08f778caa6``, header "TensorRT 10.0 supports operators in the inclusive range of opset 9
to opset 20"), with the changes that the parser's ``docs/Changelog.md`` lists for 10.2 .. 10.5 applied (`DELTAS`). Each
changelog entry only adds support, so a graph that passes this table passes the 10.5 parser. One typo of the 10.1 file
is corrected (`CORRECTIONS`).
"""

from __future__ import annotations

from typing import NamedTuple

TENSORRT_RELEASE = "10.5"
OPSET_RANGE = (9, 20)
"""Opsets of the default domain the parser imports (the table's header)."""
MAX_RANK = 8
"""TensorRT's ``Dims::MAX_DIMS``: no tensor of a network may have more dimensions."""

SOURCE = {
    "repository": "onnx/onnx-tensorrt",
    "path": "docs/operators.md",
    "release_10_5_commit": "886aff917b63f10a81c5f31e89752a3b46169623",
    "table_commit": "96e781103cfc4adf4a6bb557e94bac8e693f6f4c",
    "table_blob": "f32b1da71687773afb6ad032677c9c08f778caa6",
    "table_release": "10.1-GA",
    "changelog": "docs/Changelog.md, sections TensorRT 10.2 .. 10.5 GA Release",
}

DELTAS = {
    "10.3": "Added support for tensor `axes` inputs for `Slice` nodes (restriction dropped below).",
    "10.4": "Added support for tensor `axes` for `Pad` operations (restriction dropped below); added support for "
            "`BlackmanWindow`, `HammingWindow` and `HannWindow` (types FP32, FP16 as the later tables list them).",
    "10.5": "Added support for real-valued `STFT` operations (FP32; restriction as the later tables state it).",
}

CORRECTIONS = {
    "ConstantOfShape": "the 10.1 row lists `INF64`; read as INT64 (the later tables spell it INT64).",
}


class OperatorSupport(NamedTuple):
    """One row: whether the parser imports the operator, for which element types, under which restrictions."""

    supported: bool
    types: tuple[str, ...]
    restrictions: str = ""


OPERATORS: dict[str, OperatorSupport] = {
    "Abs": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "Acos": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Acosh": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Add": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "AffineGrid": OperatorSupport(False, ()),
    "And": OperatorSupport(True, ('BOOL',)),
    "ArgMax": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "ArgMin": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "Asin": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Asinh": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Atan": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Atanh": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "AveragePool": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16'),
        '2D or 3D Pooling only. `dilations` must be empty or all ones'),
    "BatchNormalization": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Bernoulli": OperatorSupport(False, ()),
    "BitShift": OperatorSupport(False, ()),
    "BitwiseAnd": OperatorSupport(False, ()),
    "BitwiseNot": OperatorSupport(False, ()),
    "BitwiseOr": OperatorSupport(False, ()),
    "BitwiseXor": OperatorSupport(False, ()),
    "BlackmanWindow": OperatorSupport(True, ('FP32', 'FP16')),
    "Cast": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'UINT8', 'BOOL')),
    "CastLike": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'UINT8', 'BOOL')),
    "Ceil": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Col2Im": OperatorSupport(False, ()),
    "Celu": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "CenterCropPad": OperatorSupport(False, ()),
    "Clip": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Compress": OperatorSupport(False, ()),
    "Concat": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "ConcatFromSequence": OperatorSupport(False, ()),
    "Constant": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'),
        '`sparse_value`, `value_string`, and `value_strings` attributes are unsupported.'),
    "ConstantOfShape": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "Conv": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "ConvInteger": OperatorSupport(False, ()),
    "ConvTranspose": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Cos": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Cosh": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "CumSum": OperatorSupport(True, ('FP32', 'FP16', 'BF16'), '`axis` must be an initializer'),
    "DFT": OperatorSupport(False, ()),
    "DeformConv": OperatorSupport(
        True, ('FP32', 'FP16'),
        '`input` must have 1D or 2D spatial dimensions. `pads` for the beginning and end along each spatial axis '
        'must be the same'),
    "DepthToSpace": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "DequantizeLinear": OperatorSupport(True, ('INT8', 'FP8', 'INT4'), '`x_zero_point` must be zero'),
    "Det": OperatorSupport(False, ()),
    "Div": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "Dropout": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16'),
        '`is_traning` must be an initializer and evaluate to False.'),
    "DynamicQuantizeLinear": OperatorSupport(False, ()),
    "Einsum": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Elu": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Equal": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "Erf": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Exp": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Expand": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "EyeLike": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'),
        '`input` must have static dimensions'),
    "Flatten": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "Floor": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Gather": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "GatherElements": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "GatherND": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "Gelu": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT8', 'INT32', 'INT64')),
    "Gemm": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "GlobalAveragePool": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "GlobalLpPool": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "GlobalMaxPool": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Greater": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "GreaterOrEqual": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "GridSample": OperatorSupport(True, ('FP32', 'FP16'), 'Input must be 4D input.'),
    "GroupNormalization": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "GRU": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16'),
        'For bidirectional GRUs, activation functions must be the same for both the forward and reverse pass'),
    "HammingWindow": OperatorSupport(True, ('FP32', 'FP16')),
    "HannWindow": OperatorSupport(True, ('FP32', 'FP16')),
    "HardSigmoid": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "HardSwish": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Hardmax": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16'),
        '`axis` dimension of input must be a build-time constant'),
    "Identity": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "If": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'),
        'Output tensors of the two conditional branches must have the same rank and must have different names'),
    "ImageScaler": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "ImageDecoder": OperatorSupport(False, ()),
    "InstanceNormalization": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "IsInf": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "IsNaN": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "LayerNormalization": OperatorSupport(True, ('FP32', 'FP16', 'BF16'), 'Only the first output `Y` is supported.'),
    "LeakyRelu": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Less": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "LessOrEqual": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "Log": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "LogSoftmax": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Loop": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'),
        'Scan output length cannot be dynamic. The shape of Loop carried dependencies must be the same across all'
        ' loop iterations.'),
    "LRN": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "LSTM": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16'),
        'For bidirectional LSTMs, activation functions must be the same for both the forward and reverse pass. '
        '`input_forget` attribute must be 0. `layout` attribute must be 0.'),
    "LpNormalization": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "LpPool": OperatorSupport(True, ('FP32', 'FP16', 'BF16'), '`dilations` must be empty or all ones'),
    "MatMul": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "MatMulInteger": OperatorSupport(False, ()),
    "Max": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "MaxPool": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16'),
        '2D or 3D pooling only. `Indices` output tensor unsupported. `dilations` must be empty or all ones'),
    "MaxRoiPool": OperatorSupport(False, ()),
    "MaxUnpool": OperatorSupport(False, ()),
    "Mean": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'FP8', 'INT32', 'INT64')),
    "MeanVarianceNormalization": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "MelWeightMatrix": OperatorSupport(False, ()),
    "Min": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "Mish": OperatorSupport(True, ('FP32', 'FP16')),
    "Mod": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "Mul": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "Multinomial": OperatorSupport(False, ()),
    "Neg": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "NegativeLogLikelihoodLoss": OperatorSupport(False, ()),
    "NonMaxSuppression": OperatorSupport(True, ('FP32', 'FP16')),
    "NonZero": OperatorSupport(True, ('FP32', 'FP16')),
    "Not": OperatorSupport(True, ('BOOL',)),
    "OneHot": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'),
        '`depth` must be a build-time constant'),
    "Optional": OperatorSupport(False, ()),
    "OptionalGetElement": OperatorSupport(False, ()),
    "OptionalHasElement": OperatorSupport(False, ()),
    "Or": OperatorSupport(True, ('BOOL',)),
    "Pad": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "ParametricSoftplus": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Pow": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "PRelu": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "QLinearConv": OperatorSupport(False, ()),
    "QLinearMatMul": OperatorSupport(False, ()),
    "QuantizeLinear": OperatorSupport(True, ('FP32', 'FP16', 'BF16'), '`y_zero_point` must be 0'),
    "RandomNormal": OperatorSupport(True, ('FP32', 'FP16', 'BF16'), '`seed` value is ignored by TensorRT'),
    "RandomNormalLike": OperatorSupport(True, ('FP32', 'FP16', 'BF16'), '`seed` value is ignored by TensorRT'),
    "RandomUniform": OperatorSupport(True, ('FP32', 'FP16', 'BF16'), '`seed` value is ignored by TensorRT'),
    "RandomUniformLike": OperatorSupport(True, ('FP32', 'FP16', 'BF16'), '`seed` value is ignored by TensorRT'),
    "Range": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "Reciprocal": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "ReduceL1": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), '`axes` must be an initializer'),
    "ReduceL2": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), '`axes` must be an initializer'),
    "ReduceLogSum": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), '`axes` must be an initializer'),
    "ReduceLogSumExp": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64'),
        '`axes` must be an initializer'),
    "ReduceMax": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), '`axes` must be an initializer'),
    "ReduceMean": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), '`axes` must be an initializer'),
    "ReduceMin": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), '`axes` must be an initializer'),
    "ReduceProd": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), '`axes` must be an initializer'),
    "ReduceSum": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), '`axes` must be an initializer'),
    "ReduceSumSquare": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64'),
        '`axes` must be an initializer'),
    "RegexFullMatch": OperatorSupport(False, ()),
    "Relu": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "Reshape": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "Resize": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16'),
        'Supported resize transformation modes: `half_pixel`, `pytorch_half_pixel`, `tf_half_pixel_for_nn`, '
        '`asymmetric`, and `align_corners`.<br />Supported resize modes: `nearest`, `linear`.<br />Supported '
        'nearest modes: `floor`, `ceil`, `round_prefer_floor`, `round_prefer_ceil`.<br />Supported aspect ratio '
        'policy: `stretch`.<br />When `scales` is a tensor input, `axes` must be an iota vector of length '
        'rank(input).<br />Antialiasing is not supported.'),
    "ReverseSequence": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "RNN": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16'),
        'For bidirectional RNNs, activation functions must be the same for both the forward and reverse pass'),
    "RoiAlign": OperatorSupport(True, ('FP32', 'FP16')),
    "Round": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "STFT": OperatorSupport(
        True, ('FP32',),
        '`frame_step` and `window` must be an initializer. Input must be real-valued.'),
    "ScaledTanh": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Scan": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Scatter": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "ScatterElements": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "ScatterND": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64'), '`reduction` is not supported'),
    "Selu": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "SequenceAt": OperatorSupport(False, ()),
    "SequenceConstruct": OperatorSupport(False, ()),
    "SequenceEmpty": OperatorSupport(False, ()),
    "SequenceErase": OperatorSupport(False, ()),
    "SequenceInsert": OperatorSupport(False, ()),
    "SequenceLength": OperatorSupport(False, ()),
    "SequenceMap": OperatorSupport(False, ()),
    "Shape": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "Shrink": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "Sigmoid": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Sign": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "Sin": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Sinh": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Size": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "Slice": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "Softmax": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "SoftmaxCrossEntropyLoss": OperatorSupport(False, ()),
    "Softplus": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Softsign": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "SpaceToDepth": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "Split": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "SplitToSequence": OperatorSupport(False, ()),
    "Sqrt": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Squeeze": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'),
        '`axes` must be an initializer'),
    "StringConcat": OperatorSupport(False, ()),
    "StringNormalizer": OperatorSupport(False, ()),
    "StringSplit": OperatorSupport(False, ()),
    "Sub": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "Sum": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64')),
    "Tan": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Tanh": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "TfIdfVectorizer": OperatorSupport(False, ()),
    "ThresholdedRelu": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Tile": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "TopK": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64'),
        '`sorted` must be 1. `K` input must be less than 3840.'),
    "Transpose": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "Trilu": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "Unique": OperatorSupport(False, ()),
    "Unsqueeze": OperatorSupport(
        True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL'),
        '`axes` must be a constant tensor'),
    "Upsample": OperatorSupport(True, ('FP32', 'FP16', 'BF16')),
    "Where": OperatorSupport(True, ('FP32', 'FP16', 'BF16', 'INT32', 'INT64', 'BOOL')),
    "Xor": OperatorSupport(True, ('BOOL',)),
}
