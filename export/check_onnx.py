"""`lance-trt check-onnx ENGINE_DIR`: will the TensorRT 10.5 ONNX parser take these graphs?

For every graph (``ENGINE_DIR/<precision>/<engine>.onnx``, or files named on the command line) it lists the opset,
the inputs and outputs and every operator with the element types it runs on, and fails on what the parser's operator
table (`export.ops_tensorrt_10_5`) rules out:

* an opset of the default domain outside the table's range, or a node of another domain (no plugins here);
* an operator the table does not list or marks unsupported;
* an element type outside the operator's supported types (bf16 included: it is a column of the table);
* the table's machine-checkable restrictions: inputs that must be initializers or constants (``axes`` of the
  reductions and ``Squeeze``/``Unsqueeze``, ``axis`` of ``CumSum``, ...), ``Resize`` modes;
* shapes TensorRT rejects: a tensor of rank over 8, a graph input of unknown rank, fp64 I/O.

Element types come from ONNX shape inference (run non-strict, so a graph that ONNX itself would reject for a type,
e.g. a bf16 ``Conv`` before opset 22, is still reported against TensorRT's table).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import onnx
import onnx.defs

from export.ops_tensorrt_10_5 import MAX_RANK, OPERATORS, OPSET_RANGE, TENSORRT_RELEASE

TYPE_NAMES = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.DOUBLE: "DOUBLE",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT4: "INT4",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8",
    onnx.TensorProto.BOOL: "BOOL",
}
# The tensor whose element type an operator's "Supported Types" column constrains: input 0 unless listed here.
_TYPED_BY_OUTPUT = frozenset({"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform"})
_TYPED_BY_INPUT = {"Where": 1}
_CONSTANT_INPUT = re.compile(r"`(\w+)`(?: input)? must be (?:an initializer|a constant tensor)")
_BACKTICKED = re.compile(r"`(\w+)`")


def _resize_modes(restrictions: str, label: str) -> frozenset[str]:
    """The backticked names after ``label`` up to the next sentence in the table's Resize row."""
    match = re.search(re.escape(label) + r"(.*?)\.(?:<br />|$)", restrictions)
    return frozenset(_BACKTICKED.findall(match.group(1))) if match else frozenset()


_RESIZE = OPERATORS["Resize"].restrictions
# Resize attribute -> (ONNX default, values the parser takes), read off the table's Resize row.
RESIZE_ATTRIBUTES = {
    "coordinate_transformation_mode": ("half_pixel", _resize_modes(_RESIZE, "Supported resize transformation modes:")),
    "mode": ("nearest", _resize_modes(_RESIZE, "Supported resize modes:")),
    "nearest_mode": ("round_prefer_floor", _resize_modes(_RESIZE, "Supported nearest modes:")),
    "keep_aspect_ratio_policy": ("stretch", _resize_modes(_RESIZE, "Supported aspect ratio policy:")),
}


@dataclass
class GraphReport:
    """One graph's listing and the problems found (empty: the parser takes it)."""

    path: Path
    opset: int
    nodes: int
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    operators: Counter = field(default_factory=Counter)   # (op_type, types) -> count
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self, root: Path | None = None) -> str:
        name = self.path.relative_to(root) if root is not None and self.path.is_relative_to(root) else self.path
        verdict = "OK" if self.ok else f"FAIL ({len(self.problems)})"
        lines = [f"{name}: opset {self.opset}, {self.nodes} nodes, TensorRT {TENSORRT_RELEASE} parser: {verdict}",
                 "  inputs:  " + "; ".join(self.inputs), "  outputs: " + "; ".join(self.outputs),
                 "  operators: " + ", ".join(f"{op} x{count} [{types}]"
                                             for (op, types), count in sorted(self.operators.items()))]
        lines += [f"  ! {p}" for p in self.problems]
        return "\n".join(lines)


def _describe(value: onnx.ValueInfoProto) -> str:
    tensor = value.type.tensor_type
    dims = [d.dim_param or str(d.dim_value) for d in tensor.shape.dim] if tensor.HasField("shape") else ["?"]
    return f"{value.name} {TYPE_NAMES.get(tensor.elem_type, tensor.elem_type)} [{', '.join(dims)}]"


class _Types:
    """Element type and rank of every named value of an inferred graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.elem: dict[str, int] = {}
        self.rank: dict[str, int] = {}
        for value in (*graph.input, *graph.output, *graph.value_info):
            tensor = value.type.tensor_type
            if tensor.elem_type:
                self.elem[value.name] = tensor.elem_type
            if tensor.HasField("shape"):
                self.rank[value.name] = len(tensor.shape.dim)
        for init in graph.initializer:
            self.elem[init.name] = init.data_type
            self.rank[init.name] = len(init.dims)

    def name(self, value: str) -> str:
        elem = self.elem.get(value)
        return "?" if elem is None else TYPE_NAMES.get(elem, onnx.TensorProto.DataType.Name(elem))


def _constant_inputs(node: onnx.NodeProto, opset: int) -> list[tuple[str, int]]:
    """(input name, index) pairs the table says must be initializers/constants for this node's operator."""
    rule = OPERATORS.get(node.op_type)
    if rule is None or not rule.restrictions:
        return []
    try:
        schema = onnx.defs.get_schema(node.op_type, opset)
    except onnx.defs.SchemaError:
        return []
    names = [formal.name for formal in schema.inputs]
    return [(name, names.index(name)) for name in _CONSTANT_INPUT.findall(rule.restrictions) if name in names]


