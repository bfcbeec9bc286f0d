"""Triton model ``lance``: the decoupled BLS model that runs every Lance task.

Glue only: the request envelope, the pipeline and the BLS calls live in ``runtime.serving.triton_adapter.LanceModel``.
"""

from runtime.serving.triton_adapter import LanceModel


class TritonPythonModel(LanceModel):
    """``initialize``/``execute``/``finalize`` of `runtime.serving.triton_adapter.LanceModel`."""
