"""`lance-trt serve`: run ``tritonserver`` on a model repository; also the launcher the Triton tests share.

The server is the ``tritonserver`` on PATH (a Triton container) or, failing that, the Triton 2.51 binary bundled in
nvidia-pytriton 0.7.0 (``pip install 'lance-trt[serve]'``). The bundled one needs three things (docs/design/serving.md
§4.1), which ``TritonServer`` sets up: a backend directory holding symlinks to ``libtriton_python.so``,
``triton_python_backend_utils.py`` and the stub built for the running Python version; ``PATH=<venv>/bin:...`` so the
stub's embedded interpreter takes this environment's ``sys.prefix``; ``LD_LIBRARY_PATH=<python LIBDIR>`` so it loads
this interpreter's ``libpython`` rather than the system's.

Findings on Triton 2.51 (the bundled server), measured on the 2-core CPU machine with throwaway Python models; the
queue bound, both cancellations and the shutdown bug are also tests in tests/test_serve.py:

Bounded queue for a decoupled Python model with ``max_batch_size: 0``
    - ``dynamic_batching { default_queue_policy { max_queue_size: N } }`` is accepted with ``max_batch_size: 0`` and
      ``decoupled: true``; ``execute`` still receives one request at a time. With one instance and N = 2, a running
      request plus 4 more gave 2 queued and 2 refused within 5 ms (plus 5 more: 3 refused). The queue counts the
      requests waiting for the instance, not the one running.
    - On a stream the refusal is an in-stream error "[request id: X] Exceeds maximum queue size" with NO gRPC code
      (tritonclient's ``status()`` is None), even with the ``triton_grpc_error: true`` header; the stream stays open
      and no FINAL follows. The same refusal of a unary call is UNAVAILABLE. It is never RESOURCE_EXHAUSTED, and
      ``nv_inference_request_failure{reason="REJECTED"}`` stays 0.
    - Without ``dynamic_batching`` there is no bound: 4 requests of 1 s were served one after another, the last
      after 4 s. Sequence batching has no queue size and refuses requests without a correlation ID; the rate limiter
      only orders instances.
    - The bound holds only while ``execute`` blocks for the whole request (Lance's loop inside ``execute``): an
      ``async def execute`` that awaits, or an ``execute`` that hands the request to a thread, admitted all 5
      requests at once, so nothing was queued or refused.
    - A request cancelled while queued is dropped before ``execute`` (``reason="CANCELED"`` +1); the next runs.
    - Bug: cancelling a stream whose request was refused (``stop_stream(cancel_requests=True)``, or the client
      dying) leaves the model referenced; at shutdown the server reports "Found 1 live models" until
      ``--exit-timeout-secs`` expires ("Exit timeout expired. Exiting immediately."). ``stop()`` still ends
      everything; clients should close such a stream without cancelling (``runtime.client`` does).
    - ``--model-config-name=cpu`` serves ``configs/cpu.pbtxt`` where a model has one and ``config.pbtxt`` otherwise.

Cancellation of a gRPC stream reaching a Python (BLS) model
    - ``stop_stream(cancel_requests=True)``, an expired ``stream_timeout`` (the client gets DEADLINE_EXCEEDED) and
      the client process exiting all cancel the request: ``request.is_cancelled()`` and
      ``response_sender.is_cancelled()`` both turn True, seen at the next poll (within 10 ms, polling every 50 ms), in
      a blocking ``execute``, an ``async def execute`` and a thread alike. The client gets CANCELLED "Locally
      cancelled by application!" and no further response.
    - Nothing interrupts ``execute``: the model must poll between denoise steps and tokens, and still send FINAL
      (a ``send`` after the cancel is accepted silently).
    - A parent's cancellation does not reach its BLS children: a child iterated with ``exec(decoupled=True)`` ran to
      its end (4 s) after the parent stopped at 0.5 s; 2.51's response iterator has no ``cancel()``, ``exec`` returns
      at the child's first response, and the parent can look at ``is_cancelled()`` only between child responses. So
      Lance checks between steps and keeps its BLS calls (vit, vae) short and unary.

Other facts of this release that shape the BLS model and the client
    - ``InferenceResponse(parameters=...)`` is a TypeError: response parameters reached the Python backend later
      (python_backend #394, 2025), so stage timings cannot travel as response parameters from a 2.51 Python model.
    - With the ``triton_grpc_error: true`` header an error response arrives with its gRPC code (``TritonError``
      INVALID_ARG becomes INVALID_ARGUMENT, an exception in ``execute`` INTERNAL) and closes the stream; the server
      then logs a harmless "[INTERNAL] HandleCancellation called even when the context was not cancelled".
    - A server that exits on a start error after loading its models (a port taken, "Socket already in use"; the
      metrics port is opened after HTTP already answers ready) leaves its Python stubs behind, reparented, holding
      their 16 MiB /dev/shm regions until they notice (about 1-4 s). ``stop()`` finds them by session id, waits for
      them, and removes any region still named with the server's own prefix (``shm-region-prefix-name``).
    - GPU mode (checked on an H100 with this module's defaults): the 256 MiB pinned pool and the 512 MiB CUDA pool of
      device 0 are created, the Python 3.12 stub loads, and SIGTERM stops server and stub in 2-4 s with no /dev/shm
      region left.

Supervision and drain (`lance-trt serve`; tests/test_operations.py)
    - After ``kill -9`` of a stub, 2.51 fails every request to its model ("Stub process ... is not healthy") and
      never restarts it, while ``/v2/health/ready`` still answers 200. ``serve`` watches the stubs it found at
      ready (`TritonServer.failure`) and kills the whole server at once: readiness refused within 0.2 s.
    - Triton's own SIGTERM unloads the child models at once, so a running ``lance`` request fails at its next BLS
      call. An unload of ``lance`` alone (repository API, ``--model-control-mode=explicit --load-model=*``) refuses
      new requests ("Request for unknown model: 'lance' has no available versions"), makes readiness answer 400, and
      lets running and queued requests finish with their children loaded; ``lance`` is gone about 1 s after the last
      one, unless a client keeps a stream that used it open (then it waits for that stream to close).

This module imports only the standard library (and `runtime.spec.endpoints`, itself stdlib only); the gRPC client
lives in ``runtime.client``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

from runtime.spec.endpoints import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT, LANCE_MODEL

log = logging.getLogger(__name__)

# `--cpu` serves each model's `configs/cpu.pbtxt` (Python-backend ONNX Runtime stand-ins for the TensorRT models);
# Triton falls back to `config.pbtxt` for a model that has none.
CPU_CONFIG_NAME = "cpu"
ADMIN_APIS = ("model-repository", "model-config", "logging", "trace", "statistics", "shared-memory")
"""Restricted behind the admin key on HTTP and gRPC: loading models, reading configs (they hold paths), raising the log
level, tracing, statistics, registering shared memory. Health, metadata and inference stay open."""
ADMIN_KEY_HEADER = "lance-admin-key"
ADMIN_KEY_ENV = "LANCE_ADMIN_KEY"
GRPC_KEY_PREFIX = "triton-grpc-protocol-"
"""Triton 2.51 matches ``--grpc-restricted-protocol`` keys against gRPC metadata under this prefix."""
SHM_REGION_PREFIX = "triton_python_backend_shm_region_"
"""The Python backend's default name prefix of its /dev/shm regions; each server adds its own token to it."""
_MIB = 1 << 20
DEFAULT_MAX_RESTARTS = 3
DEFAULT_RESTART_BACKOFF_S = 1.0
DEFAULT_DRAIN_TIMEOUT_S = 120.0
POLL_S = 0.1
"""How often `lance-trt serve` checks the server's process and stubs (and, draining, the unload)."""
# readiness polls go straight to the server, whatever http_proxy says
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class TritonNotFoundError(FileNotFoundError):
    """Neither a ``tritonserver`` on PATH nor the nvidia-pytriton wheel's binary exists."""


