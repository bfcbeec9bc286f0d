"""export/onnx_export.py: the four engines exported from a tiny checkpoint, checked against the contract, run in ONNX
Runtime against the PyTorch engine modules, and the bf16 graphs proven to be the fp32 graphs plus Cast nodes.

The export runs at most once per session, into pytest's cache keyed by the checkpoint files and the exporting code
(`export_cached`): a later session with the same checkpoint and code reuses it. tests/test_check_onnx.py,
test_build.py and test_runners.py import the session fixtures below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import numpy_helper

from export.onnx_export import (
    FP32_ENGINES,
    OPSET,
    ExportError,
    check_saved,
    conformance,
    export_main,
    read_graph,
    save_graph,
)
from runtime.spec import contract
from runtime.models.checkpoint import LanceModels
from runtime.spec.contract import ENGINES, PRECISIONS, EngineSpec
from runtime.pipeline.core import carried
from runtime.runners import EngineError, TorchRunner
from runtime.runners.graphs import graph_modules
from runtime.runners.ort import OrtRunner
from runtime.models.mot import latent_pos_table, mrope_cos_sin
from runtime.models.vit import vision_inputs
from tests.parity import compare

# --- Files, metadata, contract conformance -----------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("engine", ENGINES)
def test_graph_conforms(engine_dir: Path, tiny_specs: dict[str, EngineSpec], engine: str, precision: str) -> None:
    path = engine_dir / precision / f"{engine}.onnx"
    inferred = check_saved(path, tiny_specs[engine], precision)
    info = read_graph(path)
    assert (info.engine, info.precision, info.spec) == (engine, precision, tiny_specs[engine])
    assert [o.version for o in inferred.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    # Decomposed attention and norms, static routing, no in-place cache update.
    forbidden = {"Attention", "RMSNormalization", "TensorScatter", "ScatterND", "ScatterElements", "NonZero", "If",
                 "Loop"}
    assert not forbidden & {n.op_type for n in inferred.graph.node}
    assert not (engine_dir / precision / f"{engine}.onnx.data").exists()   # tiny weights stay inline


def test_conformance_names_each_problem(engine_dir: Path, tiny_specs: dict[str, EngineSpec]) -> None:
    """Conformance fails on a wrong dtype, a wrong dim name and a bf16 graph checked as fp32."""
    model = onnx.load(str(engine_dir / "fp32" / "vit.onnx"), load_external_data=False)
    spec = tiny_specs["vit"]
    assert conformance(model, spec, "fp32") == []
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_param = "P"
    problems = conformance(model, spec, "fp32")
    assert any("'patches': dtype DOUBLE" in p for p in problems)
    assert any("'cos' axis 0: 'P'" in p and "'4*M'" in p for p in problems)
    bf16 = onnx.load(str(engine_dir / "bf16" / "mot.onnx"), load_external_data=False)
    assert any("'und_head': dtype BFLOAT16" in p for p in conformance(bf16, tiny_specs["mot"], "fp32"))


def test_external_data_keeps_stable_names(engine_dir: Path, tiny_specs: dict[str, EngineSpec],
                                          tmp_path: Path) -> None:
    """Past the protobuf limit the weights go to <engine>.onnx.data, named so in the graph, and the graph runs."""
    model = ir.load(engine_dir / "fp32" / "vit.onnx")
    path = tmp_path / "vit.onnx"
    save_graph(model, path, external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.onnx", "vit.onnx.data"]
    proto = onnx.load(str(path), load_external_data=False)
    locations = {kv.value for t in proto.graph.initializer for kv in t.external_data if kv.key == "location"}
    assert locations == {"vit.onnx.data"}
    check_saved(path, tiny_specs["vit"], "fp32")
    feed = contract.sample_inputs(tiny_specs["vit"], M=50)
    out = OrtRunner(tiny_specs["vit"], path).infer(feed)["hidden"]
    ref = OrtRunner(tiny_specs["vit"], engine_dir / "fp32" / "vit.onnx").infer(feed)["hidden"]
    assert torch.equal(out, ref)


def test_export_cli_refuses_unknown_engine(tiny_checkpoint: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--engines", "vit,unet"]) == 2
    assert "unknown ['unet']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_read_graph_refuses_foreign_onnx(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "foreign.onnx"))
    with pytest.raises(ExportError, match="no lance.engine, lance.precision, lance.contract metadata"):
        read_graph(tmp_path / "foreign.onnx")


# --- bf16 = fp32 + Cast nodes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanonicalGraph:
    """A graph with its Cast nodes bypassed: non-Cast nodes in order with their attributes and wiring (inputs as
    graph inputs, initializer positions or node outputs), the initializer values (fp32) at each use, and the
    outputs' sources."""

    nodes: list[tuple]
    initializers: list[np.ndarray]
    outputs: tuple
    casts: int


