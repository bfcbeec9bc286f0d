"""`lance-trt export`: the engine modules of ``runtime.runners.graphs`` -> ``ENGINE_DIR/<precision>/<engine>.onnx``.

Every name, dynamic axis and sample input comes from ``runtime.spec.contract``. One export per engine and precision:

1. ``torch.onnx.export(dynamo=True)`` at opset `OPSET` with the contract's named ``Dim``s, traced on
   ``contract.export_dims`` sample inputs (the exporter's own optimizer off: the passes below run instead, logged);
2. `GraphPasses`: named passes over one ``onnx_ir`` model, each logging the node count (inline, constant folding
   with no size limit so the VAE's run-time weight slices ``weight[:, :, -1]`` fold into initializers, rewrite rules,
   dead nodes, constants lifted to initializers, duplicate initializers, common subexpressions, I/O names);
3. save: ``<engine>.onnx``, plus ``<engine>.onnx.data`` when the weights pass the 2 GB protobuf limit; the graph's
   metadata carries its contract (`META_CONTRACT`: ``EngineSpec.to_dict`` JSON) and precision, which
   ``lance-trt build`` and the runners read back;
4. ``onnx.checker`` (by path, so external data is checked too), strict shape inference, and `conformance`:
   names, dtypes, ranks and fixed sizes of every input and output against the contract, opset <= `OPSET`.

The bf16 graph is the same module with its weights in bf16: the fp32 islands are those the reference code computes
in fp32 (norm statistics, q/k-norm + RoPE, softmax), so it is the fp32 graph plus Cast nodes (tests/test_export.py
proves it node by node). The VAE engines (`FP32_ENGINES`) stay fp32 in ``bf16/`` as well: ONNX admits bf16 ``Conv``
only from opset 22, past the opset TensorRT 10.5 parses, and NVIDIA's own Wan pipelines run this VAE in fp32.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import onnxscript.rewriter
import torch
from onnx_ir.passes import common as ir_passes
from onnxscript.rewriter.rules.common import slice_split_rule
from torch import nn

from runtime.spec import constants
from runtime.spec.contract import (
    ENGINES,
    META_CONTRACT,
    META_ENGINE,
    META_PRECISION,
    META_SOURCE,
    PRECISIONS,
    DType,
    EngineSpec,
    dynamic_axes,
    export_dims,
    sample_inputs,
    torch_dynamic_shapes,
)

logger = logging.getLogger(__name__)

OPSET = 20
"""TensorRT 10.5's parser takes opsets 9..20; 20 keeps attention and norms decomposed (no opset-23 ops)."""
PROTOBUF_LIMIT = 2**31
"""A ModelProto cannot exceed 2 GiB: past `EXTERNAL_DATA_THRESHOLD` of weights they go to ``<engine>.onnx.data``."""
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 2**26
_FOLD_LIMIT = 2**31
"""Constant-folding size limit in elements: high enough to fold slices of the largest weights (the exporter's default
of 8192 inputs leaves the VAE's 2-D weight slices as Gathers on whole 3-D weights)."""
REWRITE_RULES = tuple(rule for rule in onnxscript.rewriter._DEFAULT_REWRITE_RULES if rule is not slice_split_rule)
"""onnxscript's default rewrite rules but ``SlicesSplit``: its matcher (a pattern with several output nodes) walks the
whole graph for every Slice, quadratic in the graph's size; on the 36-layer mot graph it alone ran for minutes, and
TensorRT takes the Slices as they are."""
FP32_ENGINES = ("vae_encode", "vae_decode", "vae_encode_first", "vae_encode_chunk", "vae_decode_first",
                "vae_decode_chunk")
"""Engines whose ``bf16/`` graph is the fp32 graph (their I/O is fp32 in the contract either way)."""

_ONNX_DTYPES = {
    DType.FP32: onnx.TensorProto.FLOAT,
    DType.BF16: onnx.TensorProto.BFLOAT16,
    DType.INT64: onnx.TensorProto.INT64,
    DType.BOOL: onnx.TensorProto.BOOL,
    DType.UINT8: onnx.TensorProto.UINT8,
}