class ServerStartError(RuntimeError):
    """tritonserver exited or did not become ready; the message ends with the tail of its log."""


class PortInUseError(ServerStartError):
    """A port the server was told to use is already taken; the message names the option and the address."""


def find_tritonserver() -> Path:
    """The ``tritonserver`` binary: on PATH if there is one, else the one bundled in nvidia-pytriton.

    The wheel is located with ``importlib.util.find_spec``, never imported: ``pytriton/__init__`` pulls typer, wrapt
    and more, none of which the server needs.
    """
    on_path = shutil.which("tritonserver")
    if on_path is not None:
        return Path(on_path)
    bundled = _pytriton_dist()
    if bundled is not None and (bundled / "bin" / "tritonserver").is_file():
        return bundled / "bin" / "tritonserver"
    raise TritonNotFoundError(
        "tritonserver not found: it is neither on PATH nor bundled in nvidia-pytriton; "
        "install it with `pip install 'lance-trt[serve]'` or run inside a Triton container"
    )


def _pytriton_dist() -> Path | None:
    """``site-packages/pytriton/tritonserver`` of the nvidia-pytriton wheel, or None."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def missing_lance_model(repo: Path) -> str | None:
    """Why ``repo`` cannot serve Lance (no ``lance/config.pbtxt`` or no version folder with a ``model.py``), or None."""
    model = repo / LANCE_MODEL
    if not (model / "config.pbtxt").is_file():
        return f"{model / 'config.pbtxt'} does not exist"
    if not any(v.is_dir() and v.name.isdigit() and (v / "model.py").is_file() for v in model.iterdir()):
        return f"{model} has no version folder with a model.py"
    return None


def lance_config_path(repo: Path, config_name: str | None) -> Path:
    """The config of model ``lance`` that Triton serves: ``configs/<name>.pbtxt`` where it exists, else
    ``config.pbtxt``."""
    model = repo / LANCE_MODEL
    named = model / "configs" / f"{config_name}.pbtxt"
    return named if config_name and named.is_file() else model / "config.pbtxt"


def visible_gpus() -> list[str]:
    """The NVIDIA GPUs the driver shows (``/proc/driver/nvidia/gpus``: one folder per GPU); empty without a driver."""
    folder = Path("/proc/driver/nvidia/gpus")
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def config_set_problem(repo: Path, cpu: bool, config_name: str | None) -> str | None:
    """Why this machine cannot serve the config of ``lance`` that Triton would pick, or None: a ``KIND_GPU`` config
    under ``--cpu`` (a repository without a CPU set: ``--engine-set torch`` writes none, and Triton falls back to
    ``config.pbtxt``), or where no GPU is visible (Triton would fail the load deep in its log)."""
    config = lance_config_path(repo, config_name or (CPU_CONFIG_NAME if cpu else None))
    if not re.search(r"\bkind\s*:\s*KIND_GPU\b", config.read_text(encoding="utf-8")):
        return None
    if cpu:
        return (f"--cpu: this repository has no CPU set ({repo / LANCE_MODEL / 'configs' / 'cpu.pbtxt'} is missing) "
                f"and {config} runs lance on a GPU, as `lance-trt repo --engine-set torch` writes it; serve it "
                "without --cpu on a GPU, or write a CPU repository with `lance-trt repo ENGINE_DIR --checkpoint DIR`")
    if not visible_gpus():
        return (f"{config} runs lance on a GPU (KIND_GPU) and this machine shows no NVIDIA GPU "
                "(/proc/driver/nvidia/gpus is empty or missing); on a CPU serve a repository's CPU set with --cpu")
    return None


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on at ``address`` right now."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def port_in_use(address: str, port: int) -> bool:
    """Whether something listens on ``address:port``: a bind probe (``SO_REUSEADDR``, so a closed connection lingering
    in TIME_WAIT does not count; a listener does, even one with ``SO_REUSEPORT``)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address.strip("[]"), port))
        except OSError:
            return True
    return False


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a TCP socket listening on ``port`` (Linux ``/proc``); None where that cannot be
    read. A readiness answer counts only from the process we started, not from another server on the port."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:   # 0A: LISTEN
                inodes.add(fields[9])
    try:
        sockets = {os.readlink(fd.path) for fd in os.scandir(f"/proc/{pid}/fd")}
    except OSError:
        return None
    return any(f"socket:[{inode}]" in sockets for inode in inodes)


