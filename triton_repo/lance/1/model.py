"""Triton model ``lance``: the decoupled BLS model that runs Lance (t2i, x2t, edit).

Glue only: the request envelope, the pipeline and the BLS calls live in ``runtime.triton_adapter.LanceModel``.
"""

from runtime.triton_adapter import LanceModel


class TritonPythonModel(LanceModel):
    """``initialize``/``execute``/``finalize`` of `runtime.triton_adapter.LanceModel`."""
