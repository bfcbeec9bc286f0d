"""Triton model ``lance_<engine>`` on CPU (``configs/cpu.pbtxt``): the fp32 ONNX graph of one engine in ONNX Runtime,
standing in for the TensorRT plan that ``config.pbtxt`` serves. Glue only: see
``runtime.serving.triton_adapter.EngineModel``.
"""

from runtime.serving.triton_adapter import EngineModel


class TritonPythonModel(EngineModel):
    """``initialize``/``execute`` of `runtime.serving.triton_adapter.EngineModel`."""