def _host_for(address: str) -> str:
    """A host that reaches a server bound to ``address`` (a wildcard address is reached through loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(address, address)
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(frozen=True)
class ServerOptions:
    """tritonserver settings. Defaults suit a GPU deployment of Lance; ``cpu=True`` adapts them to a CPU machine.

    Attributes:
        address: interface for gRPC, HTTP and metrics; loopback unless told otherwise.
        grpc_port, http_port, metrics_port: None picks a free port.
        cpu: serve ``configs/cpu.pbtxt`` configs, no CUDA pool, no pinned memory, no GPU metrics.
        cuda_memory_pool_byte_size: CUDA pool of GPU 0 for tensors the server moves (BLS hops over DLPack); Triton's
            64 MiB default is below one 1024x1024 fp32 image plus ViT patches in flight.
        pinned_memory_pool_byte_size: host staging for GPU copies (Triton's default); 0 on CPU.
        shm_default_byte_size, shm_growth_byte_size: the Python backend's shared-memory region per model instance
            and its growth step, above the backend's defaults so that 10-20 MB BLS tensors need few resizes.
        stub_timeout_seconds: how long the server waits on its Python stubs (the backend's default is 30 s); a stub
            that opens engines and a tokenizer at start needs more.
        exit_on_error: exit when a model fails to load rather than serve without it.
        model_config_name: ``--model-config-name``; None serves ``config.pbtxt`` (or ``cpu`` with ``cpu=True``).
        log_verbose: tritonserver verbosity (2 logs gRPC stream state transitions).
        exit_timeout_secs: on SIGTERM, how long in-flight requests may finish.
        metrics_address: interface of the metrics endpoint: loopback unless asked otherwise, even when ``address``
            is public.
        admin_key: the key of the admin APIs (`ADMIN_APIS`), sent as header ``lance-admin-key``; None: a random key
            per start, so they are closed to everyone.
        restrict_health: put the health endpoints behind the key too (the launcher's readiness poll sends it).
        extra_args: further tritonserver arguments, passed last.
        env: extra environment variables for the server and its stubs.
    """

    address: str = "127.0.0.1"
    grpc_port: int | None = None
    http_port: int | None = None
    metrics_port: int | None = None
    cpu: bool = False
    cuda_memory_pool_byte_size: int = 512 * _MIB
    pinned_memory_pool_byte_size: int = 256 * _MIB
    shm_default_byte_size: int = 16 * _MIB
    shm_growth_byte_size: int = 16 * _MIB
    stub_timeout_seconds: int = 300
    exit_on_error: bool = True
    model_config_name: str | None = None
    log_verbose: int = 0
    exit_timeout_secs: int = 30
    metrics_address: str = "127.0.0.1"
    admin_key: str | None = field(default=None, repr=False)
    restrict_health: bool = False
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"{name}: must be in [1, 65535], got {port}")
        for name in ("cuda_memory_pool_byte_size", "pinned_memory_pool_byte_size", "log_verbose", "exit_timeout_secs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("shm_default_byte_size", "shm_growth_byte_size", "stub_timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.model_config_name is not None and (not self.model_config_name or " " in self.model_config_name):
            raise ValueError(f"model_config_name: a non-empty name without spaces, got {self.model_config_name!r}")
        if self.admin_key is not None and not re.fullmatch(r"[A-Za-z0-9._~+/=-]{16,}", self.admin_key):
            raise ValueError("admin_key: at least 16 characters of letters, digits and ._~+/=- (it travels as a header)")

    def arguments(self, grpc_port: int, http_port: int, metrics_port: int, admin_key: str | None = None) -> list[str]:
        """tritonserver arguments apart from ``--model-repository`` and ``--backend-directory``; ``admin_key``
        restricts the admin APIs (and health, with ``restrict_health``) on HTTP and gRPC."""
        args = [
            f"--grpc-address={self.address}", f"--grpc-port={grpc_port}",
            f"--http-address={self.address}", f"--http-port={http_port}",
            f"--metrics-address={self.metrics_address}", f"--metrics-port={metrics_port}",
            f"--exit-on-error={str(self.exit_on_error).lower()}",
            # explicit control, every model loaded at start: `lance-trt serve` drains by unloading `lance` (an unload
            # lets in-flight requests finish while readiness answers 400; `none` mode refuses unloads)
            "--model-control-mode=explicit", "--load-model=*",
            f"--exit-timeout-secs={self.exit_timeout_secs}",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-default-byte-size={self.shm_default_byte_size}",
            f"--backend-config=python,shm-growth-byte-size={self.shm_growth_byte_size}",
            f"--backend-config=python,stub-timeout-seconds={self.stub_timeout_seconds}",
        ]
        if self.cpu:
            args += ["--pinned-memory-pool-byte-size=0", "--allow-gpu-metrics=false"]
        else:
            args += [
                f"--pinned-memory-pool-byte-size={self.pinned_memory_pool_byte_size}",
                f"--cuda-memory-pool-byte-size=0:{self.cuda_memory_pool_byte_size}",
            ]
        config_name = self.model_config_name or (CPU_CONFIG_NAME if self.cpu else None)
        if config_name is not None:
            args.append(f"--model-config-name={config_name}")
        if admin_key is not None:
            apis = ",".join(ADMIN_APIS + (("health",) if self.restrict_health else ()))
            restriction = f"{apis}:{ADMIN_KEY_HEADER}={admin_key}"
            args += [f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}"]
        return args + list(self.extra_args)


@dataclass(frozen=True)
class ProcessHandle:
    """A process identified by pid and start time, so a recycled pid is never mistaken for it."""

    pid: int
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> ProcessHandle | None:
        """The running process ``pid``, or None."""
        stat = _read_stat(pid)
        return None if stat is None else cls(pid, stat[2])

    def alive(self) -> bool:
        stat = _read_stat(self.pid)
        return stat is not None and stat[2] == self.start_ticks and stat[1] != "Z"

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _read_stat(pid: int) -> tuple[int, str, int, int] | None:
    """(ppid, state, start time in clock ticks, session id) of ``pid`` from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its last ')'
    rest = text[text.rindex(")") + 2:].split()
    return int(rest[1]), rest[0], int(rest[19]), int(rest[3])


def _live_processes() -> dict[int, tuple[int, str, int, int]]:
    """``_read_stat`` of every live (not zombie) process, by pid."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _read_stat(int(entry.name))
            if stat is not None and stat[1] != "Z":
                stats[int(entry.name)] = stat
    return stats


def _stub_model(pid: int) -> str:
    """The model a stub serves (the folder of its ``model.py`` argument), or ``?``; read while it lives."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    return next((Path(a).parent.parent.name for a in argv if a.endswith("model.py")), "?")


def session_members(sid: int) -> list[ProcessHandle]:
    """The live processes of session ``sid`` other than its leader: tritonserver's stubs even once the server has
    died and they were reparented (it runs in its own session), when ``descendants`` no longer finds them."""
    return [ProcessHandle(pid, stat[2]) for pid, stat in _live_processes().items() if stat[3] == sid and pid != sid]


def descendants(pid: int) -> list[ProcessHandle]:
    """Every live descendant of ``pid`` (for tritonserver: the Python backend stubs), from /proc."""
    children: dict[int, list[ProcessHandle]] = {}
    for child, stat in _live_processes().items():
        children.setdefault(stat[0], []).append(ProcessHandle(child, stat[2]))
    found: list[ProcessHandle] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


class TritonServer:
    """One tritonserver process on a model repository, as a context manager.

    ``start()`` returns once ``/v2/health/ready`` answers 200 (every model loaded, strict readiness) and raises
    ``ServerStartError`` with the log tail as soon as the process dies. ``stop()`` sends SIGTERM, SIGKILL after a
    timeout, and waits for the Python stubs to go (killing any that outlive the server), so no process and no
    /dev/shm region is left behind. The server runs in its own session: a Ctrl-C in the terminal reaches only the
    caller, which then calls ``stop()``.

    Args:
        repo: the model repository.
        options: server settings.
        log_path: where the server's stdout and stderr go; a new file in the temp folder when None (tests;
            ``lance-trt serve`` writes ``tritonserver.log`` beside the repository).
    """

    def __init__(self, repo: str | os.PathLike[str], options: ServerOptions | None = None, *,
                 log_path: str | os.PathLike[str] | None = None) -> None:
        self.repo = Path(repo).resolve()
        self.options = options or ServerOptions()
        self.binary = find_tritonserver()
        self.grpc_port = self.options.grpc_port or free_port(self.options.address)
        self.http_port = self.options.http_port or free_port(self.options.address)
        self.metrics_port = self.options.metrics_port or free_port(self.options.metrics_address)
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.admin_key = self.options.admin_key or secrets.token_urlsafe(24)
        # this server's /dev/shm regions are named <shm_prefix><uuid>, so stop() can remove those a crash left behind
        self.shm_prefix = f"{SHM_REGION_PREFIX}lance-{secrets.token_hex(4)}-"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        self._workdir: Path | None = None
        self._children: list[ProcessHandle] = []
        self.stubs: dict[ProcessHandle, str] = {}
        """The stubs found when the server became ready, with the model each serves: `failure` watches them."""
        self.restarts = 0

    @property
    def grpc_url(self) -> str:
        """``host:port`` for ``tritonclient.grpc`` and ``runtime.client.LanceClient``."""
        return f"{_host_for(self.options.address)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{_host_for(self.options.address)}:{self.http_port}"

    @property
    def admin_headers(self) -> dict[str, str]:
        """The HTTP header that opens the admin APIs."""
        return {ADMIN_KEY_HEADER: self.admin_key}

    @property
    def admin_grpc_headers(self) -> dict[str, str]:
        """The gRPC metadata that opens them: Triton reads restricted-protocol keys with this prefix on gRPC."""
        return {GRPC_KEY_PREFIX + ADMIN_KEY_HEADER: self.admin_key}

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def command(self, backend_dir: Path) -> list[str]:
        """The full tritonserver command line."""
        return [
            str(self.binary), f"--model-repository={self.repo}", f"--backend-directory={backend_dir}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.options.arguments(self.grpc_port, self.http_port, self.metrics_port, self.admin_key),
        ]

    def environment(self) -> dict[str, str]:
        """The server's environment: this interpreter's bin first on PATH; on LD_LIBRARY_PATH its libpython (alone
        in a folder of its own where the bundled stub runs: the interpreter's LIBDIR, e.g. /usr/lib/x86_64-linux-gnu,
        can hold other CUDA or cuDNN builds, and LD_LIBRARY_PATH outranks the RUNPATH by which torch finds its own)
        and the wheel's libraries (its CUDA runtime, under hashed names)."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p)
        bundled = _pytriton_dist()
        private = self._workdir / "lib" if self._workdir is not None else None
        libs = [str(private) if private is not None and private.is_dir() else sysconfig.get_config_var("LIBDIR") or "",
                str(bundled.parent.parent / "nvidia_pytriton.libs") if bundled is not None else ""]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (*libs, env.get("LD_LIBRARY_PATH", "")) if p)
        env.update(dict(self.options.env))
        return env

    def _backend_dir(self) -> Path:
        """A backend folder of symlinks: the bundled backend plus the stub of this Python version.

        A ``tritonserver`` from a Triton container ships its complete backend folder next to it.
        """
        dist = _pytriton_dist()
        if dist is None or not self.binary.resolve().is_relative_to(dist.resolve()):
            return self.binary.resolve().parent.parent / "backends"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonNotFoundError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
        self._workdir = Path(tempfile.mkdtemp(prefix="lance-triton-"))
        python = self._workdir / "backends" / "python"
        python.mkdir(parents=True)
        for target in (dist / "backends/python/libtriton_python.so",
                       dist / "backends/python/triton_python_backend_utils.py", stub):
            (python / target.name).symlink_to(target)
        libpython = Path(sysconfig.get_config_var("LIBDIR") or "/") / (sysconfig.get_config_var("INSTSONAME") or "-")
        if libpython.is_file():
            (self._workdir / "lib").mkdir()
            (self._workdir / "lib" / libpython.name).symlink_to(libpython)
        return python.parent

    def start(self, timeout: float = 300.0) -> TritonServer:
        """Launch the server and wait until it is ready.

        Raises:
            ServerStartError: the process exited, or was not ready after ``timeout`` seconds (it is then stopped).
        """
        if self.process is not None:
            raise RuntimeError("this TritonServer was already started")
        if not self.repo.is_dir():
            raise FileNotFoundError(f"model repository {self.repo} does not exist")
        self.check_ports()
        t0 = time.monotonic()
        try:
            command = self.command(self._backend_dir())
            log.info("starting %s", " ".join(command))
            with open(self.log_path, "ab" if self.restarts else "wb") as log_file:
                self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                                stderr=subprocess.STDOUT, env=self.environment(),
                                                start_new_session=True)
            while not self._ready():
                if self.process.poll() is not None:
                    raise ServerStartError(
                        f"tritonserver exited with code {self.process.returncode} before it was ready; "
                        f"log {self.log_path}:\n{self.log_tail()}")
                if time.monotonic() - t0 > timeout:
                    raise ServerStartError(f"tritonserver not ready after {timeout:.0f} s; "
                                           f"log {self.log_path}:\n{self.log_tail()}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        self.stubs = {stub: _stub_model(stub.pid) for stub in self.children()}
        log.info("tritonserver ready in %.1f s: grpc %s, http %s", self.startup_s, self.grpc_url, self.http_url)
        return self

    def restart(self, timeout: float = 300.0) -> TritonServer:
        """Kill what runs (`kill`) and start again on the same ports, appending to the same log.

        Raises:
            ServerStartError: as ``start``.
        """
        self.kill()
        self.process, self._children, self.stubs = None, [], {}
        self.restarts += 1
        return self.start(timeout)

    def failure(self) -> str | None:
        """Why this server no longer serves, or None: tritonserver has exited, or a stub it started is gone or a
        zombie. Triton 2.51 never restarts a stub: after a stub's death every request to its model fails ("Stub
        process ... is not healthy") while ``/v2/health/ready`` still answers 200."""
        if self.process is None:
            return None
        code = self.process.poll()
        if code is not None:
            return f"tritonserver (pid {self.process.pid}) exited with code {code}"
        dead = [stub for stub in self.stubs if not stub.alive()]
        if dead:
            return f"the stub of model {self.stubs[dead[0]]} (pid {dead[0].pid}) died"
        return None

    def unload(self, model: str) -> None:
        """Ask the server to unload ``model`` (repository API, admin key): it refuses new requests at once, readiness
        answers 400, and the model goes once its in-flight and queued requests are done.

        Raises:
            OSError: the server did not accept the request.
        """
        self._admin_post(f"/v2/repository/models/{model}/unload")

    def model_state(self, model: str) -> str | None:
        """``model``'s state in the repository index (``READY``, ``UNLOADING``, ``UNAVAILABLE``...), or None when the
        server does not answer."""
        try:
            index = json.loads(self._admin_post("/v2/repository/index"))
        except (OSError, ValueError):
            return None
        return next((entry.get("state") for entry in index if entry.get("name") == model), None)

    def _admin_post(self, path: str) -> bytes:
        request = urllib.request.Request(f"{self.http_url}{path}", data=b"{}", headers=self.admin_headers,
                                         method="POST")
        with _NO_PROXY.open(request, timeout=5.0) as response:
            return response.read()

    def endpoints(self) -> list[tuple[str, str, int]]:
        """(option, address, port) of each endpoint tritonserver opens: gRPC, HTTP and metrics, less those that
        ``extra_args`` turn off (``--allow-grpc=false``, ``--allow-metrics=false``)."""
        extra = " ".join(self.options.extra_args).lower()
        endpoints = {"grpc": (self.options.address, self.grpc_port), "http": (self.options.address, self.http_port),
                     "metrics": (self.options.metrics_address, self.metrics_port)}
        return [(f"--{name}-port", address, port) for name, (address, port) in endpoints.items()
                if not re.search(rf"--allow-{name}[= ](false|0)\b", extra)]

    def check_ports(self) -> None:
        """Refuse to start on a port something already listens on: tritonserver would fail later ("Socket already in
        use") while the other listener answered our readiness polls.

        Raises:
            PortInUseError: naming the option, the address and the port.
        """
        for option, address, port in self.endpoints():
            if port_in_use(address, port):
                raise PortInUseError(f"{option} {port}: {_host_for(address)}:{port} is already in use "
                                     "(another server?); stop it or choose another port")

    def _ready(self) -> bool:
        """The process we started is alive, ``/v2/health/ready`` answers 200, and that process holds the listener
        of every endpoint. A 200 alone proves nothing: another server on the port answers it, and tritonserver
        answers it before it opens metrics, then exits if that port is taken."""
        if self.process.poll() is not None:
            return False
        request = urllib.request.Request(f"{self.http_url}/v2/health/ready", headers=self.admin_headers)
        try:
            with _NO_PROXY.open(request, timeout=1.0) as response:
                ready = response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        return (ready and all(listens_on(self.process.pid, port) is not False for _, _, port in self.endpoints())
                and self.process.poll() is None)

    def children(self) -> list[ProcessHandle]:
        """The server's live descendant processes (its Python stubs), also once the server has exited and they were
        reparented: a server that fails at start (a port taken) leaves stubs that hold its shared memory."""
        if self.process is None:
            return []
        found = descendants(self.process.pid)
        return found + [p for p in session_members(self.process.pid) if p not in found]

    def wait(self) -> int:
        """Block until the server exits on its own; its exit code."""
        assert self.process is not None, "wait() before start()"
        return self.process.wait()

    def kill(self) -> int | None:
        """SIGKILL the server and every stub at once, then clean up as `stop` does (shared memory, work folder):
        a dead stub cannot be revived in place, and a killed server closes its ports, so readiness refuses."""
        if self.process is not None:
            family = [*self.children(), *self.stubs]
            self._children.extend(c for c in family if c not in self._children)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            for child in self._children:
                child.kill()
        return self.stop()

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` (default: ``exit_timeout_secs`` + 15 s); wait for the stubs.

        Returns the server's exit code (None if it was never started). Safe to call twice.
        """
        if self.process is None:
            self._remove_workdir()
            return None
        timeout = self.options.exit_timeout_secs + 15.0 if timeout is None else timeout
        # snapshot before signalling: once the server is gone the stubs are reparented and no longer findable
        self._children.extend(c for c in self.children() if c not in self._children)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not exit %.0f s after SIGTERM: killing it", timeout)
                self.process.kill()
                self.process.wait()
        # the stubs notice their parent is gone ("Non-graceful termination detected") within about 4 s
        deadline = time.monotonic() + 10.0
        while any(c.alive() for c in self._children) and time.monotonic() < deadline:
            time.sleep(0.1)
        for child in self._children:
            if child.alive():
                log.warning("stub process %d outlived tritonserver: killing it", child.pid)
                child.kill()
        self._remove_shm_regions()
        self._remove_workdir()
        return self.process.returncode

    def _remove_shm_regions(self) -> None:
        """Unlink this server's /dev/shm regions that outlived it and its stubs (a server that exits on an error, e.g.
        a taken port, leaves its 16 MiB regions to stubs that may be gone before they unlink them)."""
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            log.info("removing %s, left behind by tritonserver", region)
            with contextlib.suppress(OSError):
                region.unlink()

    def _remove_workdir(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> TritonServer:
        return self if self.process is not None else self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# --- `lance-trt serve` ---------------------------------------------------------------------------------------


def _byte_size(text: str) -> int:
    """``1048576``, ``64M``/``64MiB``, ``1G``/``1GiB``, ``512K``/``512KiB`` (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    body = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = body[-1:] if body[-1:] in units else ""
    try:
        value = int(body[: len(body) - len(unit)]) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a byte size like 67108864, 64M or 1G, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a byte size >= 0, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"a port in [1, 65535], got {text!r}")
    return port


def build_serve_parser() -> argparse.ArgumentParser:
    defaults = ServerOptions()
    parser = argparse.ArgumentParser(
        prog="lance-trt serve",
        description="Serve a Lance model repository with tritonserver until interrupted (Ctrl-C or SIGTERM). "
                    "Arguments after `--` go to tritonserver unchanged.",
    )
    add = parser.add_argument
    add("--repo", type=Path, metavar="DIR", default=Path("triton_repo"), help="model repository (default: %(default)s)")
    add("--cpu", action="store_true",
        help=f"CPU mode: serve configs/{CPU_CONFIG_NAME}.pbtxt (ONNX Runtime stand-ins), no CUDA or pinned memory")
    add("--address", metavar="ADDR", default=defaults.address, help="interface of gRPC and HTTP (default: %(default)s)")
    add("--metrics-address", metavar="ADDR", default=defaults.metrics_address,
        help="interface of the metrics endpoint (default: %(default)s, whatever --address says)")
    add("--admin-key-file", type=Path, metavar="PATH",
        help=f"file holding the key of the admin APIs ({', '.join(ADMIN_APIS)}), sent as header {ADMIN_KEY_HEADER}; "
             f"default: ${ADMIN_KEY_ENV}; with neither, they are closed to everyone")
    add("--restrict-health", action="store_true", help="put the health endpoints behind the admin key too")
    add("--grpc-port", type=_port, metavar="PORT", default=DEFAULT_GRPC_PORT, help="(default: %(default)s)")
    add("--http-port", type=_port, metavar="PORT", default=DEFAULT_HTTP_PORT, help="(default: %(default)s)")
    add("--metrics-port", type=_port, metavar="PORT", default=DEFAULT_METRICS_PORT, help="(default: %(default)s)")
    add("--cuda-memory-pool-byte-size", type=_byte_size, metavar="BYTES", default=defaults.cuda_memory_pool_byte_size,
        help="CUDA memory pool of GPU 0 (default: %(default)s)")
    add("--pinned-memory-pool-byte-size", type=_byte_size, metavar="BYTES",
        default=defaults.pinned_memory_pool_byte_size, help="(default: %(default)s; 0 with --cpu)")
    add("--shm-default-byte-size", type=_byte_size, metavar="BYTES", default=defaults.shm_default_byte_size,
        help="Python backend: initial shared memory per model instance (default: %(default)s)")
    add("--shm-growth-byte-size", type=_byte_size, metavar="BYTES", default=defaults.shm_growth_byte_size,
        help="Python backend: shared memory growth step (default: %(default)s)")
    add("--stub-timeout-seconds", type=int, metavar="S", default=defaults.stub_timeout_seconds,
        help="Python backend: how long the server waits on a stub (default: %(default)s)")
    add("--exit-on-error", action=argparse.BooleanOptionalAction, default=defaults.exit_on_error,
        help="exit when a model fails to load (default: %(default)s)")
    add("--model-config-name", metavar="NAME", default=None,
        help=f"serve configs/NAME.pbtxt of every model (default: none; {CPU_CONFIG_NAME} with --cpu)")
    add("--log-verbose", type=int, metavar="N", default=defaults.log_verbose, help="(default: %(default)s)")
    add("--exit-timeout-secs", type=int, metavar="S", default=defaults.exit_timeout_secs,
        help="on stop, how long in-flight requests may finish (default: %(default)s)")
    add("--log-file", type=Path, metavar="PATH", default=None,
        help="server log (default: tritonserver.log beside the repository, i.e. in the repository's parent folder)")
    add("--ready-timeout", type=float, metavar="S", default=600.0, help="seconds to wait for readiness")
    add("--max-restarts", type=int, metavar="N", default=DEFAULT_MAX_RESTARTS,
        help="restarts after tritonserver or a stub dies; then serve exits 1 (default: %(default)s)")
    add("--restart-backoff", type=float, metavar="S", default=DEFAULT_RESTART_BACKOFF_S,
        help="wait before the first restart, doubled for each further one (default: %(default)s)")
    add("--drain-timeout", type=float, metavar="S", default=DEFAULT_DRAIN_TIMEOUT_S,
        help="on SIGTERM, how long in-flight and queued requests may finish before the server stops "
             "(default: %(default)s)")
    return parser


def admin_key(key_file: Path | None) -> str | None:
    """The admin key: the first line of ``key_file``, else ``$LANCE_ADMIN_KEY``, else None (closed to everyone).

    Raises:
        ValueError: the file cannot be read (the message names it).
    """
    if key_file is not None:
        try:
            return key_file.read_text(encoding="utf-8").strip().splitlines()[0]
        except (OSError, IndexError, UnicodeDecodeError) as err:
            raise ValueError(f"--admin-key-file {key_file}: cannot read a key from it ({err})") from None
    return os.environ.get(ADMIN_KEY_ENV) or None


def default_log_path(repo: Path) -> Path:
    """``tritonserver.log`` beside the repository: found where the repository is, not in the temp folder."""
    return repo.resolve().parent / "tritonserver.log"


class LogFileError(ValueError):
    """The server log cannot be written where ``--log-file`` (or its default) says."""


def check_log_file(path: Path) -> None:
    """Open the log for writing before the server starts, so that an unwritable default (a repository under a
    read-only mount) is one line naming ``--log-file``, not a traceback.

    Raises:
        LogFileError: naming the flag, the path and the reason.
    """
    try:
        with open(path, "ab"):
            pass
    except OSError as err:
        raise LogFileError(f"--log-file {path}: cannot write the server log there ({err.strerror}); "
                           "choose another with --log-file") from None


class _Terminated(Exception):
    """SIGTERM reached `lance-trt serve` while it could not drain (starting, restarting, already draining)."""


class _StopSignals:
    """SIGTERM as `lance-trt serve` handles it: the first one while it serves asks for a drain (`drain`); any other
    stops at once, as SIGINT does."""

    def __init__(self) -> None:
        self.serving = False
        self.drain_requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.serving and not self.drain_requested:
            self.drain_requested = True
            return
        raise _Terminated


def watch(server: TritonServer, signals: _StopSignals, poll_s: float = POLL_S) -> str | None:
    """Block while the server serves; the reason it stopped (`TritonServer.failure`), or None once SIGTERM asks for
    a drain. A dead stub is seen within ``poll_s``."""
    signals.serving = True
    try:
        while not signals.drain_requested:
            failure = server.failure()
            if failure is not None:
                return failure
            time.sleep(poll_s)
    finally:
        signals.serving = False
    return None


def supervise(server: TritonServer, signals: _StopSignals, *, max_restarts: int, backoff_s: float,
              ready_timeout: float, drain_timeout: float) -> int:
    """Serve until SIGTERM (drain, then 0), restarting a server whose process or stub died, at most ``max_restarts``
    times with doubling backoff (1 once the bound is spent). The dead server is killed at once, so readiness refuses
    connections until the restart is ready; requests in flight on it get the gRPC error UNAVAILABLE."""
    restarts = 0
    while True:
        failure = watch(server, signals)
        if failure is None:
            return drain(server, drain_timeout)
        server.kill()
        while restarts < max_restarts:
            restarts += 1
            delay = backoff_s * 2 ** (restarts - 1)
            _say(f"{failure}; server killed, readiness off; restart {restarts} of {max_restarts} in {delay:g} s")
            time.sleep(delay)
            try:
                server.restart(timeout=ready_timeout)
                break
            except ServerStartError as err:
                failure = str(err).splitlines()[0]
        else:
            _say(f"{failure}; {max_restarts} restarts spent: exiting (log {server.log_path})")
            return 1
        print(f"Lance is served again after restart {restarts}: grpc {server.grpc_url}  http {server.http_url}",
              flush=True)


def drain(server: TritonServer, timeout: float) -> int:
    """Stop without failing a request: unload ``lance`` (new requests are refused, readiness answers 400, in-flight
    and queued ones finish and keep their children), wait until it is gone or ``timeout`` passes, then stop the
    server (its own SIGTERM would unload the children at once, failing a request between two BLS calls)."""
    _say(f"SIGTERM: draining, readiness off and new requests refused; in-flight requests have {timeout:g} s "
         "(SIGINT or a second SIGTERM stops at once)")
    deadline = time.monotonic() + timeout
    try:
        server.unload(LANCE_MODEL)
    except OSError as err:
        _say(f"could not unload {LANCE_MODEL} ({err})")
        deadline = 0.0
    while server.model_state(LANCE_MODEL) in ("READY", "UNLOADING") and time.monotonic() < deadline:
        time.sleep(POLL_S)
    _say("drained: stopping tritonserver" if time.monotonic() < deadline
         else "stopping tritonserver before the drain finished")
    server.stop()
    return 0


def _say(message: str) -> None:
    print(f"lance-trt serve: {message}", file=sys.stderr, flush=True)


def serve_main(argv: list[str] | None = None) -> int:
    """`lance-trt serve`: 0 after a drain or an interrupt, 2 for a repository that cannot serve Lance, 1 when the
    server fails (to start, or more often than ``--max-restarts``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    args = build_serve_parser().parse_args(argv)
    repo: Path = args.repo
    problem = missing_lance_model(repo) if repo.is_dir() else f"{repo} does not exist"
    if problem is not None:
        _say(f"{problem}; fill it with `lance-trt repo ENGINE_DIR --checkpoint DIR` "
             f"(or `lance-trt demo` for a tiny CPU demo)")
        return 2
    problem = config_set_problem(repo, args.cpu, args.model_config_name)
    if problem is not None:
        _say(problem)
        return 2
    try:
        if min(args.max_restarts, args.restart_backoff, args.drain_timeout) < 0:
            raise ValueError("--max-restarts, --restart-backoff and --drain-timeout must be >= 0")
        options = ServerOptions(
            address=args.address, grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
            metrics_address=args.metrics_address, admin_key=admin_key(args.admin_key_file),
            restrict_health=args.restrict_health,
            cpu=args.cpu, cuda_memory_pool_byte_size=args.cuda_memory_pool_byte_size,
            pinned_memory_pool_byte_size=args.pinned_memory_pool_byte_size,
            shm_default_byte_size=args.shm_default_byte_size, shm_growth_byte_size=args.shm_growth_byte_size,
            stub_timeout_seconds=args.stub_timeout_seconds, exit_on_error=args.exit_on_error,
            model_config_name=args.model_config_name, log_verbose=args.log_verbose,
            exit_timeout_secs=args.exit_timeout_secs, extra_args=tuple(extra),
        )
        server = TritonServer(repo, options, log_path=args.log_file or default_log_path(repo))
    except (ValueError, TritonNotFoundError) as err:
        _say(str(err))
        return 2
    signals = _StopSignals()
    previous = signal.signal(signal.SIGTERM, signals)
    try:
        server.check_ports()
        check_log_file(server.log_path)
        _say(f"starting tritonserver on {repo} (log {server.log_path}); admin APIs "
             + ("behind the admin key" if options.admin_key else f"closed (set ${ADMIN_KEY_ENV} or --admin-key-file)"))
        server.start(timeout=args.ready_timeout)
        print(f"Lance is served: grpc {server.grpc_url}  http {server.http_url}  (log {server.log_path}); "
              "Ctrl-C stops", flush=True)
        return supervise(server, signals, max_restarts=args.max_restarts, backoff_s=args.restart_backoff,
                         ready_timeout=args.ready_timeout, drain_timeout=args.drain_timeout)
    except (PortInUseError, LogFileError) as err:
        _say(str(err))
        return 2
    except ServerStartError as err:
        _say(str(err))
        return 1
    except (KeyboardInterrupt, _Terminated):
        _say("stopping tritonserver at once")
        server.kill()
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
