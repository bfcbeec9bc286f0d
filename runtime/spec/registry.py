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
        video_model: runs on the video checkpoint (``Lance_3B_Video``), as upstream runs every video task (x2t runs
            on it when its input is a video: `needs_video_model`).
        defaults: the task's own defaults of request options (t2v's 480 x 848), over the request's.
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
    video_model: bool = False
    defaults: tuple[tuple[str, int], ...] = ()


RUNNERS = ("torch", "onnxruntime", "tensorrt")
"""The backends an engine runs on (``--runner``): the PyTorch modules, the exported graphs in ONNX Runtime, TensorRT
plans. `runtime.runners.factory` is the one place that chooses among them."""

ENGINES: dict[str, Engine] = {engine.name: engine for engine in (
    Engine("vit", "Qwen2.5-VL vision tower: patches -> LLM rows", "lance_vit"),
    Engine("mot", "one step of the MoT LLM over a block of rows against the KV cache", None),
    Engine("vae_encode", "Wan2.2 VAE encoder: image -> sampled latent", "lance_vae_encode"),
    Engine("vae_decode", "Wan2.2 VAE decoder: latent -> image", "lance_vae_decode"),
    # The video VAE's chunk steps run beside mot: their causal caches pass from call to call.
    Engine("vae_encode_first", "Wan2.2 VAE encoder, frame 0 of a video: -> latent frame 0's posterior and the caches",
           None),
    Engine("vae_encode_chunk", "Wan2.2 VAE encoder, 4 later frames and the caches -> one latent frame and the caches",
           None),
    Engine("vae_decode_first", "Wan2.2 VAE decoder, latent frame 0 of a video: -> frame 0 and the causal caches",
           None),
    Engine("vae_decode_chunk", "Wan2.2 VAE decoder, one later latent frame and the caches -> 4 frames and the caches",
           None),
)}

_IMAGE_OPTIONS = ("height", "width", "steps", "cfg_scale", "seed")
_VIDEO_OPTIONS = (*_IMAGE_OPTIONS, "frames")
_VIDEO_SIZE = (("height", 480), ("width", 848))     # upstream's README t2v: 480 x 848
_VIDEO_DECODER = ("vae_decode_first", "vae_decode_chunk")
_VIDEO_ENCODER = ("vae_encode_first", "vae_encode_chunk")

TASKS: dict[str, Task] = {task.name: task for task in (
    Task("t2i", "text to image", "prompt", media=(), options=_IMAGE_OPTIONS, output="image",
         engines=("mot", "vae_decode"),
         planner="runtime.pipeline.sequence:plan_t2i", run="runtime.pipeline.t2i:run"),
    Task("x2t", "image or video to text (answer on stdout)", "question", media=("image", "video"),
         options=("max_new_tokens",),
         output="text", engines=("vit", "mot"),
         planner="runtime.pipeline.sequence:plan_x2t", run="runtime.pipeline.x2t:run"),
    Task("edit", "image edit", "instruction", media=("image",), options=_IMAGE_OPTIONS, output="image",
         engines=("vit", "mot", "vae_encode", "vae_decode"),
         planner="runtime.pipeline.sequence:plan_edit", run="runtime.pipeline.edit:run"),
    Task("t2v", "text to video", "prompt", media=(), options=_VIDEO_OPTIONS, output="video",
         engines=("mot", *_VIDEO_DECODER),
         planner="runtime.pipeline.sequence:plan_t2v", run="runtime.pipeline.t2v:run",
         video_model=True, defaults=_VIDEO_SIZE),
    Task("i2v", "image to video: the image is the first frame", "prompt", media=("image",), options=_VIDEO_OPTIONS,
         output="video", engines=("vit", "mot", "vae_encode", *_VIDEO_DECODER),
         planner="runtime.pipeline.sequence:plan_i2v", run="runtime.pipeline.i2v:run",
         video_model=True, defaults=_VIDEO_SIZE),
    Task("video-edit", "video edit", "instruction", media=("video",), options=_IMAGE_OPTIONS, output="video",
         engines=("vit", "mot", *_VIDEO_ENCODER, *_VIDEO_DECODER),
         planner="runtime.pipeline.sequence:plan_edit", run="runtime.pipeline.video_edit:run",
         video_model=True, defaults=_VIDEO_SIZE),
)}

MEDIA = ("image", "video")
"""Every input medium a task may take, in wire order."""
OUTPUT_KINDS = ("image", "text", "video")
"""Every output kind a task may produce, in wire order."""


def needs_video_model(task: Task, media: set[str]) -> bool:
    """Whether a request of ``task`` with inputs ``media`` runs on ``Lance_3B_Video``: a video task, or a video input
    (upstream's x2t_video runs on the video checkpoint)."""
    return task.video_model or "video" in media


def tasks_taking(field: str) -> tuple[str, ...]:
    """The tasks that read request field ``field`` (a medium or an option), in registry order."""
    return tuple(name for name, task in TASKS.items() if field in task.media or field in task.options)


def _check() -> None:
    """The tables are consistent: every task's media, outputs and engines are declared, its defaults are options."""
    for task in TASKS.values():
        if not {name for name, _ in task.defaults} <= set(task.options):
            raise ValueError(f"task {task.name!r}: defaults for options it does not read")
        unknown = (set(task.media) - set(MEDIA)) | ({task.output} - set(OUTPUT_KINDS)) | (set(task.engines)
                                                                                          - set(ENGINES))
        if unknown:
            raise ValueError(f"task {task.name!r}: undeclared media, output or engines {sorted(unknown)}")


_check()
