"""The task and engine registry is the one declaration everything derives from: the pipeline's dispatch and planners,
request validation, the wire format, the CLI and client subcommands, the Triton models, the runner factory and the
docs' tables."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from runtime.pipeline.core import registered
from runtime.spec import registry, tables
from runtime.spec.request import LANCE_INPUTS, LANCE_OUTPUTS, GenerationRequest, RequestError

REPO_ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


@pytest.mark.parametrize("task", registry.TASKS.values(), ids=lambda task: task.name)
def test_task_functions_resolve(task: registry.Task) -> None:
    assert callable(registered(task.run)) and callable(registered(task.planner))
    assert task.run == f"runtime.pipeline.{task.name.replace('-', '_')}:run", "one module per task"


MEDIUM_BYTES = {"image": PNG, "video": b"\x00\x00\x00\x18ftypmp42"}     # validation checks bytes, not decoding


@pytest.mark.parametrize("task", registry.TASKS.values(), ids=lambda task: task.name)
def test_validation_follows_the_media(task: registry.Task) -> None:
    """A task takes exactly one of its media and refuses the others, naming the tasks that take them."""
    for medium in registry.MEDIA:
        request = GenerationRequest(task=task.name, prompt="x", **{medium: MEDIUM_BYTES[medium]})
        if medium in task.media:
            request.validate()
        else:
            *rest, last = registry.tasks_taking(medium)
            takers = f"{', '.join(rest)} and {last}" if rest else last
            with pytest.raises(RequestError, match=f"^{medium}: only {takers} take"):
                request.validate()
    without = GenerationRequest(task=task.name, prompt="x")
    if task.media:
        with pytest.raises(RequestError, match=f"^{task.media[0]}: required"):
            without.validate()
    else:
        without.validate()


def test_wire_format_derives_from_the_registry() -> None:
    inputs = [spec.name for spec in LANCE_INPUTS]
    assert set(registry.MEDIA) <= set(inputs)
    for task in registry.TASKS.values():
        assert set(task.options) <= set(inputs), task.name
    outputs = [spec.name for spec in LANCE_OUTPUTS]
    assert outputs == ["progress", *registry.OUTPUT_KINDS, "timings"]
    assert ", ".join(registry.TASKS) in LANCE_INPUTS[0].doc


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def test_command_lines_list_every_task() -> None:
    from runtime.cli import _build_parser
    from runtime.client import build_parser

    assert _subcommands(build_parser()) == set(registry.TASKS)
    run = next(a for a in _build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    task_argument = next(a for a in run._actions if a.dest == "task")
    assert tuple(task_argument.choices) == tuple(registry.TASKS)


def test_engines_derive_from_the_registry(tiny_models) -> None:
    from runtime.runners.factory import engines_for
    from runtime.serving.repository import CHILD_MODELS, MODEL_TEMPLATES
    from runtime.spec.contract import ENGINES, engine_specs

    assert ENGINES == tuple(registry.ENGINES)
    assert tuple(engine_specs(tiny_models.llm_config, tiny_models.vision_config, tiny_models.vae_config)) == ENGINES
    assert tuple(engines_for("torch", tiny_models)) == ENGINES
    assert CHILD_MODELS == {name: e.triton_model for name, e in registry.ENGINES.items() if e.triton_model}
    assert set(MODEL_TEMPLATES) == {"lance", *CHILD_MODELS.values()}
    for task in registry.TASKS.values():
        assert set(task.engines) <= set(ENGINES), task.name


@pytest.mark.parametrize("document, table", [
    ("README.md", tables.tasks_table),
    ("docs/serving.md", tables.interface_table),
], ids=["README-tasks", "serving-interface"])
def test_docs_hold_the_generated_tables(document: str, table) -> None:
    expected = table()
    assert expected in (REPO_ROOT / document).read_text(encoding="utf-8"), (
        f"{document} must hold this table, generated from runtime.spec.registry:\n{expected}")