def canonical(path: Path) -> CanonicalGraph:
    graph = onnx.load(str(path)).graph
    bypass = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}

    def source(name: str) -> str:
        while name in bypass:
            name = bypass[name]
        return name

    inits = {t.name: t for t in graph.initializer}
    ids: dict[str, tuple] = {i.name: ("input", i.name) for i in graph.input}
    nodes, values = [], []
    for node in graph.node:
        if node.op_type == "Cast":
            continue
        inputs = []
        for name in node.input:
            name = source(name)
            if name in inits:
                array = numpy_helper.to_array(inits[name])
                values.append(array.astype(np.float32) if array.dtype.kind == "f" or array.dtype.name == "bfloat16"
                              else array)
                inputs.append(("initializer", len(values) - 1, tuple(inits[name].dims)))
            else:
                inputs.append(ids.get(name, ("missing", name)))
        attrs = tuple(sorted(
            (a.name, tuple(a.t.dims) if a.type == onnx.AttributeProto.TENSOR else onnx.helper.get_attribute_value(a))
            for a in node.attribute))
        for j, out in enumerate(node.output):
            ids[out] = ("node", len(nodes), j)
        nodes.append((node.op_type, node.domain, attrs, tuple(inputs)))
    outputs = tuple(ids.get(source(o.name)) for o in graph.output)
    return CanonicalGraph(nodes, values, outputs, sum(n.op_type == "Cast" for n in graph.node))


@pytest.mark.parametrize("engine", ENGINES)
def test_bf16_graph_is_fp32_graph_plus_casts(engine_dir: Path, engine: str) -> None:
    fp32, bf16 = canonical(engine_dir / "fp32" / f"{engine}.onnx"), canonical(engine_dir / "bf16" / f"{engine}.onnx")
    print(f"{engine}: {len(fp32.nodes)} nodes, casts fp32 {fp32.casts} / bf16 {bf16.casts}")
    assert len(fp32.nodes) == len(bf16.nodes)
    for i, (a, b) in enumerate(zip(fp32.nodes, bf16.nodes)):
        assert a == b, f"{engine}: node {i} differs beyond casts:\n  fp32 {a}\n  bf16 {b}"
    assert fp32.outputs == bf16.outputs
    for a, b in zip(fp32.initializers, bf16.initializers):
        assert a.shape == b.shape
        if a.dtype.kind == "f":
            # bf16 keeps 8 significant bits; the tiny checkpoint's weights are bf16 values, so they match exactly.
            np.testing.assert_allclose(b, a, rtol=2**-8, atol=0)
        else:
            np.testing.assert_array_equal(a, b)
    if engine in FP32_ENGINES:
        assert fp32.casts == bf16.casts
    else:
        assert bf16.casts > fp32.casts


# --- ONNX Runtime vs PyTorch ---------------------------------------------------------------------------------------


