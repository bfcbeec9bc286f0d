"""The task and engine registry: every task and every engine of Lance declared once.

Everything else derives from these two tables: the request interface of model ``lance`` (its inputs and outputs,
`runtime.spec.request`), request validation (which media a task needs), the ``lance-trt run`` and ``lance-client``
subcommands and their flags (`runtime.spec.flags`), the Triton configs (`runtime.serving.repository`), the engine
contract (`runtime.spec.contract.engine_specs`), the runner factory (`runtime.runners.factory`), the pipeline's
dispatch (`runtime.pipeline.LancePipeline.generate`) and the docs tables (``tests/test_registry.py`` checks them).

Adding a task is one `Task` entry here plus its module in ``runtime/pipeline/``; a new engine is one `Engine` entry,
its tensors in `runtime.spec.contract`, and its graph. The planner and the pipeline function are named by import path
(``module:function``), because this layer sits below the pipeline and imports nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Engine:
    """One engine: a network the pipeline calls through a runner, exported to its own ONNX graph and plan.

    Attributes:
        name: the engine's name in the contract, the ONNX stem and the plan (``vit``).
        summary: what it computes, one line.
        triton_model: the Triton model that serves it on its own (the BLS model calls it), or None when it runs inside
            model ``lance`` (``mot``: its KV cache must stay resident across steps).
    """

    name: str
    summary: str
    triton_model: str | None


@dataclass(frozen=True)
class Task:
    """One task of Lance, with upstream's semantics.

    Attributes:
        name: the task's name on the wire and on the command line.
        summary: one line for help texts and the docs.
        prompt: what the prompt is for this task ("prompt", "question", "instruction").
        media: the input media fields it accepts; exactly one of them is required when any is listed (``x2t`` takes
            an image or a video).
        options: the request options it reads (each a `runtime.spec.request` field); the others keep their defaults.
        output: the output kind: ``image``, ``text`` or ``video``.
        engines: the engines it runs.
        planner: ``module:function`` that lays out its sequence (`runtime.pipeline.sequence`).
        run: ``module:function`` that runs it: ``run(pipeline, request, progress, timings)`` returns the output.
    """

    name: str
    summary: str
    prompt: str
    media: tuple[str, ...]
    options: tuple[str, ...]
    output: str
    engines: tuple[str, ...]
    planner: str
    run: str


RUNNERS = ("torch", "onnxruntime", "tensorrt")
"""The backends an engine runs on (``--runner``): the PyTorch modules, the exported graphs in ONNX Runtime, TensorRT
plans. `runtime.runners.factory` is the one place that chooses among them."""

ENGINES: dict[str, Engine] = {engine.name: engine for engine in (
    Engine("vit", "Qwen2.5-VL vision tower: patches -> LLM rows", "lance_vit"),
    Engine("mot", "one step of the MoT LLM over a block of rows against the KV cache", None),
    Engine("vae_encode", "Wan2.2 VAE encoder: image -> sampled latent", "lance_vae_encode"),
    Engine("vae_decode", "Wan2.2 VAE decoder: latent -> image", "lance_vae_decode"),
)}

_IMAGE_OPTIONS = ("height", "width", "steps", "cfg_scale", "seed")

TASKS: dict[str, Task] = {task.name: task for task in (
    Task("t2i", "text to image", "prompt", media=(), options=_IMAGE_OPTIONS, output="image",
         engines=("mot", "vae_decode"),
         planner="runtime.pipeline.sequence:plan_t2i", run="runtime.pipeline.t2i:run"),
    Task("x2t", "image to text (answer on stdout)", "question", media=("image",), options=("max_new_tokens",),
         output="text", engines=("vit", "mot"),
         planner="runtime.pipeline.sequence:plan_x2t", run="runtime.pipeline.x2t:run"),
    Task("edit", "image edit", "instruction", media=("image",), options=_IMAGE_OPTIONS, output="image",
         engines=("vit", "mot", "vae_encode", "vae_decode"),
         planner="runtime.pipeline.sequence:plan_edit", run="runtime.pipeline.edit:run"),
)}

MEDIA = ("image",)
"""Every input medium a task may take, in wire order."""
OUTPUT_KINDS = ("image", "text")
"""Every output kind a task may produce, in wire order."""


def tasks_taking(field: str) -> tuple[str, ...]:
    """The tasks that read request field ``field`` (a medium or an option), in registry order."""
    return tuple(name for name, task in TASKS.items() if field in task.media or field in task.options)


def _check() -> None:
    """The tables are consistent: every task's media, outputs and engines are declared."""
    for task in TASKS.values():
        unknown = (set(task.media) - set(MEDIA)) | ({task.output} - set(OUTPUT_KINDS)) | (set(task.engines)
                                                                                          - set(ENGINES))
        if unknown:
            raise ValueError(f"task {task.name!r}: undeclared media, output or engines {sorted(unknown)}")


_check()
