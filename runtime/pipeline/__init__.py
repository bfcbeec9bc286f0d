"""The pipeline layer: the shared phases (`runtime.pipeline.core`) and one module per task, over the runners."""

from runtime.pipeline.core import LanceHost, LancePipeline, load_host

__all__ = ["LanceHost", "LancePipeline", "load_host"]