class ExportError(RuntimeError):
    """An exported graph failed a check: names the engine, the precision and what is wrong."""


def onnx_dtype(dtype: DType, precision: str) -> int:
    """The ``onnx.TensorProto`` element type of a contract dtype in a graph of ``precision``."""
    return _ONNX_DTYPES[dtype.concrete(precision)]


# --- Graph passes ------------------------------------------------------------------------------------------------


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


class GraphPasses:
    """Named passes over one ``onnx_ir`` model (TensorRT demo's ``Optimizer`` shape): each logs the node count after
    it and records ``(name, nodes before, nodes after)`` in ``history``."""

    def __init__(self, model: ir.Model, label: str) -> None:
        self.model = model
        self.label = label
        self.history: list[tuple[str, int, int]] = []

    def _run(self, name: str, apply: Callable[[ir.Model], object]) -> None:
        before = _count_nodes(self.model)
        apply(self.model)
        after = _count_nodes(self.model)
        self.history.append((name, before, after))
        logger.info("%s: %-24s %5d -> %5d nodes", self.label, name, before, after)

    def inline(self) -> None:
        """Inline the exporter's local functions (TensorRT parses plain graphs best)."""
        self._run("inline", ir_passes.InlinePass())

    def fold_constants(self) -> None:
        """Fold every subgraph of constants, weight slices and shape arithmetic included."""
        self._run("fold_constants", lambda m: onnxscript.optimizer.fold_constants_ir(
            m, onnx_shape_inference=True, input_size_limit=_FOLD_LIMIT, output_size_limit=_FOLD_LIMIT))

    def rewrite(self) -> None:
        """`REWRITE_RULES` (no-op casts and reshapes, collapsed slices, ...)."""
        self._run("rewrite", lambda m: onnxscript.rewriter.rewrite(m, REWRITE_RULES))

    def remove_dead_nodes(self) -> None:
        """Nodes, functions and opset imports nothing reads."""
        passes = ir.passes.Sequential(ir_passes.RemoveUnusedNodesPass(), ir_passes.RemoveUnusedFunctionsPass(),
                                      ir_passes.RemoveUnusedOpsetsPass())
        self._run("remove_dead_nodes", passes)

    def lift_constants(self) -> None:
        """Constant nodes -> initializers (TensorRT wants ``axes``-like inputs as initializers)."""
        self._run("lift_constants", ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0))

    def deduplicate_initializers(self) -> None:
        self._run("deduplicate_initializers", ir_passes.DeduplicateInitializersPass())

    def eliminate_common_subexpressions(self) -> None:
        self._run("common_subexpressions", ir_passes.CommonSubexpressionEliminationPass())

    def name_io(self, spec: EngineSpec) -> None:
        """Graph inputs and outputs carry the contract's dim spellings (``L`` sums and derived sides included), not
        the exporter's symbols (``s34``)."""
        axes = dynamic_axes(spec)

        def rename(model: ir.Model) -> None:
            for value in (*model.graph.inputs, *model.graph.outputs):
                names = axes.get(value.name, {})
                if value.shape is None:
                    raise ExportError(f"{self.label}: {value.name!r} has no shape")
                dims = [ir.SymbolicDim(names[i]) if i in names else d for i, d in enumerate(value.shape.dims)]
                value.shape = ir.Shape(dims)

        self._run("name_io", rename)

    def sort(self) -> None:
        self._run("topological_sort", ir_passes.TopologicalSortPass())

    def cleanup(self, spec: EngineSpec) -> None:
        """The standard sequence; fold, rewrite and dead-node removal run twice, as their results feed each other.

        Common subexpressions go first: a weight read by two nodes of the same op (the und expert's ``Transpose`` of
        a projection, once for the head rows and once for the tail rows) must be one node before folding, or the
        folded copies become separate initializers (`DeduplicateInitializersPass` compares small tensors only): on
        the full-size mot that duplicated every und weight, 16.1 GiB of bf16 instead of 11.5."""
        self.inline()
        self.eliminate_common_subexpressions()
        for _ in range(2):
            self.fold_constants()
            self.rewrite()
            self.remove_dead_nodes()
        self.lift_constants()
        self.deduplicate_initializers()
        self.eliminate_common_subexpressions()
        self.remove_dead_nodes()
        self.name_io(spec)
        self.sort()


