"""Where a Lance server answers: the Triton model that serves every task and the default ports (standard library
only: the server launcher and the client both read it)."""

LANCE_MODEL = "lance"
"""The Triton model that serves every task (a decoupled BLS model)."""
DEFAULT_GRPC_PORT = 8001
DEFAULT_HTTP_PORT = 8000
DEFAULT_METRICS_PORT = 8002
