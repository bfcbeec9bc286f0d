"""export/check_onnx.py: the exported graphs pass the TensorRT 10.5 parser table; graphs with what the table rules
out (unlisted or unsupported operators, element types outside an operator's list, non-constant ``axes``, Resize
modes, rank > 8, foreign domains, opset > 20) fail, each with a message naming the node."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from export.check_onnx import check_graph, check_onnx_main
from export.ops_tensorrt_10_5 import CORRECTIONS, DELTAS, OPERATORS, OPSET_RANGE, SOURCE
from runtime.spec.contract import ENGINES, PRECISIONS


def test_table_is_the_recorded_release() -> None:
    assert SOURCE["release_10_5_commit"] == "886aff917b63f10a81c5f31e89752a3b46169623"
    assert OPSET_RANGE == (9, 20)
    assert set(DELTAS) == {"10.3", "10.4", "10.5"} and "ConstantOfShape" in CORRECTIONS
    assert len(OPERATORS) == 196
    # Spot checks of rows that matter to these graphs and of the deltas.
    assert OPERATORS["MatMul"].types == ("FP32", "FP16", "BF16")
    assert OPERATORS["Softmax"].supported and OPERATORS["Resize"].supported
    assert not OPERATORS["Unique"].supported
    assert OPERATORS["STFT"].supported and OPERATORS["STFT"].types == ("FP32",)
    assert "Attention" not in OPERATORS and "RMSNormalization" not in OPERATORS and "TensorScatter" not in OPERATORS


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("engine", ENGINES)
def test_exported_graphs_pass(engine_dir: Path, engine: str, precision: str) -> None:  # noqa: F811
    report = check_graph(engine_dir / precision / f"{engine}.onnx")
    print(report.render(engine_dir))
    assert report.ok, report.problems
    assert report.opset == 20
    assert all(types in OPERATORS[op].types or "->" in types for op, types in report.operators)
    if precision == "bf16" and engine in ("vit", "mot"):
        assert ("MatMul", "BF16") in report.operators and ("Softmax", "FP32") in report.operators


def test_cli_lists_every_graph(engine_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    assert check_onnx_main([str(engine_dir)]) == 0
    out = capsys.readouterr().out
    graphs = 2 * len(ENGINES)       # fp32 and bf16
    assert "fp32/mot.onnx: opset 20" in out and "cos FP32 [B, Lhead+Lgen+Ltail, 16]" in out
    assert out.count("TensorRT 10.5 parser: OK") == graphs
    assert out.rstrip().endswith(f"{graphs} of {graphs} graphs pass the TensorRT 10.5 parser table")


def _save(tmp_path: Path, nodes, inputs, outputs, initializers=(), opset: int = 20, domains=()) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=imports), str(path))
    return path


def _value(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def test_rejects_unsupported_operator(tmp_path: Path) -> None:
    path = _save(tmp_path, [helper.make_node("Unique", ["x"], ["y"], name="u")],
                 [_value("x", TensorProto.FLOAT, [4])], [_value("y", TensorProto.FLOAT, None)])
    assert any("Unique node 'u': unsupported" in p for p in check_graph(path).problems)


def test_rejects_operator_missing_from_the_table(tmp_path: Path) -> None:
    path = _save(tmp_path, [helper.make_node("Foo", ["x"], ["y"], name="f", domain="custom")],
                 [_value("x", TensorProto.FLOAT, [4])], [_value("y", TensorProto.FLOAT, [4])], domains=("custom",))
    problems = check_graph(path).problems
    assert any("domain 'custom' needs a plugin" in p for p in problems)
    assert any("opset import of domain 'custom'" in p for p in problems)


def test_rejects_bf16_where_the_table_has_none(tmp_path: Path) -> None:
    # GridSample: FP32, FP16 only.
    path = _save(tmp_path, [helper.make_node("GridSample", ["x", "g"], ["y"], name="gs")],
                 [_value("x", TensorProto.BFLOAT16, [1, 1, 4, 4]), _value("g", TensorProto.BFLOAT16, [1, 4, 4, 2])],
                 [_value("y", TensorProto.BFLOAT16, [1, 1, 4, 4])])
    assert any("GridSample node 'gs': element type BF16" in p for p in check_graph(path).problems)


def test_rejects_cast_to_unsupported_type(tmp_path: Path) -> None:
    path = _save(tmp_path, [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE, name="c")],
                 [_value("x", TensorProto.FLOAT, [4])], [_value("y", TensorProto.DOUBLE, [4])])
    problems = check_graph(path).problems
    assert any("Cast node 'c': element type DOUBLE" in p for p in problems)
    assert any("'y': fp64 network I/O" in p for p in problems)


def test_rejects_non_constant_axes(tmp_path: Path) -> None:
    path = _save(tmp_path, [helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="r")],
                 [_value("x", TensorProto.FLOAT, [2, 3]), _value("axes", TensorProto.INT64, [1])],
                 [_value("y", TensorProto.FLOAT, None)])
    assert any("ReduceMean node 'r': input `axes` must be an initializer" in p for p in check_graph(path).problems)
    constant = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    path = _save(tmp_path, [helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="r")],
                 [_value("x", TensorProto.FLOAT, [2, 3])], [_value("y", TensorProto.FLOAT, None)], [constant])
    assert check_graph(path).ok


def test_rejects_resize_modes_outside_the_table(tmp_path: Path) -> None:
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic", name="rs")
    path = _save(tmp_path, [node], [_value("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                 [_value("y", TensorProto.FLOAT, [1, 1, 8, 8])], [scales])
    assert any("Resize node 'rs': mode 'cubic'" in p for p in check_graph(path).problems)


def test_rejects_rank_over_8(tmp_path: Path) -> None:
    shape = helper.make_tensor("shape", TensorProto.INT64, [9], [1] * 9)
    path = _save(tmp_path, [helper.make_node("Reshape", ["x", "shape"], ["y"], name="r")],
                 [_value("x", TensorProto.FLOAT, [1])], [_value("y", TensorProto.FLOAT, None)], [shape])
    assert any("'y' has rank 9 > 8" in p for p in check_graph(path).problems)


def test_rejects_opset_above_20(tmp_path: Path) -> None:
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [_value("x", TensorProto.FLOAT, [4])],
                 [_value("y", TensorProto.FLOAT, [4])], opset=21)
    assert any("opset 21 is outside the parser's range 9..20" in p for p in check_graph(path).problems)


def test_cli_fails_on_a_bad_graph_and_on_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _save(tmp_path, [helper.make_node("Unique", ["x"], ["y"], name="u")],
                 [_value("x", TensorProto.FLOAT, [4])], [_value("y", TensorProto.FLOAT, None)])
    assert check_onnx_main([str(path)]) == 1
    assert "! Unique node 'u'" in capsys.readouterr().out
    assert check_onnx_main([str(tmp_path / "nothing")]) == 2
    (tmp_path / "empty").mkdir()
    assert check_onnx_main([str(tmp_path / "empty")]) == 2
    assert "no .onnx graphs" in capsys.readouterr().err
