"""Triton model ``lance_vae_encode`` on CPU (``configs/cpu.pbtxt``): the fp32 ONNX graph of engine ``vae_encode`` in ONNX Runtime,
standing in for the TensorRT plan that ``config.pbtxt`` serves. Glue only: see ``runtime.triton_adapter.EngineModel``.
"""

from runtime.triton_adapter import EngineModel


class TritonPythonModel(EngineModel):
    """``initialize``/``execute`` of `runtime.triton_adapter.EngineModel`."""
