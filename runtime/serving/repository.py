"""`lance-trt repo ENGINE_DIR [ENGINE_DIR ...] --checkpoint DIR [--out triton_repo]`: fill a Triton model repository.
`lance-trt repo --engine-set torch --checkpoint DIR --out DIR`: a GPU repository that needs no TensorRT.

The TensorRT engine set: one repository, two config sets (docs/design/serving.md §3):

```
<out>/lance/              config.pbtxt        BLS model, decoupled; mot in-process from the TensorRT plan (GPU)
                          configs/cpu.pbtxt   the same model with mot in ONNX Runtime (CPU)
                          1/model.py, 1/mot.plan + mot.json, 1/mot.onnx
<out>/lance_<engine>/     config.pbtxt        platform "tensorrt_plan" (vit, vae_encode, vae_decode)
                          configs/cpu.pbtxt   Python backend running the fp32 ONNX in ONNX Runtime: same names, shapes
                          1/model.py, 1/<engine>.plan + <engine>.json, 1/<engine>.onnx
```

``tritonserver --model-repository <out>`` serves the GPU set; ``--model-config-name cpu`` (``lance-trt serve --cpu``)
the CPU set.

The torch engine set (``--engine-set torch``) is model ``lance`` alone, on ``KIND_GPU``: every engine runs inside it on
the fast PyTorch CUDA engines (`runtime.runners.factory.cuda_engines`: the fused MoT with CUDA graphs, the compiled
ViT and VAE decoder), built from the checkpoint; nothing imports TensorRT. It has no CPU set and no child models, so
it is written into a folder that holds none.

Every tensor block comes from `runtime.spec.contract`: the engines' from ``contract.triton_io`` (dims from
the specs of the checkpoint's configs), ``lance``'s from ``LANCE_INPUTS``/``LANCE_OUTPUTS``. ``lance``'s parameters
record where its engine files are, relative to the version folder, so the repository can move. The checkpoint's
path is in ``lance/1/checkpoint.path`` (relative when inside the repository, absolute otherwise), not in the config:
the config API would hand it to whoever holds the admin key, a file in the repository to no client at all.

Plans are checked here, before Triton loads them: each ``<engine>.json`` sidecar must name this runtime's contract,
the TensorRT version that will serve it and the compute capability of a GPU the repository targets
(``runtime.runners.trt.check_sidecar``); a mismatch is refused with a message saying to rebuild. Several engine folders,
each built on another GPU architecture, give one plan per compute capability (``cc_model_filenames``; ``lance``
picks its mot plan the same way). Files are hard-linked where the file system allows, copied otherwise.

Config parameters, written here and parsed back here for the models (`LanceSettings`, `EngineSettings`; a relative
path is relative to the model's version folder, a value still reading ``${...}`` counts as unset):

* ``lance``: ``video`` (``true``: the checkpoint's ``Lance_3B_Video`` model, which serves every task;
  ``false``: ``Lance_3B``, the image tasks); ``engine_set`` (``tensorrt``: plans, ``onnxruntime``: the CPU set, both
  with the child models; ``torch``: every engine in-process, see above); ``<engine>_engine`` per in-process engine
  (`IN_PROCESS`: ``mot_engine``, ``vae_decode_chunk_engine``, ...; a plan or ONNX file; ``<engine>_engine_cc<X.Y>`` overrides it on a GPU of compute
  capability X.Y; only ``mot_engine`` is required, a repository without the video VAE's serves no video task);
  ``precision`` (``fp32``/``bf16``);
  ``vit_model``, ``vae_encode_model``, ``vae_decode_model`` (the children); ``child_timeout_s`` (BLS timeout, 0:
  none); ``threads`` (ONNX Runtime intra-op threads, 0: its default); ``warmup`` (``true``/``false``, default true);
  torch set only: ``fp8_gen``, ``fp8_fast_accum`` (``true``/``false``: the FP8 gen expert), ``warmup_sizes``
  (``HxW`` list, space-separated: the image sizes the load-time warm-up requests compile and capture for),
  ``cfg_pair`` (``DEVICE=PARTNER`` list, space-separated, ``cuda:0=cuda:1 cuda:2=cuda:3`` or ``cpu=cpu``: the
  instance on DEVICE runs each request's cfg_text branch on PARTNER, `runtime.serving.cfg_partner`; absent: off);
  ``FORCE_CPU_ONLY_INPUT_TENSORS: no`` in the GPU set (the Python backend's own switch).
* engine stand-ins: ``engine_spec`` (``EngineSpec.to_dict()`` JSON), ``onnx`` (the graph file), ``threads``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from runtime.serving.server import CPU_CONFIG_NAME
from runtime.spec import registry
from runtime.spec.contract import ENGINES, PRECISIONS, DType, EngineSpec, TensorSpec, triton_io
from runtime.spec.endpoints import LANCE_MODEL
from runtime.spec.limits import MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE
from runtime.spec.request import LANCE_INPUTS, LANCE_OUTPUTS

logger = logging.getLogger(__name__)

CHILD_MODELS = {name: engine.triton_model for name, engine in registry.ENGINES.items() if engine.triton_model}
"""The engines served as their own Triton models (the BLS model calls them), by engine name."""
IN_PROCESS = tuple(name for name, engine in registry.ENGINES.items() if engine.triton_model is None)
"""The engines model ``lance`` runs itself: ``mot`` (its KV cache stays resident) and the video VAE's chunk steps
(their causal caches pass from call to call). Their files sit in ``lance/1/``."""
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
"""Each model's ``1/model.py`` (package data, so an installed wheel writes repositories too)."""
MODEL_TEMPLATES = {LANCE_MODEL: "lance_model.py", **{model: "engine_model.py" for model in CHILD_MODELS.values()}}
VERSION = "1"
DEFAULT_MAX_QUEUE_SIZE = 16
DEFAULT_CHILD_TIMEOUT_S = 600.0
GPU_ENGINE_SETS = ("tensorrt", "torch")
"""The GPU config sets `lance-trt repo` writes: TensorRT plans (the production target), or the fast PyTorch CUDA
engines where no plans exist. ONNX Runtime serves the CPU set."""
DEFAULT_WARMUP_SIZES = ((1024, 1024),)
CHECKPOINT_FILE = "checkpoint.path"
"""In ``lance/1/``: the checkpoint's path (one line), where the host side of the pipeline loads from."""
_INSTALLED_SUFFIXES = (".plan", ".onnx", ".onnx.data", ".json", ".path")


