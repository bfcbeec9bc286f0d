"""The docs' tables of tasks and of the request interface, generated from the registry and the wire format:
README.md and docs/serving.md hold these exact texts (tests/test_registry.py), so a new task or field shows up in
the docs the moment it is declared."""

from __future__ import annotations

from runtime.spec import registry
from runtime.spec.contract import DType, TensorSpec
from runtime.spec.request import LANCE_INPUTS, LANCE_OUTPUTS


def tasks_table() -> str:
    """One row per task: what it does, what it takes and returns, which engines it runs."""
    rows = ["| task | does | takes | returns | engines |", "|---|---|---|---|---|"]
    for task in registry.TASKS.values():
        takes = ", ".join([task.prompt, *(" or ".join(task.media),)] if task.media else [task.prompt])
        engines = ", ".join(f"`{name}`" for name in task.engines)
        rows.append(f"| `{task.name}` | {task.summary} | {takes} | {task.output} | {engines} |")
    return "\n".join(rows) + "\n"


def _wire_type(spec: TensorSpec) -> str:
    return "BYTES" if spec.dtype is DType.BYTES else spec.dtype.triton.removeprefix("TYPE_")


def _shape(spec: TensorSpec) -> str:
    return "[" + ", ".join(str(d) for d in spec.shape) + "]"


def interface_table() -> str:
    """Every input and output tensor of model ``lance``: name, wire type, shape and what it holds."""
    rows = ["| tensor | direction | type | shape | holds |", "|---|---|---|---|---|"]
    for direction, specs in (("input", LANCE_INPUTS), ("output", LANCE_OUTPUTS)):
        for spec in specs:
            kind = f"{direction} (optional)" if spec.optional else direction
            rows.append(f"| `{spec.name}` | {kind} | {_wire_type(spec)} | {_shape(spec)} | "
                        f"{spec.doc} |")
    return "\n".join(rows) + "\n"