# --- Checks ------------------------------------------------------------------------------------------------------


def _value_shape(value: onnx.ValueInfoProto) -> tuple[int | str, ...] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor_type.shape.dim)


def conformance(model: onnx.ModelProto, spec: EngineSpec, precision: str) -> list[str]:
    """What differs between a graph's inputs/outputs and the contract: names (and order), dtypes, ranks, fixed sizes,
    dynamic dim spellings; and an opset other than the default domain at <= `OPSET`. Empty when the graph conforms."""
    problems: list[str] = []
    axes = dynamic_axes(spec)
    for kind, values, tensors in (("input", model.graph.input, spec.inputs),
                                  ("output", model.graph.output, spec.outputs)):
        names = [v.name for v in values]
        if names != [t.name for t in tensors]:
            problems.append(f"{kind}s are {names}, the contract says {[t.name for t in tensors]}")
            continue
        for value, t in zip(values, tensors):
            elem = value.type.tensor_type.elem_type
            if elem != onnx_dtype(t.dtype, precision):
                problems.append(f"{kind} {t.name!r}: dtype {onnx.TensorProto.DataType.Name(elem)}, the contract says "
                                f"{t.dtype.concrete(precision).value}")
            shape = _value_shape(value)
            if shape is None or len(shape) != len(t.shape):
                problems.append(f"{kind} {t.name!r}: shape {shape}, the contract says rank {len(t.shape)}")
                continue
            named = axes.get(t.name, {})
            fixed = spec.shape(t, **dict.fromkeys(spec.dynamic_dims, 0))   # the dynamic axes' zeros are unused
            for i, got in enumerate(shape):
                expected = named.get(i, fixed[i])
                if got != expected:
                    problems.append(f"{kind} {t.name!r} axis {i}: {got!r}, the contract says {expected!r}")
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > OPSET:
            problems.append(f"opset {opset.version} > {OPSET}")
    return problems


def check_saved(path: Path, spec: EngineSpec, precision: str) -> onnx.ModelProto:
    """``onnx.checker`` (by path: external data included), strict shape inference and `conformance` on a saved graph.

    Returns:
        the shape-inferred graph, weights not loaded.
    Raises:
        ExportError: any check fails.
    """
    label = f"{spec.name} ({precision})"
    try:
        onnx.checker.check_model(str(path), full_check=False)
        model = onnx.load(str(path), load_external_data=False)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"{label}: {path} fails the ONNX checks: {err}") from err
    problems = conformance(inferred, spec, precision)
    if problems:
        raise ExportError(f"{label}: {path} does not match the contract:\n  " + "\n  ".join(problems))
    return inferred


# --- Export ------------------------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What one export did: file, node counts (after the exporter, after each pass, final), timing."""

    engine: str
    precision: str
    path: str
    data_file: str | None
    exported_nodes: int
    nodes: int
    seconds: float
    passes: list[tuple[str, int, int]] = field(default_factory=list)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_graph(model: ir.Model, path: Path, *, external: bool) -> None:
    """Write ``path`` (and, if ``external``, every weight into ``<path name>.data`` beside it, the location the graph
    records), replacing older files of that name; both readable by all (onnx_ir writes 0600 files)."""
    data = path.with_name(path.name + ".data")
    for stale in (path, data):
        stale.unlink(missing_ok=True)
    ir.save(model, path, external_data=data.name if external else None)
    for written in (path, data):
        if written.exists():
            os.chmod(written, 0o644)