def _check_node(node: onnx.NodeProto, opset: int, types: _Types, constants: set[str]) -> tuple[str, list[str]]:
    """The node's type signature for the listing and its problems."""
    where = f"{node.op_type} node {node.name!r}"
    if node.domain not in ("", "ai.onnx"):
        return "?", [f"{where}: domain {node.domain!r} needs a plugin; TensorRT parses the default domain only"]
    rule = OPERATORS.get(node.op_type)
    if node.op_type in _TYPED_BY_OUTPUT:
        typed = node.output[0]
    else:
        index = _TYPED_BY_INPUT.get(node.op_type, 0)
        typed = node.input[index] if len(node.input) > index else node.output[0]
    signature = types.name(typed)
    checked = [signature]
    if node.op_type in ("Cast", "CastLike"):
        signature = f"{types.name(node.input[0])}->{types.name(node.output[0])}"
        checked = [types.name(node.input[0]), types.name(node.output[0])]
    if rule is None:
        return signature, [f"{where}: not in the TensorRT {TENSORRT_RELEASE} operator table"]
    if not rule.supported:
        return signature, [f"{where}: unsupported by the TensorRT {TENSORRT_RELEASE} parser"]
    problems = [f"{where}: element type {t} is not among its supported types {', '.join(rule.types)}"
                for t in checked if t not in rule.types]
    for name, index in _constant_inputs(node, opset):
        if len(node.input) > index and node.input[index] and node.input[index] not in constants:
            problems.append(f"{where}: input `{name}` must be an initializer or constant, got {node.input[index]!r}")
    if node.op_type == "Resize":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for attr, (default, allowed) in RESIZE_ATTRIBUTES.items():
            value = attrs.get(attr, default)
            value = value.decode() if isinstance(value, bytes) else value
            if value not in allowed:
                problems.append(f"{where}: {attr} {value!r} is not one of {sorted(allowed)}")
        if attrs.get("antialias", 0):
            problems.append(f"{where}: antialiasing is not supported")
    return signature, problems


def check_graph(path: str | Path) -> GraphReport:
    """List one graph and check it against the TensorRT 10.5 parser's table (weights are not loaded)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    opset = opsets.get("ai.onnx", 0)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    graph = inferred.graph
    report = GraphReport(path, opset, len(graph.node), [_describe(v) for v in graph.input],
                         [_describe(v) for v in graph.output])
    low, high = OPSET_RANGE
    if not low <= opset <= high:
        report.problems.append(f"opset {opset} is outside the parser's range {low}..{high}")
    for domain in sorted(set(opsets) - {"ai.onnx"}):
        report.problems.append(f"opset import of domain {domain!r}: TensorRT parses the default domain only")
    types = _Types(graph)
    constants = {init.name for init in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    for node in graph.node:
        signature, problems = _check_node(node, opset, types, constants)
        report.operators[(node.op_type, signature)] += 1
        report.problems += problems
    for value in graph.input:
        if value.name not in types.rank:
            report.problems.append(f"input {value.name!r}: unknown rank (TensorRT needs every input's rank)")
    for value in (*graph.input, *graph.output):
        if types.elem.get(value.name) == onnx.TensorProto.DOUBLE:
            report.problems.append(f"{value.name!r}: fp64 network I/O (TensorRT has no fp64 tensors)")
    report.problems += [f"tensor {name!r} has rank {rank} > {MAX_RANK}"
                        for name, rank in sorted(types.rank.items()) if rank > MAX_RANK]
    return report


def find_graphs(paths: Sequence[Path]) -> list[Path]:
    """The ``.onnx`` files named, and those in the named folders and their precision subfolders."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted({*path.glob("*.onnx"), *path.glob("*/*.onnx")})
        else:
            found.append(path)
    return found


def check_onnx_main(argv: Sequence[str] | None = None) -> int:
    """``lance-trt check-onnx ENGINE_DIR|GRAPH...``: exit 0 when every graph passes, 1 when one fails, 2 on usage."""
    parser = argparse.ArgumentParser(prog="lance-trt check-onnx",
                                     description=f"check ONNX graphs against the TensorRT {TENSORRT_RELEASE} parser")
    parser.add_argument("paths", nargs="+", type=Path, help="engine folder(s) or .onnx files")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        print(f"lance-trt check-onnx: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    graphs = find_graphs(args.paths)
    if not graphs:
        print(f"lance-trt check-onnx: no .onnx graphs in {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    root = args.paths[0] if len(args.paths) == 1 and args.paths[0].is_dir() else None
    failed = 0
    for path in graphs:
        report = check_graph(path)
        print(report.render(root))
        failed += not report.ok
    print(f"{len(graphs) - failed} of {len(graphs)} graphs pass the TensorRT {TENSORRT_RELEASE} parser table")
    return 1 if failed else 0