class RepoError(ValueError):
    """The engines, the checkpoint or the options cannot make a repository; the message says what to do."""


# --- config.pbtxt text -----------------------------------------------------------------------------------------


def pbtxt_string(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _parameters(values: Mapping[str, str]) -> str:
    return "".join(f"parameters {{ key: {pbtxt_string(k)} value: {{ string_value: {pbtxt_string(v)} }} }}\n"
                   for k, v in values.items())


def _instance_group(kind: str, gpus: Sequence[int], profiles: int = 0) -> str:
    """One instance per listed GPU (``KIND_GPU``) or one CPU instance; ``profiles`` > 1 lists every TensorRT
    optimization profile (Triton uses only the first one otherwise)."""
    if kind == "KIND_CPU":
        return "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    listed = f" profile: [ {', '.join(pbtxt_string(str(i)) for i in range(profiles))} ]" if profiles > 1 else ""
    return f"instance_group [ {{ count: 1 kind: KIND_GPU gpus: [ {', '.join(map(str, gpus))} ]{listed} }} ]\n"


def _request_block(kind: str, specs: Iterable[TensorSpec]) -> str:
    """``input``/``output`` block of model ``lance`` (named dims are -1; optional inputs say so)."""
    entries = []
    for spec in specs:
        dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in spec.shape)
        optional = " optional: true" if spec.optional else ""
        entries.append(f"  {{ name: {pbtxt_string(spec.name)} data_type: {spec.dtype.triton} dims: [ {dims} ]"
                       f"{optional} }}")
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def lance_config(parameters: Mapping[str, str], *, gpus: Sequence[int] | None, max_queue_size: int) -> str:
    """``config.pbtxt`` of the BLS model ``lance``: decoupled, ``max_batch_size: 0``, one instance (per GPU in
    ``gpus``; None: one CPU instance), a bounded queue in front of it.

    The queue bound holds because ``execute`` blocks for the whole request (runtime.serving.server's findings): with the one
    instance busy, up to ``max_queue_size`` requests wait and the next ones are refused ("Exceeds maximum queue size").
    """
    return (
        f"name: {pbtxt_string(LANCE_MODEL)}\n"
        'backend: "python"\n'
        "max_batch_size: 0\n"
        "model_transaction_policy { decoupled: true }\n"
        f"dynamic_batching {{ default_queue_policy {{ max_queue_size: {max_queue_size} }} }}\n"
        + _request_block("input", LANCE_INPUTS) + _request_block("output", LANCE_OUTPUTS)
        + _instance_group("KIND_CPU" if gpus is None else "KIND_GPU", gpus or ())
        + _parameters(parameters)
    )


def _warmup(spec: EngineSpec, precision: str) -> str:
    """``model_warmup``: one zero-filled request per optimization profile, at a shape that no earlier profile admits
    (its optimum, else its maximum), so that each profile's execution context is created before the model reports
    READY. Zeros are valid for every input (indices within bounds, masks open)."""
    samples = []
    for index, profile in enumerate(spec.profiles):
        point = next((p for p in (profile.point(1), profile.point(2))
                      if not any(earlier.contains(p) for earlier in spec.profiles[:index])), None)
        if point is None:
            continue
        inputs = "".join(
            f"    inputs {{ key: {pbtxt_string(t.name)} value: {{ data_type: {t.dtype.concrete(precision).triton} "
            f"dims: [ {', '.join(map(str, spec.shape(t, **point)))} ] zero_data: true }} }}\n"
            for t in spec.inputs if t.dtype is not DType.BYTES)
        samples.append(f"  {{\n    name: {pbtxt_string(profile.name)}\n    batch_size: 1\n{inputs}  }}")
    return "model_warmup [\n" + ",\n".join(samples) + "\n]\n"


def engine_plan_config(model: str, spec: EngineSpec, precision: str, plans: Mapping[str, str],
                       gpus: Sequence[int]) -> str:
    """``config.pbtxt`` of an engine model on TensorRT: ``platform: "tensorrt_plan"``, I/O from the contract.

    Args:
        plans: plan file name per compute capability ("9.0" -> "vit_cc9.0.plan"), the first one the default;
            empty: ``<engine>.plan``, not installed yet.
    """
    default = next(iter(plans.values()), f"{spec.name}.plan")
    text = (f"name: {pbtxt_string(model)}\n"
            'platform: "tensorrt_plan"\n'
            "max_batch_size: 0\n"
            f"default_model_filename: {pbtxt_string(default)}\n")
    if len(plans) > 1:
        text += "".join(f"cc_model_filenames {{ key: {pbtxt_string(cc)} value: {pbtxt_string(name)} }}\n"
                        for cc, name in plans.items())
    return (text + triton_io(spec, precision) + _instance_group("KIND_GPU", gpus, len(spec.profiles))
            + _warmup(spec, precision))