def export_engine(spec: EngineSpec, module: nn.Module, precision: str, out_dir: str | Path,
                  source: str = "") -> ExportReport:
    """Export one engine module to ``out_dir/<engine>.onnx`` and check it.

    Args:
        spec: the engine's contract.
        module: its engine-shaped module (``runtime.runners.graphs``), weights in ``precision``.
        precision: ``"fp32"`` or ``"bf16"``: the dtype of the ``FLOAT`` tensors of the sample inputs.
        out_dir: folder for ``<engine>.onnx`` (+ ``.onnx.data``); created if needed.
        source: where the weights came from (recorded in the graph's metadata).
    Raises:
        ExportError: the saved graph fails a check.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    label = f"{spec.name} ({precision})"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{spec.name}.onnx"

    start = time.perf_counter()
    dims = export_dims(spec)
    feed = sample_inputs(spec, precision, **dims)
    logger.info("%s: tracing at %s", label, dims)
    args, dynamic_shapes = _positional(module, spec, feed)
    with torch.no_grad():
        program = torch.onnx.export(
            module.eval(), args, dynamo=True, opset_version=OPSET,
            input_names=list(spec.input_names), output_names=list(spec.output_names),
            dynamic_shapes=dynamic_shapes, optimize=False, verify=False, report=False,
        )
    model = program.model
    exported = _count_nodes(model)
    logger.info("%s: exported %d nodes in %.1f s", label, exported, time.perf_counter() - start)
    passes = GraphPasses(model, label)
    passes.cleanup(spec)
    model.metadata_props.update({META_ENGINE: spec.name, META_PRECISION: precision,
                                 META_CONTRACT: json.dumps(spec.to_dict()), META_SOURCE: source})

    external = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    save_graph(model, path, external=external)
    check_saved(path, spec, precision)
    seconds = time.perf_counter() - start
    report = ExportReport(
        engine=spec.name, precision=precision, path=str(path), data_file=f"{path.name}.data" if external else None,
        exported_nodes=exported, nodes=_count_nodes(model), seconds=round(seconds, 2),
        passes=passes.history,
    )
    logger.info("%s: %s, %d nodes, %.1f s", label, path, report.nodes, seconds)
    return report


def _positional(module: nn.Module, spec: EngineSpec, feed: Mapping[str, Any]) -> tuple[tuple, tuple]:
    """The sample inputs in contract order and their dynamic shapes nested as the forward's parameters: an engine
    module takes its inputs positionally, and a ``*past`` parameter (the video decoder's caches) takes the rest as one
    tuple, which is how torch.export matches ``dynamic_shapes`` to it."""
    shapes = torch_dynamic_shapes(spec)
    values = tuple(feed[name] for name in spec.input_names)
    dims: list[Any] = [shapes[name] for name in spec.input_names]
    parameters = list(inspect.signature(module.forward).parameters.values())
    if parameters and parameters[-1].kind is inspect.Parameter.VAR_POSITIONAL:
        fixed = len(parameters) - 1
        dims = [*dims[:fixed], tuple(dims[fixed:])]
    return values, tuple(dims)


def export_models(
    modules: Mapping[str, nn.Module],
    specs: Mapping[str, EngineSpec],
    out_dir: str | Path,
    precisions: Sequence[str] = ("fp32",),
    engines: Iterable[str] = ENGINES,
    source: str = "",
) -> list[ExportReport]:
    """Export ``engines`` for each precision into ``out_dir/<precision>/``.

    bf16 casts the modules' weights in place (fp32 first, so one copy of the weights is held at a time); the
    `FP32_ENGINES` keep fp32 weights, and their fp32 files are copied when this call exported them already.

    Args:
        modules: engine modules by name (``runtime.runners.graphs.graph_modules``), fp32 weights.
        specs: the contract per engine.
        out_dir: the engine folder.
        precisions: any of ``("fp32", "bf16")``.
        engines: engine names to export.
        source: recorded in each graph's metadata (the checkpoint).
    """
    engines = tuple(engines)
    reports: list[ExportReport] = []
    fp32_reports: dict[str, ExportReport] = {}
    for precision in sorted(precisions, key=PRECISIONS.index):
        folder = Path(out_dir) / precision
        for name in engines:
            if precision == "bf16" and name in fp32_reports and name in FP32_ENGINES:
                reports.append(_copy_export(fp32_reports[name], folder, precision))
                continue
            dtype = torch.bfloat16 if precision == "bf16" and name not in FP32_ENGINES else torch.float32
            report = export_engine(specs[name], modules[name].to(dtype), precision, folder, source)
            if precision == "fp32":
                fp32_reports[name] = report
            reports.append(report)
    return reports


def _copy_export(report: ExportReport, folder: Path, precision: str) -> ExportReport:
    """The same graph under another precision folder, its precision metadata updated (the weights file, if any, is
    copied as it is)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(report.path)
    if report.data_file:
        shutil.copyfile(source.parent / report.data_file, folder / report.data_file)
        os.chmod(folder / report.data_file, 0o644)
    model = onnx.load(str(source), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == META_PRECISION:
            prop.value = precision
    path = folder / source.name
    onnx.save(model, str(path))
    os.chmod(path, 0o644)
    logger.info("%s (%s): the fp32 graph, copied to %s", report.engine, precision, folder)
    return replace(report, precision=precision, path=str(path), seconds=0.0)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, precisions: Sequence[str] = ("fp32",),
                      engines: Iterable[str] = ENGINES, video: bool = False) -> list[ExportReport]:
    """Load a checkpoint in fp32 (``runtime.models.checkpoint.load_lance``; ``video``: the ``Lance_3B_Video`` model,
    whose MoT and ViT weights differ) and export its engines."""
    from runtime.models.checkpoint import load_lance
    from runtime.spec.contract import engine_specs
    from runtime.runners.graphs import graph_modules

    models = load_lance(checkpoint, device="cpu", dtype=torch.float32, video=video)
    specs = engine_specs(models.llm_config, models.vision_config, models.vae_config)
    source = f"{checkpoint} ({constants.VIDEO_CKPT_DIR if video else constants.IMAGE_CKPT_DIR})"
    return export_models(graph_modules(models), specs, out_dir, precisions, engines, source=source)


@dataclass(frozen=True)
class GraphInfo:
    """What an exported graph says about itself (its metadata): engine, precision, contract."""

    path: Path
    engine: str
    precision: str
    spec: EngineSpec


def read_graph(path: str | Path) -> GraphInfo:
    """The metadata `export_engine` wrote into a graph (weights are not read).

    Raises:
        ExportError: the file is not a graph exported by this package.
    """
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in (META_ENGINE, META_PRECISION, META_CONTRACT) if k not in meta]
    if missing:
        raise ExportError(f"{path}: no {', '.join(missing)} metadata; export it with lance-trt export")
    spec = EngineSpec.from_dict(json.loads(meta[META_CONTRACT]))
    if spec.name != meta[META_ENGINE] or meta[META_PRECISION] not in PRECISIONS:
        raise ExportError(f"{path}: inconsistent metadata (engine {meta[META_ENGINE]!r}, contract of {spec.name!r}, "
                          f"precision {meta[META_PRECISION]!r})")
    return GraphInfo(path, meta[META_ENGINE], meta[META_PRECISION], spec)


