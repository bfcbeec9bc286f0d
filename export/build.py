"""`lance-trt build ENGINE_DIR`: ``<precision>/<engine>.onnx`` -> ``<engine>.plan`` + ``<engine>.json``.

TensorRT's Python API, written against 10.x and 11.x: a strongly typed network (precision lives in the graph; TensorRT
11 knows no other mode), ``OnnxParser.parse_from_file`` (so external weights load beside the graph), one optimization
profile per contract profile, builder optimization level, optional timing cache, ``build_serialized_network``. Each
plan gets a sidecar (``runtime.runners.trt.Sidecar``: TensorRT version, GPU and compute capability, precision,
profile shapes, flags, ONNX and contract hashes) that ``TrtRunner`` checks before it loads the plan.

The contract comes from the graph itself (``export.onnx_export.read_graph``), so a build needs no checkpoint.
``import tensorrt`` happens only when a plan is built: ``--dry-run`` prints the exact profiles and flags without it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from export.onnx_export import ExportError, file_sha256, read_graph
from runtime.spec.contract import ENGINES, PRECISIONS, EngineSpec
from runtime.runners import EngineError
from runtime.runners.trt import SIDECAR_SUFFIX, Sidecar, gpu_identity, import_tensorrt

logger = logging.getLogger(__name__)

NETWORK_FLAGS = ("STRONGLY_TYPED",)
"""Network creation flags: precision comes from the graph's own types and casts."""
DEFAULT_OPT_LEVEL = 3


class BuildError(RuntimeError):
    """A plan could not be built: names the engine and the cause (parser errors included)."""


Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class BuildPlan:
    """Everything one build does, decided before TensorRT is imported.

    Attributes:
        onnx: the graph; ``plan`` and ``sidecar`` are written beside it.
        spec, precision: the contract and precision the graph records.
        profiles: per contract profile, (min, opt, max) shapes of every input with a dynamic axis.
        builder_flags: ``BuilderFlag`` names to set (``+``) or clear (``-``).
        opt_level: ``builder_optimization_level``.
        timing_cache: file to read and update, or None.
        workspace: workspace pool limit in bytes, or None (TensorRT's default: the device memory).
    """

    onnx: Path
    spec: EngineSpec
    precision: str
    profiles: tuple[tuple[str, dict[str, Shapes]], ...]
    builder_flags: tuple[str, ...]
    opt_level: int
    timing_cache: Path | None
    workspace: int | None

    @property
    def plan(self) -> Path:
        return self.onnx.with_suffix(".plan")

    @property
    def sidecar(self) -> Path:
        return self.onnx.with_suffix(SIDECAR_SUFFIX)

    @property
    def flags(self) -> list[str]:
        return [f"network:{f}" for f in NETWORK_FLAGS] + [f"builder:{f}" for f in self.builder_flags] + [
            f"builder_optimization_level={self.opt_level}"]

    def render(self) -> str:
        lines = [f"{self.spec.name} ({self.precision}): {self.onnx} -> {self.plan}",
                 f"  flags: {' '.join(self.flags)}",
                 f"  timing cache: {self.timing_cache or 'none'}; workspace: "
                 f"{'default' if self.workspace is None else f'{self.workspace} bytes'}"]
        for name, shapes in self.profiles:
            lines.append(f"  profile {name}:")
            lines += [f"    {tensor}: min {list(lo)} opt {list(opt)} max {list(hi)}"
                      for tensor, (lo, opt, hi) in shapes.items()]
        return "\n".join(lines)


def _dynamic_inputs(spec: EngineSpec) -> list[str]:
    """Inputs with an axis that is not fixed: the ones an optimization profile must give shapes for."""
    return [t.name for t in spec.inputs
            if any(not isinstance(d, int) and not (isinstance(d, str) and d in spec.sizes) for d in t.shape)]


def plan_build(onnx_path: Path, *, opt_level: int = DEFAULT_OPT_LEVEL, timing_cache: Path | None = None,
               workspace: int | None = None) -> BuildPlan:
    """The build of one exported graph: its contract's profiles and the flags for its precision.

    fp32 graphs clear TF32 (they are the parity reference on a GPU); bf16 graphs leave TensorRT's defaults.

    Raises:
        BuildError: the graph carries no contract metadata.
    """
    try:
        info = read_graph(onnx_path)
    except ExportError as err:
        raise BuildError(str(err)) from None
    dynamic = _dynamic_inputs(info.spec)
    profiles = tuple((p.name, {name: shapes for name, shapes in info.spec.profile_shapes(p.name).items()
                               if name in dynamic}) for p in info.spec.profiles)
    flags = ("-TF32",) if info.precision == "fp32" else ()
    return BuildPlan(Path(onnx_path), info.spec, info.precision, profiles, flags, opt_level, timing_cache, workspace)