def engine_onnx_config(model: str, spec: EngineSpec, onnx_file: str, threads: int) -> str:
    """``configs/cpu.pbtxt`` of an engine model: the Python-backend stand-in (``runtime.serving.triton_adapter.EngineModel``)
    running the fp32 ONNX, with the plan model's tensor names and shapes at fp32."""
    return (f"name: {pbtxt_string(model)}\n"
            'backend: "python"\n'
            "max_batch_size: 0\n"
            + triton_io(spec, "fp32") + _instance_group("KIND_CPU", ())
            + _parameters({"engine_spec": json.dumps(spec.to_dict(), separators=(",", ":")), "onnx": onnx_file,
                           "threads": str(threads)}))


# --- Plans and their sidecars ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServingTarget:
    """What the plans must have been built for: the serving TensorRT version and the GPUs' compute capabilities
    (None where this machine cannot tell; the check is then left to the runtime, with a warning)."""

    tensorrt: str | None
    gpus: Mapping[int, tuple[str, str]] = field(default_factory=dict)  # device id -> (name, compute capability)

    @classmethod
    def detect(cls, gpu_ids: Sequence[int], tensorrt: str | None = None) -> "ServingTarget":
        """This machine's TensorRT (the ``tensorrt`` package) and the GPUs ``gpu_ids``, where visible."""
        import torch

        from runtime.runners import EngineError
        from runtime.runners.trt import gpu_identity, import_tensorrt

        if tensorrt is None:
            try:
                tensorrt = import_tensorrt().__version__
            except EngineError:
                tensorrt = None
        gpus = {}
        if torch.cuda.is_available():
            gpus = {i: gpu_identity(i) for i in gpu_ids if i < torch.cuda.device_count()}
        return cls(tensorrt, gpus)


def check_plan(plan: Path, spec: EngineSpec, target: ServingTarget) -> str:
    """Refuse a plan that ``target`` cannot run; returns its compute capability.

    Raises:
        RepoError: a missing or unreadable sidecar, another contract, TensorRT version or GPU architecture (the
            message names the plan and says to rebuild).
    """
    from runtime.runners import EngineError
    from runtime.runners.trt import SIDECAR_SUFFIX, Sidecar, check_sidecar

    try:
        sidecar = Sidecar.read(plan.with_suffix(SIDECAR_SUFFIX))
        gpus = [name for name, cc in target.gpus.values() if cc == sidecar.compute_capability]
        if target.gpus and not gpus:
            here = ", ".join(f"GPU {i}: {name} ({cc})" for i, (name, cc) in target.gpus.items())
            raise EngineError(f"engine {spec.name!r}: the plan was built for compute capability "
                              f"{sidecar.compute_capability} ({sidecar.gpu}), the GPUs served here are {here}; "
                              f"rebuild it on one of them: lance-trt build, then lance-trt repo")
        check_sidecar(sidecar, spec, target.tensorrt or sidecar.tensorrt, sidecar.compute_capability,
                      gpus[0] if gpus else "")
    except EngineError as err:
        raise RepoError(f"{plan}: {err}") from None
    return sidecar.compute_capability


# --- Writing the repository --------------------------------------------------------------------------------------