def _source_digest(checkpoint: Path) -> str:
    """Hash of everything an export depends on: checkpoint files, the exporting code, library versions."""
    import runtime.models.layers
    import runtime.models.mot
    import runtime.models.vae
    import runtime.models.vit
    import runtime.runners.graphs
    import runtime.spec.contract
    import runtime.spec.limits

    digest = hashlib.sha256()
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(checkpoint)).encode() + file_sha256(path).encode())
    for module in (runtime.spec.contract, runtime.spec.limits, runtime.runners.graphs, runtime.models.layers,
                   runtime.models.mot, runtime.models.vae, runtime.models.vit, sys.modules[__name__]):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(f"{torch.__version__} {onnx.__version__} {onnxscript.__version__}".encode())
    return digest.hexdigest()[:16]


_COMPLETE = "complete"
"""Marker file of a finished export in a cache folder."""
_CACHE_KEEP = 4


def export_cached(checkpoint: str | Path, cache_root: str | Path, precisions: Sequence[str] = PRECISIONS,
                  groups: Sequence[Sequence[str]] = (ENGINES,), video: bool = False) -> Path:
    """The engine folder of a checkpoint's export under ``cache_root/<digest>``, exporting only when no complete
    export with the same inputs (checkpoint files, exporting code, library versions) is there.

    Each group of engines is exported by its own ``lance-trt export`` process, all at once: on a machine with as
    many cores as groups the wall time is the slowest group's. Processes sharing ``cache_root`` (parallel test
    sessions) take a file lock per digest: one exports into a private folder and renames it into place, the others
    wait and reuse it.

    Raises:
        ExportError: an export process failed (its stderr tail is in the message).
    """
    checkpoint = Path(checkpoint)
    root = Path(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    digest = _source_digest(checkpoint) + ("-video" if video else "")
    folder = root / digest
    with open(root / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / _COMPLETE).exists():
            logger.info("export cache hit: %s", folder)
            return folder
        partial = root / f"{digest}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        _export_in_processes(checkpoint, partial, precisions, groups, video)
        (partial / _COMPLETE).write_text(str(checkpoint) + "\n")
        shutil.rmtree(folder, ignore_errors=True)      # an incomplete leftover of an interrupted run
        partial.rename(folder)
    _prune(root)
    return folder


def _prune(root: Path) -> None:
    """Keep the `_CACHE_KEEP` most recent exports of a cache folder (one per code revision otherwise piles up)."""
    done = sorted((p for p in root.iterdir() if (p / _COMPLETE).exists()),
                  key=lambda p: (p / _COMPLETE).stat().st_mtime, reverse=True)
    for stale in done[_CACHE_KEEP:]:
        shutil.rmtree(stale, ignore_errors=True)
        (root / f"{stale.name}.lock").unlink(missing_ok=True)


def _export_in_processes(checkpoint: Path, out_dir: Path, precisions: Sequence[str],
                         groups: Sequence[Sequence[str]], video: bool) -> None:
    """Run one ``lance-trt export`` process per group of engines, concurrently, into ``out_dir``."""
    code = "import sys; from export.onnx_export import export_main; sys.exit(export_main(sys.argv[1:]))"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(root), os.environ.get("PYTHONPATH"))))}
    jobs = [subprocess.Popen([sys.executable, "-c", code, "--checkpoint", str(checkpoint), "--out", str(out_dir),
                              "--precision", *precisions, "--engines", ",".join(group),
                              *(["--video"] if video else [])],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for group in groups]
    failures = []
    for group, job in zip(groups, jobs):
        _, err = job.communicate()
        if job.returncode:
            failures.append(f"engines {','.join(group)}: exit {job.returncode}: {err[-2000:]}")
    if failures:
        raise ExportError("export failed:\n" + "\n".join(failures))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lance-trt export", description="export the engines to ONNX")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (HF layout) or HF repo id")
    parser.add_argument("--out", required=True, type=Path, help="engine folder: writes <precision>/<engine>.onnx")
    parser.add_argument("--precision", choices=PRECISIONS, nargs="+", default=list(PRECISIONS),
                        help="graph precisions to export (default: %(default)s)")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"comma-separated subset of {', '.join(ENGINES)}")
    parser.add_argument("--video", action="store_true",
                        help=f"export the video model ({constants.VIDEO_CKPT_DIR}/): every task, the video ones too")
    return parser


def export_main(argv: Sequence[str] | None = None) -> int:
    """``lance-trt export --checkpoint DIR --out ENGINE_DIR [--precision fp32|bf16 ...] [--engines ...]``."""
    args = _parser().parse_args(argv)
    for chatty in ("onnx_ir", "onnxscript"):
        # Their INFO lines name every folded constant and deduplicated initializer; the pass summaries are ours.
        logging.getLogger(chatty).setLevel(logging.WARNING)
    engines = tuple(e for e in args.engines.split(",") if e)
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        print(f"lance-trt export: --engines: unknown {unknown}; choose from {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    precisions = tuple(p for p in PRECISIONS if p in args.precision)
    try:
        reports = export_checkpoint(args.checkpoint, args.out, precisions, engines, video=args.video)
    except ExportError as err:
        print(f"lance-trt export: {err}", file=sys.stderr)
        return 1
    for r in reports:
        print(f"{r.precision}/{r.engine}.onnx: {r.nodes} nodes ({r.exported_nodes} exported), {r.seconds:.1f} s")
    return 0
