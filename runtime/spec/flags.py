"""What ``lance-trt run TASK`` and ``lance-client TASK`` share on the command line: one subcommand per registered
task, the same generation flags and defaults, derived from `runtime.spec.registry`, and the progress bar (standard
library only, tqdm imported when a bar is drawn, so the client stays free of torch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from runtime.spec import constants, registry
from runtime.spec.limits import DEFAULT_FRAMES, FRAMES_STEP, MAX_FRAMES


def _takers(field: str) -> str:
    return ", ".join(registry.tasks_taking(field))


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """The request fields as flags (the help of each names the tasks that read it)."""
    prompts = ", ".join(f"{task.prompt} ({task.name})" for task in registry.TASKS.values())
    parser.add_argument("--prompt", required=True, help=prompts)
    parser.add_argument("--image", type=Path, help=f"input image ({_takers('image')})")
    parser.add_argument("--video", type=Path, help=f"input video, sampled at 12 fps over at most 6 s ({_takers('video')})")
    for side in ("height", "width"):
        own = ", ".join(f"{task.name} {dict(task.defaults)[side]}" for task in registry.TASKS.values()
                        if side in dict(task.defaults))
        default = getattr(constants, f"DEFAULT_{side.upper()}")
        parser.add_argument(f"--{side}", type=int, help=f"output {side} (default {default}; {own})")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                        help=f"video frames, {FRAMES_STEP}k+1 up to {MAX_FRAMES}, written at 12 fps ({_takers('frames')}; "
                             "default: %(default)s)")
    parser.add_argument("--steps", type=int, default=constants.DEFAULT_STEPS)
    parser.add_argument("--cfg-scale", type=float, default=constants.DEFAULT_CFG_SCALE)
    parser.add_argument("--seed", type=int, default=constants.DEFAULT_SEED)
    parser.add_argument("--max-new-tokens", type=int, default=constants.DEFAULT_MAX_NEW_TOKENS)
    outputs = ", ".join(f"{task.name}: {OUTPUT_FILES[task.output]}" for task in registry.TASKS.values()
                        if task.output != "text")
    parser.add_argument("-o", "--output", type=Path, help=f"output file ({outputs})")


OUTPUT_FILES = {"image": "an image file (PNG, JPEG, ...)", "video": "an MP4 file, H.264 at 12 fps"}
"""What ``-o`` writes per output kind (`runtime.spec.registry.OUTPUT_KINDS` that are files)."""


def read_media(args: argparse.Namespace) -> dict[str, bytes]:
    """The bytes of each input file given (``--image``, ``--video``), by request field.

    Raises:
        OSError: a file cannot be read; ``err.filename`` names it.
    """
    return {name: getattr(args, name).read_bytes() for name in registry.MEDIA if getattr(args, name) is not None}


def write_output(kind: str, value: Any, path: Path) -> None:
    """Write an image or video result to ``path`` (the format of an image follows its suffix)."""
    if kind == "video":
        from runtime.spec.video import write_mp4

        write_mp4(path, value)
    else:
        from PIL import Image

        Image.fromarray(value).save(path)


def add_task_subcommands(parser: argparse.ArgumentParser, **common: object) -> dict[str, argparse.ArgumentParser]:
    """One subparser per registered task, each with the generation flags; ``common`` goes to every ``add_parser``.
    Returns the subparsers by task name (callers add their own flags)."""
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    subparsers = {}
    for task in registry.TASKS.values():
        subparsers[task.name] = tasks.add_parser(task.name, help=task.summary, **common)
        add_generation_options(subparsers[task.name])
    return subparsers


def check_task_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot say per task: the medium a task needs and the output file of an image task
    (``parser.error`` names the flag)."""
    task = registry.TASKS[args.task]
    given = [name for name in registry.MEDIA if getattr(args, name) is not None]
    for name in given:
        if name not in task.media:
            parser.error(f"--{name}: {task.name} takes no {name}")
    if task.media and len(given) != 1:
        flags = " or ".join(f"--{name}" for name in task.media)
        parser.error(f"{task.name} takes one of {flags}, not both" if given else f"{flags} is required for {task.name}")
    if task.output != "text" and args.output is None:
        parser.error(f"-o/--output is required for {task.name}")


class ProgressBar:
    """A tqdm bar on stderr fed by progress responses. It appears with the first response, which carries the total, so
    nothing is drawn while the request waits or when the connection fails; it is drawn once at 100 % on close.

    Args:
        unit: what one step of progress is (``step``, ``token``).
        disable: draw nothing (``--quiet``).
        file: where the bar goes.
    """

    def __init__(self, unit: str, *, disable: bool = False, file: Any = None) -> None:
        self.unit = unit
        self.disable = disable
        self.file = file
        self._bar: Any = None

    def update(self, done: int, total: int) -> None:
        """The ``on_progress(done, total)`` callback."""
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=self.unit, file=self.file or sys.stderr, disable=self.disable,
                             dynamic_ncols=True)
        elif self._bar.total != total:
            self._bar.reset(total=total)
        if done >= total:
            # close() draws the final line; updating first would draw 100 % twice when steps outlast tqdm's refresh
            self._bar.n = done
            self.close()
        else:
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
