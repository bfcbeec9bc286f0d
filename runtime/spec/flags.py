"""The generation flags of ``lance-trt run TASK`` and ``lance-client TASK``: one subcommand per registered task, the
same flag names and defaults on both, derived from `runtime.spec.registry` (standard library only, so the client
stays free of torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from runtime.spec import constants, registry


def _takers(field: str) -> str:
    return ", ".join(registry.tasks_taking(field))


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """The request fields as flags (the help of each names the tasks that read it)."""
    prompts = ", ".join(f"{task.prompt} ({task.name})" for task in registry.TASKS.values())
    parser.add_argument("--prompt", required=True, help=prompts)
    parser.add_argument("--image", type=Path, help=f"input image ({_takers('image')})")
    parser.add_argument("--height", type=int, default=constants.DEFAULT_HEIGHT)
    parser.add_argument("--width", type=int, default=constants.DEFAULT_WIDTH)
    parser.add_argument("--steps", type=int, default=constants.DEFAULT_STEPS)
    parser.add_argument("--cfg-scale", type=float, default=constants.DEFAULT_CFG_SCALE)
    parser.add_argument("--seed", type=int, default=constants.DEFAULT_SEED)
    parser.add_argument("--max-new-tokens", type=int, default=constants.DEFAULT_MAX_NEW_TOKENS)
    outputs = ", ".join(f"{task.name}: {task.output}" for task in registry.TASKS.values() if task.output != "text")
    parser.add_argument("-o", "--output", type=Path, help=f"output file ({outputs})")


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
    if "image" in task.media and args.image is None:
        parser.error(f"--image is required for {task.name}")
    if task.output != "text" and args.output is None:
        parser.error(f"-o/--output is required for {task.name}")