def build_engine(plan: BuildPlan) -> Sidecar:
    """Build ``plan.plan`` and write its sidecar (TensorRT and a CUDA device required).

    Raises:
        BuildError: TensorRT missing, parser errors (all listed), shape-tensor inputs, or a failed build.
    """
    label = f"{plan.spec.name} ({plan.precision})"
    try:
        trt = import_tensorrt()
        gpu, capability = gpu_identity()
    except EngineError as err:
        raise BuildError(str(err)) from None
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 0
    for name in NETWORK_FLAGS:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(plan.onnx)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{label}: the ONNX parser rejects {plan.onnx}:\n  {errors}")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    shape_inputs = [tensor.name for tensor in inputs if tensor.is_shape_tensor]
    if shape_inputs:
        raise BuildError(f"{label}: inputs {shape_inputs} are shape tensors; the contract gives no values for them")

    config = builder.create_builder_config()
    config.builder_optimization_level = plan.opt_level
    for flag in plan.builder_flags:
        member = getattr(trt.BuilderFlag, flag[1:], None)
        if member is None:
            logger.info("%s: TensorRT %s has no BuilderFlag.%s; skipped", label, trt.__version__, flag[1:])
        elif flag[0] == "+":
            config.set_flag(member)
        else:
            config.clear_flag(member)
    if plan.workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace)
    for name, shapes in plan.profiles:
        profile = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in shapes.items():
            profile.set_shape(tensor, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise BuildError(f"{label}: TensorRT rejects profile {name!r}: {shapes}")
    cache = None
    if plan.timing_cache is not None:
        data = plan.timing_cache.read_bytes() if plan.timing_cache.exists() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"{label}: TensorRT failed to build {plan.onnx} (see the log above)")
    plan.plan.write_bytes(memoryview(serialized))
    if cache is not None:
        plan.timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    sidecar = Sidecar(
        engine=plan.spec.name, precision=plan.precision, tensorrt=trt.__version__, gpu=gpu,
        compute_capability=capability, contract_sha256=plan.spec.digest(), onnx=plan.onnx.name,
        onnx_sha256=file_sha256(plan.onnx),
        profiles={name: {t: [list(s) for s in shapes[t]] for t in shapes} for name, shapes in plan.profiles},
        flags=plan.flags,
    )
    sidecar.write(plan.sidecar)
    logger.info("%s: built %s in %.0f s", label, plan.plan, time.perf_counter() - start)
    return sidecar


def exported_precisions(engine_dir: Path) -> list[str]:
    """The precisions whose folder in ``engine_dir`` holds at least one exported graph, in `PRECISIONS` order."""
    return [p for p in PRECISIONS if any((engine_dir / p).glob("*.onnx"))]


def _build_folder(folder: Path, precision: str, engines: Sequence[str], args: argparse.Namespace,
                  workspace: int | None) -> None:
    """Plan (and unless ``--dry-run``, build) every engine of one precision folder."""
    plans = [plan_build(folder / f"{e}.onnx", opt_level=args.opt_level, timing_cache=args.timing_cache,
                        workspace=workspace) for e in engines]
    wrong = [str(p.onnx) for p in plans if p.precision != precision]
    if wrong:
        raise BuildError(f"{', '.join(wrong)}: not {precision} graphs (their metadata says otherwise)")
    for plan in plans:
        print(plan.render())
        if not args.dry_run:
            build_engine(plan)
            print(f"wrote {plan.plan} and {plan.sidecar}")


def build_main(argv: Sequence[str] | None = None) -> int:
    """``lance-trt build ENGINE_DIR [--precision fp32|bf16 ...] [--dry-run] [--timing-cache F] [--engines ...]``:
    plans for every precision folder that ``export`` (or ``demo``) wrote, unless ``--precision`` names some."""
    parser = argparse.ArgumentParser(prog="lance-trt build", description="build TensorRT plans from exported graphs")
    parser.add_argument("engine_dir", type=Path, help="engine folder written by lance-trt export")
    parser.add_argument("--precision", choices=PRECISIONS, nargs="+",
                        help="precisions to build (default: every <precision>/ folder of ENGINE_DIR holding graphs)")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {', '.join(ENGINES)}")
    parser.add_argument("--dry-run", action="store_true", help="print the profiles and flags; TensorRT not needed")
    parser.add_argument("--timing-cache", type=Path, help="timing cache file to read and update (dev builds only: "
                        "NVIDIA advises building deployment plans without one)")
    parser.add_argument("--opt-level", type=int, default=DEFAULT_OPT_LEVEL, choices=range(6),
                        help="builder optimization level")
    parser.add_argument("--workspace-gib", type=float, help="workspace memory pool limit")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        print(f"lance-trt build: --engines: unknown {unknown}; choose from {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    precisions = args.precision or exported_precisions(args.engine_dir)
    if not precisions:
        print(f"lance-trt build: {args.engine_dir} holds no exported graphs (<precision>/<engine>.onnx); run "
              f"lance-trt export --checkpoint DIR --out {args.engine_dir} first", file=sys.stderr)
        return 2
    for precision in precisions:
        folder = args.engine_dir / precision
        missing = [str(folder / f"{e}.onnx") for e in engines if not (folder / f"{e}.onnx").is_file()]
        if missing:
            print(f"lance-trt build: missing {', '.join(missing)}; run lance-trt export --precision {precision} "
                  f"--out {args.engine_dir} first", file=sys.stderr)
            return 2
    workspace = None if args.workspace_gib is None else int(args.workspace_gib * 2**30)
    try:
        if not args.dry_run:
            import_tensorrt()       # say why in one line before doing anything else
        for precision in precisions:
            _build_folder(args.engine_dir / precision, precision, engines, args, workspace)
    except (BuildError, EngineError) as err:
        print(f"lance-trt build: {err}", file=sys.stderr)
        return 1
    return 0