def _install(source: Path, destination: Path) -> None:
    """Hard-link ``source`` to ``destination`` (a copy across file systems), replacing what was there."""
    destination.unlink(missing_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _install_onnx(source: Path, folder: Path) -> str:
    """``<engine>.onnx`` and its ``.onnx.data`` under their own names (the graph records the data file's name)."""
    _install(source, folder / source.name)
    data = source.with_name(source.name + ".data")
    if data.exists():
        _install(data, folder / data.name)
    return source.name


def _relative_to_version(path: Path, version_folder: Path) -> str:
    """``path`` relative to ``version_folder`` when both are in the same repository, else absolute."""
    path, version_folder = path.resolve(), version_folder.resolve()
    repository = version_folder.parent.parent
    if path.is_relative_to(repository):
        return os.path.relpath(path, version_folder)
    return str(path)


@dataclass
class RepoReport:
    """What `write_repository` installed."""

    out: Path
    files: list[Path] = field(default_factory=list)
    plans: dict[str, dict[str, str]] = field(default_factory=dict)  # engine -> {cc: plan file}
    warnings: list[str] = field(default_factory=list)


def checkpoint_specs(checkpoint: Path, video: bool = False) -> dict[str, EngineSpec]:
    """The engine contracts of a checkpoint's configs (of its video model with ``video``). The weights are read and
    dropped one tensor at a time (meta device): this verifies every file and key without holding the model in
    memory."""
    from runtime.models.checkpoint import CheckpointError, load_lance
    from runtime.spec.contract import engine_specs

    try:
        models = load_lance(checkpoint, device="meta", video=video)
    except (CheckpointError, FileNotFoundError) as err:
        raise RepoError(f"--checkpoint: {err}") from None
    return engine_specs(models.llm_config, models.vision_config, models.vae_config)


def _find_plans(engine_dirs: Sequence[Path], precision: str, specs: Mapping[str, EngineSpec],
                target: ServingTarget) -> dict[str, dict[str, Path]]:
    """``{engine: {cc: plan}}`` over every engine folder; every engine needs a plan in each folder that has any."""
    plans: dict[str, dict[str, Path]] = {name: {} for name in ENGINES}
    for folder in engine_dirs:
        found = {name: folder / precision / f"{name}.plan" for name in ENGINES}
        present = {name for name, path in found.items() if path.is_file()}
        if not present:
            continue
        if present != set(ENGINES):
            raise RepoError(f"{folder / precision}: plans for {sorted(present)} but not {sorted(set(ENGINES) - present)}"
                            f"; build them all: lance-trt build {folder} --precision {precision}")
        for name, path in found.items():
            cc = check_plan(path, specs[name], target)
            if cc in plans[name]:
                raise RepoError(f"{path} and {plans[name][cc]} are both for compute capability {cc}: give one "
                                "engine folder per GPU architecture")
            plans[name][cc] = path
    return plans


def _find_onnx(engine_dirs: Sequence[Path]) -> dict[str, Path] | None:
    """The fp32 graphs (CPU serving) from the first engine folder that has all four, or None."""
    for folder in engine_dirs:
        graphs = {name: folder / "fp32" / f"{name}.onnx" for name in ENGINES}
        if all(path.is_file() for path in graphs.values()):
            return graphs
    return None


def _prepare_model(out: Path, model: str) -> Path:
    """``out/model/1`` with ``model.py`` from the template and no previously installed engine files."""
    version = out / model / VERSION
    version.mkdir(parents=True, exist_ok=True)
    source = TEMPLATE_DIR / MODEL_TEMPLATES[model]
    target = version / "model.py"
    if source.resolve() != target.resolve():   # the source triton_repo/ links to the templates
        target.unlink(missing_ok=True)
        shutil.copyfile(source, target)
    for stale in version.iterdir():
        if stale.name.endswith(_INSTALLED_SUFFIXES):
            stale.unlink()
    return version


def _install_plans(plans: Mapping[str, Path], engine: str, version: Path) -> dict[str, str]:
    """Install ``{compute capability: plan}`` with their sidecars into ``version``; returns the installed file name
    per compute capability: ``<engine>.plan`` for one architecture, ``<engine>_cc<X.Y>.plan`` for several."""
    files = {}
    for cc, path in plans.items():
        files[cc] = f"{engine}_cc{cc}.plan" if len(plans) > 1 else f"{engine}.plan"
        _install(path, version / files[cc])
        _install(path.with_suffix(".json"), (version / files[cc]).with_suffix(".json"))
    return files


def write_repository(
    engine_dirs: Sequence[Path],
    checkpoint: Path,
    out: Path,
    *,
    video: bool = False,
    precision: str = "bf16",
    gpus: Sequence[int] | None = (0,),
    engine_set: str = "tensorrt",
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
    threads: int = 0,
    child_timeout_s: float = DEFAULT_CHILD_TIMEOUT_S,
    target: ServingTarget | None = None,
    fp8_gen: bool = False,
    fp8_fast_accum: bool = False,
    warmup_sizes: Sequence[tuple[int, int]] = DEFAULT_WARMUP_SIZES,
    cfg_pair: bool = False,
) -> RepoReport:
    """Write a repository of ``engine_set`` into ``out`` (see the module docstring).

    Args:
        engine_dirs: tensorrt set: folders written by ``lance-trt export`` (fp32 ONNX: CPU serving) and
            ``lance-trt build`` (``<precision>/<engine>.plan`` + ``.json``: GPU serving); one per GPU architecture.
            torch set: none.
        checkpoint: the checkpoint the engines were exported from (host side of the pipeline); the torch set builds
            every engine from it.
        out: the repository (created if needed; may be the source ``triton_repo/`` itself for the tensorrt set).
        video: the checkpoint's video model (``lance-trt export --video`` engines in the tensorrt set); model
            ``lance`` then loads ``Lance_3B_Video`` and serves the video tasks as well.
        precision: the plans' precision, or the torch set's compute precision (``bf16`` or ``fp32``).
        gpus: device ids served on GPU (one instance of each model per GPU). None: torch set only, one CPU instance
            running the plain PyTorch modules in fp32 (tests and smoke runs of the same serving code).
        engine_set: `GPU_ENGINE_SETS`: ``tensorrt`` (plans, with the CPU set) or ``torch`` (no TensorRT).
        max_queue_size: requests that may wait for ``lance``; more are refused.
        threads: ONNX Runtime intra-op threads in the CPU set (0: its default, one per core).
        child_timeout_s: BLS timeout of ``lance``'s calls to its children (0: none).
        target: what plans must match (default: `ServingTarget.detect` on ``gpus``).
        fp8_gen, fp8_fast_accum: torch set: the FP8 gen expert (`runtime.runners.factory.engines_for`).
        warmup_sizes: torch set: (height, width) of the warm-up requests at load.
        cfg_pair: torch set: CFG across two devices per request; ``gpus`` pair up in order (an instance on the first
            of each pair, its partner the second), or with ``gpus`` None two CPU processes.
    Raises:
        RepoError: no usable engines, a plan refused by its sidecar, a bad checkpoint or option.
    """
    if precision not in PRECISIONS:
        raise RepoError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if engine_set not in GPU_ENGINE_SETS:
        raise RepoError(f"--engine-set must be one of {', '.join(GPU_ENGINE_SETS)}, got {engine_set!r}")
    if max_queue_size < 1:
        raise RepoError(f"--max-queue-size must be >= 1, got {max_queue_size}")
    if gpus is None and (engine_set != "torch" or precision != "fp32"):
        raise RepoError("a CPU instance (gpus None) serves the torch set in fp32 only")
    if gpus is not None and (not gpus or min(gpus) < 0):
        raise RepoError(f"--gpus must list device ids >= 0, got {list(gpus)}")
    if engine_set == "torch":
        return _write_torch_set(engine_dirs, checkpoint, out, video=video, precision=precision, gpus=gpus,
                                max_queue_size=max_queue_size, fp8_gen=fp8_gen, fp8_fast_accum=fp8_fast_accum,
                                warmup_sizes=warmup_sizes, cfg_pair=cfg_pair)
    if cfg_pair:
        raise RepoError("--cfg-pair is an option of the torch engine set (--engine-set torch)")
    if fp8_gen or fp8_fast_accum:
        raise RepoError("--fp8-gen selects the torch engine set's FP8 gen expert; TensorRT plans carry their own "
                        "precision (lance-trt build)")
    for folder in engine_dirs:
        if not folder.is_dir():
            raise RepoError(f"{folder} is not a folder (an ENGINE_DIR written by lance-trt export / build)")
    specs = checkpoint_specs(checkpoint, video)
    plans = _find_plans(engine_dirs, precision, specs, target or ServingTarget.detect(gpus))
    graphs = _find_onnx(engine_dirs)
    if graphs is None and not plans["mot"]:
        raise RepoError(f"no engines in {', '.join(map(str, engine_dirs)) or 'no ENGINE_DIR'}: expected "
                        f"fp32/<engine>.onnx (lance-trt export) or {precision}/<engine>.plan (lance-trt build); "
                        "without TensorRT, --engine-set torch serves the checkpoint on a GPU")
    report = RepoReport(out)
    if not plans["mot"]:
        report.warnings.append(f"no {precision} plans: config.pbtxt (GPU) names plans that are not installed; "
                               "serve with --cpu, or run lance-trt build and then lance-trt repo again")
    if graphs is None:
        report.warnings.append("no fp32 ONNX graphs: configs/cpu.pbtxt names graphs that are not installed; "
                               "run lance-trt export --precision fp32 and then lance-trt repo again")
    out.mkdir(parents=True, exist_ok=True)

    for engine, model in CHILD_MODELS.items():
        version = _prepare_model(out, model)
        (out / model / "configs").mkdir(exist_ok=True)
        report.plans[engine] = _install_plans(plans[engine], engine, version)
        onnx_file = _install_onnx(graphs[engine], version) if graphs else f"{engine}.onnx"
        (out / model / "config.pbtxt").write_text(
            engine_plan_config(model, specs[engine], precision, report.plans[engine], gpus))
        (out / model / "configs" / f"{CPU_CONFIG_NAME}.pbtxt").write_text(
            engine_onnx_config(model, specs[engine], onnx_file, threads))

    version = _prepare_lance(out, checkpoint)
    (out / LANCE_MODEL / "configs").mkdir(exist_ok=True)
    common = {"video": str(video).lower(),
              "child_timeout_s": f"{child_timeout_s:g}",
              **{f"{engine}_model": model for engine, model in CHILD_MODELS.items()}}
    gpu_params = {**common, "engine_set": "tensorrt", "precision": precision, "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
    cpu_params = {**common, "engine_set": "onnxruntime", "precision": "fp32", "threads": str(threads)}
    for engine in IN_PROCESS:
        report.plans[engine] = _install_plans(plans[engine], engine, version)
        gpu_params[f"{engine}_engine"] = next(iter(report.plans[engine].values()), f"{engine}.plan")
        if len(report.plans[engine]) > 1:
            gpu_params |= {f"{engine}_engine_cc{cc}": name for cc, name in report.plans[engine].items()}
        cpu_params[f"{engine}_engine"] = _install_onnx(graphs[engine], version) if graphs else f"{engine}.onnx"
    (out / LANCE_MODEL / "config.pbtxt").write_text(
        lance_config(gpu_params, gpus=gpus, max_queue_size=max_queue_size))
    (out / LANCE_MODEL / "configs" / f"{CPU_CONFIG_NAME}.pbtxt").write_text(
        lance_config(cpu_params, gpus=None, max_queue_size=max_queue_size))
    return _listed(report)


def _prepare_lance(out: Path, checkpoint: Path) -> Path:
    """``out/lance/1`` with its ``model.py`` and ``checkpoint.path``."""
    version = _prepare_model(out, LANCE_MODEL)
    (version / CHECKPOINT_FILE).write_text(_relative_to_version(checkpoint, version) + "\n", encoding="utf-8")
    return version


def _listed(report: RepoReport) -> RepoReport:
    report.files = sorted(p for p in report.out.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return report


def cfg_partners(gpus: Sequence[int] | None) -> dict[str, str]:
    """The CFG pairs of ``--gpus`` in order (``0,1,2,3``: cuda:0 with cuda:1, cuda:2 with cuda:3); None: two CPU
    processes (``cpu=cpu``).

    Raises:
        RepoError: an odd number of GPUs or one listed twice.
    """
    if gpus is None:
        return {"cpu": "cpu"}
    if len(gpus) % 2 or len(set(gpus)) != len(gpus):
        raise RepoError(f"--cfg-pair pairs up --gpus in order: list an even number of distinct GPUs, got {list(gpus)}")
    return {f"cuda:{own}": f"cuda:{partner}" for own, partner in zip(gpus[0::2], gpus[1::2])}


def format_sizes(sizes: Sequence[tuple[int, int]]) -> str:
    return " ".join(f"{height}x{width}" for height, width in sizes)


def _write_torch_set(engine_dirs: Sequence[Path], checkpoint: Path, out: Path, *, video: bool, precision: str,
                     gpus: Sequence[int] | None, max_queue_size: int, fp8_gen: bool, fp8_fast_accum: bool,
                     warmup_sizes: Sequence[tuple[int, int]], cfg_pair: bool) -> RepoReport:
    """Model ``lance`` alone, on ``KIND_GPU``, every engine in-process on the fast PyTorch CUDA engines (on
    ``KIND_CPU`` the plain modules, where ``gpus`` is None); with ``cfg_pair`` an instance on every other GPU."""
    if engine_dirs:
        raise RepoError(f"--engine-set torch builds every engine from the checkpoint on the GPU: give no ENGINE_DIR "
                        f"(got {', '.join(map(str, engine_dirs))})")
    if fp8_fast_accum and not fp8_gen:
        raise RepoError("--fp8-fast-accum needs --fp8-gen")
    partners = cfg_partners(gpus) if cfg_pair else {}
    others = sorted(model for model in CHILD_MODELS.values() if (out / model).exists())
    if others:
        raise RepoError(f"{out} holds the models {', '.join(others)} of a TensorRT or CPU repository, which "
                        "tritonserver would load beside the torch set: write it into a folder of its own (--out)")
    checkpoint_specs(checkpoint, video)          # every file and key of the checkpoint, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    _prepare_lance(out, checkpoint)
    # a CPU set left by an earlier repository here would serve this lance on the CPU without its children
    (out / LANCE_MODEL / "configs" / f"{CPU_CONFIG_NAME}.pbtxt").unlink(missing_ok=True)
    params = {"video": str(video).lower(), "engine_set": "torch", "precision": precision,
              "fp8_gen": str(fp8_gen).lower(), "fp8_fast_accum": str(fp8_fast_accum).lower(),
              "warmup_sizes": format_sizes(warmup_sizes)}
    if partners:
        params["cfg_pair"] = " ".join(f"{own}={partner}" for own, partner in partners.items())
    if gpus is not None:
        params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
        gpus = gpus[0::2] if cfg_pair else gpus        # an instance on each pair's first GPU
    (out / LANCE_MODEL / "config.pbtxt").write_text(lance_config(params, gpus=gpus, max_queue_size=max_queue_size))
    return _listed(RepoReport(out))


# --- Reading the parameters back (inside the models) ----------------------------------------------------------


class ConfigError(ValueError):
    """A model config that a model cannot run with; the message names the model and the field. Raised from a
    model's ``initialize``, it fails the load."""


def resolve_path(folder: Path, text: str) -> Path:
    """A path parameter: absolute as written, or relative to the model's version folder."""
    path = Path(text)
    return path if path.is_absolute() else folder / path


def config_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """``parameters`` of a model config as plain strings; a template placeholder (``${...}``) counts as unset."""
    values = {}
    for key, value in config.get("parameters", {}).items():
        text = value.get("string_value", "") if isinstance(value, Mapping) else str(value)
        if text and not (text.startswith("${") and text.endswith("}")):
            values[key] = text
    return values


def parse_bool(model: str, key: str, text: str) -> bool:
    """``"true"`` or ``"false"`` (any case); anything else is a `ConfigError` (``bool("false")`` is True)."""
    lowered = text.strip().lower()
    if lowered not in ("true", "false"):
        raise ConfigError(f"model {model!r}: parameter {key!r} must be true or false, got {text!r}")
    return lowered == "true"


def parse_number(model: str, key: str, text: str, kind: Callable[[str], float | int], low: float) -> Any:
    """An ``int`` or ``float`` parameter of at least ``low``; anything else is a `ConfigError`."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value < low:
        noun = "an integer" if kind is int else "a number"
        raise ConfigError(f"model {model!r}: parameter {key!r} must be {noun} >= {low:g}, got {text!r}")
    return value


def parse_choice(model: str, key: str, text: str, choices: Sequence[str]) -> str:
    if text not in choices:
        raise ConfigError(f"model {model!r}: parameter {key!r} must be one of {', '.join(choices)}, got {text!r}")
    return text


def check_io(model: str, config: Mapping[str, Any], inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
             precision: str) -> None:
    """Refuse a config whose inputs or outputs differ from the contract in names or data types.

    Raises:
        ConfigError: naming the model and every difference.
    """
    problems = []
    for kind, specs in (("input", inputs), ("output", outputs)):
        found = {entry["name"]: entry.get("data_type") for entry in config.get(kind, [])}
        expected = {spec.name: spec.dtype.concrete(precision).triton for spec in specs}
        if set(found) != set(expected):
            problems.append(f"{kind}s are {sorted(found)}, the contract has {sorted(expected)}")
            continue
        problems += [f"{kind} {name!r} is {found[name]}, the contract says {dtype}"
                     for name, dtype in expected.items() if found[name] != dtype]
    if problems:
        raise ConfigError(f"model {model!r}: config does not match runtime.spec.contract: " + "; ".join(problems))


def check_lance_config(model: str, config: Mapping[str, Any]) -> None:
    """What ``lance`` relies on in its config: decoupled, ``max_batch_size: 0``, the contract's I/O.

    Raises:
        ConfigError: naming the model and the field.
    """
    if not config.get("model_transaction_policy", {}).get("decoupled", False):
        raise ConfigError(f"model {model!r}: needs model_transaction_policy {{ decoupled: true }} (it streams "
                          "progress responses)")
    if config.get("max_batch_size", 0) != 0:
        raise ConfigError(f"model {model!r}: needs max_batch_size: 0, got {config['max_batch_size']}")
    check_io(model, config, LANCE_INPUTS, LANCE_OUTPUTS, "fp32")


def parse_sizes(model: str, key: str, text: str) -> tuple[tuple[int, int], ...]:
    """``"1024x1024 768x768"`` -> ((1024, 1024), (768, 768)); each side within the request limits."""
    sizes = []
    for item in text.split():
        height, _, width = item.partition("x")
        if not (height.isdigit() and width.isdigit()) or not all(
                MIN_SIZE <= int(side) <= MAX_SIZE and int(side) % SIZE_MULTIPLE == 0 for side in (height, width)):
            raise ConfigError(f"model {model!r}: parameter {key!r} must list sizes HxW (sides multiples of "
                              f"{SIZE_MULTIPLE} in [{MIN_SIZE}, {MAX_SIZE}]), got {text!r}")
        sizes.append((int(height), int(width)))
    return tuple(sizes)


def parse_pairs(model: str, key: str, text: str) -> dict[str, str]:
    """``DEVICE=PARTNER`` pairs, space-separated, of ``cpu`` or ``cuda:N`` devices, each device in one pair and a pair
    on one kind of device."""
    pairs, seen = {}, []
    for item in text.split():
        own, _, partner = item.partition("=")
        devices = (own, partner)
        kinds = {device.partition(":")[0] for device in devices}
        valid = all(device == "cpu" or (device.startswith("cuda:") and device[5:].isdigit()) for device in devices)
        if not valid or len(kinds) != 1 or (kinds == {"cuda"} and own == partner) or own in pairs or (
                kinds == {"cuda"} and set(devices) & set(seen)):
            raise ConfigError(f"model {model!r}: parameter {key!r} must list DEVICE=PARTNER pairs (cuda:0=cuda:1, "
                              f"each GPU in one pair, or cpu=cpu), got {text!r}")
        pairs[own] = partner
        seen += devices
    return pairs


@dataclass(frozen=True)
class LanceSettings:
    """The parameters of model ``lance`` as `lance_config` writes them (runtime.serving.triton_adapter reads them)."""

    checkpoint: Path
    video: bool
    engine_set: str
    """`registry.RUNNERS`: ``tensorrt`` and ``onnxruntime`` run the in-process engines from their files and call the
    children; ``torch`` runs every engine in-process on the fast CUDA engines."""
    engines: Mapping[str, Path]
    """The files of the in-process engines (`IN_PROCESS`) that the repository holds; none in the torch set."""
    precision: str
    children: Mapping[str, str]
    """Triton model per engine served on its own; none in the torch set."""
    child_timeout_s: float
    threads: int | None
    warmup: bool
    warmup_sizes: tuple[tuple[int, int], ...] = DEFAULT_WARMUP_SIZES
    fp8_gen: bool = False
    fp8_fast_accum: bool = False
    cfg_pair: Mapping[str, str] = field(default_factory=dict)
    """Instance device -> the device of its CFG partner (``cuda:0`` -> ``cuda:1``); empty: no CFG pairs."""

    def cfg_partner(self, model: str, device: str) -> str | None:
        """The partner device of the instance on ``device``, or None without CFG pairs.

        Raises:
            ConfigError: CFG pairs are configured, but none for ``device``.
        """
        if not self.cfg_pair:
            return None
        if device not in self.cfg_pair:
            raise ConfigError(f"model {model!r}: parameter 'cfg_pair' names no partner for the instance on {device} "
                              f"(pairs: {', '.join(f'{a}={b}' for a, b in self.cfg_pair.items())})")
        return self.cfg_pair[device]

    @classmethod
    def parse(cls, model: str, params: Mapping[str, str], folder: Path,
              compute_capability: str | None = None) -> "LanceSettings":
        """Read ``lance``'s parameters; ``compute_capability`` ("9.0") of the instance's GPU picks its plans.

        Raises:
            ConfigError: a missing or malformed parameter.
        """
        try:
            checkpoint = (folder / CHECKPOINT_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            checkpoint = ""
        if not checkpoint:
            raise ConfigError(f"model {model!r}: {folder / CHECKPOINT_FILE} names no checkpoint (run lance-trt repo)")
        engine_set = parse_choice(model, "engine_set", params.get("engine_set", "onnxruntime"), registry.RUNNERS)
        in_process = engine_set == "torch"
        engines = {}
        for name in IN_PROCESS if not in_process else ():
            key = f"{name}_engine"
            if f"{key}_cc{compute_capability}" in params:
                key = f"{key}_cc{compute_capability}"
            if key in params:
                engines[name] = resolve_path(folder, params[key])
            elif name == "mot":
                raise ConfigError(f"model {model!r}: parameter {key!r} is not set (the {engine_set} mot engine)")
        threads = parse_number(model, "threads", params.get("threads", "0"), int, 0)
        fp8_gen = parse_bool(model, "fp8_gen", params.get("fp8_gen", "false"))
        fp8_fast_accum = parse_bool(model, "fp8_fast_accum", params.get("fp8_fast_accum", "false"))
        if (fp8_gen or fp8_fast_accum) and not in_process:
            raise ConfigError(f"model {model!r}: parameters 'fp8_gen' and 'fp8_fast_accum' belong to engine_set "
                              f"torch; the {engine_set} engines carry their own precision")
        if fp8_fast_accum and not fp8_gen:
            raise ConfigError(f"model {model!r}: parameter 'fp8_fast_accum' needs 'fp8_gen'")
        cfg_pair = parse_pairs(model, "cfg_pair", params.get("cfg_pair", ""))
        if cfg_pair and not in_process:
            raise ConfigError(f"model {model!r}: parameter 'cfg_pair' belongs to engine_set torch")
        return cls(
            checkpoint=resolve_path(folder, checkpoint),
            video=parse_bool(model, "video", params.get("video", "false")),
            engine_set=engine_set,
            engines=engines,
            precision=parse_choice(model, "precision", params.get("precision", "fp32"), PRECISIONS),
            children={} if in_process else {name: params.get(f"{name}_model", default)
                                            for name, default in CHILD_MODELS.items()},
            child_timeout_s=parse_number(model, "child_timeout_s",
                                         params.get("child_timeout_s", str(DEFAULT_CHILD_TIMEOUT_S)), float, 0.0),
            threads=threads or None,
            warmup=parse_bool(model, "warmup", params.get("warmup", "true")),
            warmup_sizes=parse_sizes(model, "warmup_sizes",
                                     params.get("warmup_sizes", format_sizes(DEFAULT_WARMUP_SIZES))),
            fp8_gen=fp8_gen,
            fp8_fast_accum=fp8_fast_accum,
            cfg_pair=cfg_pair,
        )


@dataclass(frozen=True)
class EngineSettings:
    """The parameters of an engine stand-in (``configs/cpu.pbtxt`` of ``lance_vit`` ...), as `engine_onnx_config`
    writes them."""

    spec: EngineSpec
    onnx: Path
    threads: int | None

    @classmethod
    def parse(cls, model: str, params: Mapping[str, str], folder: Path) -> "EngineSettings":
        """Raises `ConfigError` for a missing or malformed parameter."""
        for key in ("engine_spec", "onnx"):
            if key not in params:
                raise ConfigError(f"model {model!r}: parameter {key!r} is not set (run lance-trt repo)")
        try:
            spec = EngineSpec.from_dict(json.loads(params["engine_spec"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"model {model!r}: parameter 'engine_spec' is not an engine contract: {err}") from None
        threads = parse_number(model, "threads", params.get("threads", "0"), int, 0)
        return cls(spec=spec, onnx=resolve_path(folder, params["onnx"]), threads=threads or None)


# --- `lance-trt repo` ------------------------------------------------------------------------------------------


def _gpu_list(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"comma-separated GPU ids such as 0 or 0,1; got {text!r}")
    return ids


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_sizes("lance", "warmup_sizes", text)[0]
    except (ConfigError, IndexError):
        raise argparse.ArgumentTypeError(f"HxW with sides multiples of {SIZE_MULTIPLE} in [{MIN_SIZE}, {MAX_SIZE}], "
                                         f"such as 1024x1024; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lance-trt repo",
        description="Install exported graphs (and built plans) into a Triton model repository and write its GPU "
                    "(config.pbtxt) and CPU (configs/cpu.pbtxt) configs; or, with --engine-set torch, a GPU "
                    "repository that runs the checkpoint on the fast PyTorch CUDA engines (no TensorRT).")
    add = parser.add_argument
    add("engine_dirs", nargs="*", type=Path, metavar="ENGINE_DIR",
        help="engine folder from lance-trt export/build; several: one per GPU architecture (none with "
             "--engine-set torch)")
    add("--checkpoint", required=True, type=Path, help="the checkpoint the engines were exported from")
    add("--video", action="store_true",
        help="the engines are the video model's (lance-trt export --video): lance then serves every task, video too")
    add("--out", type=Path, default=Path("triton_repo"), help="model repository (default: %(default)s)")
    add("--precision", choices=PRECISIONS, default="bf16",
        help="plans to install, or the torch set's compute precision (default: %(default)s)")
    add("--gpus", type=_gpu_list, default=[0], help="GPU ids served, one instance each (default: 0)")
    add("--engine-set", choices=GPU_ENGINE_SETS, default="tensorrt",
        help="the GPU set: TensorRT plans, or the fast PyTorch CUDA engines from the checkpoint (default: "
             "%(default)s)")
    add("--fp8-gen", action="store_true", help="torch set: FP8 GEMMs for the gen expert")
    add("--fp8-fast-accum", action="store_true", help="torch set, with --fp8-gen: Hopper's fast FP8 accumulation")
    add("--cfg-pair", action="store_true",
        help="torch set: each request's two CFG branches on two GPUs, --gpus paired up in order (0,1: an instance on "
             "GPU 0, its partner on GPU 1)")
    add("--warmup-sizes", nargs="+", type=_size, default=list(DEFAULT_WARMUP_SIZES), metavar="HxW",
        help="torch set: image sizes the load-time warm-up compiles and captures for (default: 1024x1024)")
    add("--max-queue-size", type=int, default=DEFAULT_MAX_QUEUE_SIZE,
        help="requests that may wait for lance; more are refused (default: %(default)s)")
    add("--threads", type=int, default=0, help="ONNX Runtime threads in the CPU set (default: 0 = one per core)")
    add("--child-timeout-s", type=float, default=DEFAULT_CHILD_TIMEOUT_S,
        help="timeout of lance's calls to vit/vae models (default: %(default)s; 0: none)")
    add("--tensorrt-version", help="the TensorRT version that will serve the plans (default: this machine's)")
    return parser


def repo_main(argv: Sequence[str] | None = None) -> int:
    """`lance-trt repo`: 0 on success, 2 when the engines, checkpoint or options cannot make a repository."""
    args = build_parser().parse_args(argv)
    try:
        # the torch set has no plans to check, and its path never imports TensorRT
        target = ServingTarget.detect(args.gpus, args.tensorrt_version) if args.engine_set == "tensorrt" else None
        report = write_repository(
            args.engine_dirs, args.checkpoint, args.out, video=args.video, precision=args.precision, gpus=args.gpus,
            engine_set=args.engine_set, max_queue_size=args.max_queue_size, threads=args.threads,
            child_timeout_s=args.child_timeout_s, target=target, fp8_gen=args.fp8_gen,
            fp8_fast_accum=args.fp8_fast_accum, warmup_sizes=args.warmup_sizes, cfg_pair=args.cfg_pair)
    except RepoError as err:
        print(f"lance-trt repo: {err}", file=sys.stderr)
        return 2
    if target and report.plans.get("mot") and (target.tensorrt is None or not target.gpus):
        report.warnings.append("this machine shows no TensorRT or no GPU: the plans' TensorRT version and GPU were "
                               "not checked here (the lance model and Triton check them at load)")
    for warning in report.warnings:
        print(f"lance-trt repo: warning: {warning}", file=sys.stderr)
    cpu = f" or `lance-trt serve --cpu --repo {report.out}`" if args.engine_set == "tensorrt" else ""
    print(f"{report.out}: {len(report.files)} files; serve with `lance-trt serve --repo {report.out}` (GPU){cpu}")
    return 0