def _check_outputs(engine: str, case: str, ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == ref.keys()
    for name, r in ref.items():
        if r.numel() == 0:
            assert ours[name].shape == r.shape, f"{engine} {case} {name}"
            continue
        compare(f"{engine} [{case}] {name}", ours[name], r.float())


@pytest.fixture(scope="module")
def runners(engine_dir: Path, tiny_models: LanceModels, tiny_specs: dict[str, EngineSpec]):
    modules = graph_modules(tiny_models)
    return {name: (OrtRunner(tiny_specs[name], engine_dir / "fp32" / f"{name}.onnx", threads=2),
                   TorchRunner(tiny_specs[name], modules[name])) for name in ENGINES}


VIT_GRIDS = {
    "smallest (21:9 at 224)": (1, 10, 20),
    "edge windows": (1, 20, 14),
    "default 672x672": (1, 48, 48),
    "16:9 at 672": (1, 36, 64),
    "largest (21:9 at 896)": (1, 42, 98),
}


@pytest.mark.parametrize("case", VIT_GRIDS)
def test_vit_parity(runners, tiny_models: LanceModels, case: str) -> None:
    grid = VIT_GRIDS[case]
    config = tiny_models.vision_config
    inputs = vision_inputs(grid, config)
    patches = torch.randn(inputs.num_patches, config.patch_dim, generator=torch.Generator().manual_seed(1))
    feed = {"patches": patches, **inputs.engine_inputs()}
    ort_runner, torch_runner = runners["vit"]
    _check_outputs("vit", case, ort_runner.infer(feed), torch_runner.infer(feed))


@dataclass(frozen=True)
class MotCase:
    batch: int
    head: int
    gen: int
    tail: int
    past: int
    past_len: tuple[int, ...]
    causal: bool
    t: float = 0.5


MOT_CASES = {
    "prefill, empty past": MotCase(1, 9, 0, 0, 0, (0,), True),
    # the largest image ViT block; a video's (17k rows) would take tens of GB of eager attention on a CPU
    "prefill, largest image block, CFG batch": MotCase(2, contract.MAX_VIT_PATCHES // contract.VIT_MERGE_UNIT + 2, 0,
                                                       0, 6, (6, 2), False),
    "decode, one row, longest past": MotCase(1, 1, 0, 0, contract.MAX_PAST, (contract.MAX_PAST - 3,), True),
    "denoise, smallest grid, CFG batch": MotCase(2, 1, contract.MIN_LATENT_TOKENS, 1, 37, (37, 20), False, 0.9),
    "reference prefill, largest grid": MotCase(1, 1, contract.MAX_LATENT_TOKENS, 1, 1, (1,), False, 0.0),
}


def mot_feed(models: LanceModels, spec: EngineSpec, case: MotCase, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random rows and cache, host-built mRoPE tables and latent position rows, as the pipeline feeds them."""
    g = torch.Generator().manual_seed(seed)
    config = models.llm_config
    rows = case.head + case.gen + case.tail
    feed = contract.sample_inputs(spec, seed=seed, B=case.batch, Lhead=case.head, Lgen=case.gen, Ltail=case.tail,
                                  P=case.past)
    positions = torch.randint(0, 4000, (case.batch, 3, rows), generator=g)
    feed["cos"], feed["sin"] = mrope_cos_sin(positions, config.head_dim, config.rope_theta, config.mrope_section)
    table = latent_pos_table(1, 64, config.hidden_size)
    feed["latent_pos"] = table[torch.arange(case.gen) % table.shape[0]]
    feed["timestep"] = torch.full((case.batch, case.gen), case.t)
    feed["past_len"] = torch.tensor(case.past_len)
    feed["causal"] = torch.tensor(case.causal)
    return feed


@pytest.mark.parametrize("case", MOT_CASES)
def test_mot_parity(runners, tiny_models: LanceModels, tiny_specs: dict[str, EngineSpec], case: str) -> None:
    feed = mot_feed(tiny_models, tiny_specs["mot"], MOT_CASES[case])
    ort_runner, torch_runner = runners["mot"]
    _check_outputs("mot", case, ort_runner.infer(feed), torch_runner.infer(feed))


LATENT_GRIDS = {
    "smallest (21:9 at 256)": (10, 23),
    "square 256": (16, 16),
    "default 768": (48, 48),
    "largest landscape (21:9 at 1024)": (42, 98),
    "largest portrait": (98, 42),
}


@pytest.mark.parametrize("case", LATENT_GRIDS)
def test_vae_encode_parity(runners, tiny_specs: dict[str, EngineSpec], case: str) -> None:
    h, w = LATENT_GRIDS[case]
    feed = contract.sample_inputs(tiny_specs["vae_encode"], seed=2, h=h, w=w)
    feed["image"] = feed["image"].clamp(-1, 1)
    ort_runner, torch_runner = runners["vae_encode"]
    _check_outputs("vae_encode", case, ort_runner.infer(feed), torch_runner.infer(feed))


@pytest.mark.parametrize("case", LATENT_GRIDS)
def test_vae_decode_parity(runners, tiny_specs: dict[str, EngineSpec], case: str) -> None:
    h, w = LATENT_GRIDS[case]
    feed = contract.sample_inputs(tiny_specs["vae_decode"], seed=3, h=h, w=w)
    ort_runner, torch_runner = runners["vae_decode"]
    _check_outputs("vae_decode", case, ort_runner.infer(feed), torch_runner.infer(feed))


@pytest.mark.parametrize("case", ["square 256", "smallest (21:9 at 256)"])
def test_chunked_video_decode_equals_the_vae(runners, tiny_models: LanceModels, case: str) -> None:
    """Three latent frames through the exported chunk graphs (frame 0, then two chunks, the caches passed from call
    to call) give the frames of the VAE's whole-video decode (itself checked against diffusers in test_vae.py)."""
    h, w = LATENT_GRIDS[case]
    latent = torch.randn(1, 48, 3, h, w, generator=torch.Generator().manual_seed(9))
    first, chunk = runners["vae_decode_first"][0], runners["vae_decode_chunk"][0]
    out = first.infer({"latent": latent[:, :, :1]})
    frames = [out["video"]]
    for index in (1, 2):
        out = chunk.infer({"latent": latent[:, :, index:index + 1], **carried(out)})
        frames.append(out["video"])
    with torch.no_grad():
        expected = tiny_models.vae.decode(latent)
    assert expected.shape[2] == 9
    compare(f"chunked decode [{case}]", torch.cat(frames, dim=2), expected)


@pytest.mark.parametrize("case", ["square 256", "smallest (21:9 at 256)"])
def test_chunked_video_encode_equals_the_vae(runners, tiny_models: LanceModels, case: str) -> None:
    """Nine frames through the exported encoder chunk graphs (frame 0, then two chunks of 4, the caches passed along)
    give the posterior of the VAE's whole-video encode (itself checked against diffusers in test_vae.py), and each
    latent frame is that posterior sampled with its noise."""
    h, w = LATENT_GRIDS[case]
    g = torch.Generator().manual_seed(10)
    video = torch.rand(1, 3, 9, 16 * h, 16 * w, generator=g) * 2 - 1
    noise = torch.randn(1, 48, 3, h, w, generator=g)
    first, chunk = runners["vae_encode_first"][0], runners["vae_encode_chunk"][0]
    out = first.infer({"video": video[:, :, :1], "noise": noise[:, :, :1]})
    outs = [out]
    for index in (1, 2):
        out = chunk.infer({"video": video[:, :, 4 * index - 3:4 * index + 1], "noise": noise[:, :, index:index + 1],
                           **carried(out)})
        outs.append(out)
    with torch.no_grad():
        mean, log_var = tiny_models.vae.encode(video)
    got = {name: torch.cat([o[name] for o in outs], dim=2) for name in ("latent", "mean", "log_var")}
    compare(f"chunked encode mean [{case}]", got["mean"], mean)
    compare(f"chunked encode log_var [{case}]", got["log_var"], log_var)
    compare(f"chunked encode latent [{case}]", got["latent"], mean + torch.exp(0.5 * log_var) * noise)


def test_ort_runner_refuses_shapes_outside_every_profile(runners, tiny_specs: dict[str, EngineSpec]) -> None:
    ort_runner, _ = runners["vae_decode"]
    with pytest.raises(EngineError, match="fit no profile"):
        ort_runner.infer(contract.sample_inputs(tiny_specs["vae_decode"], h=98, w=98))
