"""runtime.serving.server against a real tritonserver: start, readiness, stop without leftovers, the CLI's checks,
and the Triton 2.51 behaviours its docstring reports (bounded queue, cancellation reaching a Python model). `lance-trt
serve` in operation (signals, drain, supervision) is tests/test_operations.py."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from runtime.serving.server import (
    CPU_CONFIG_NAME,
    ProcessHandle,
    ServerOptions,
    ServerStartError,
    TritonServer,
    build_serve_parser,
    default_log_path,
    free_port,
    listens_on,
    serve_main,
)
from tests.triton_harness import (
    REPO_ROOT,
    Stream,
    grpc_client,
    running_server,
    stream_infer,
    triton_test,
    write_lance_standin,
    write_model,
)

ECHO_CONFIG = """backend: "python"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
ECHO_PY = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("Y", 2 * pb_utils.get_input_tensor_by_name(r, "X").as_numpy())]) for r in requests]
"""

# A decoupled model whose execute blocks for DUR seconds, as lance's loop does, polling for cancellation.
SLEEPER_CONFIG = """backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "DUR" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "T" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
SLEEPER_QUEUE = "dynamic_batching { default_queue_policy { max_queue_size: 2 } }\n"
SLEEPER_PY = """
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            duration = float(pb_utils.get_input_tensor_by_name(request, "DUR").as_numpy()[0])
            name, t0 = request.request_id(), time.monotonic()
            pb_utils.Logger.log_info(f"sleeper {name} start")
            while time.monotonic() - t0 < duration:
                if request.is_cancelled() or sender.is_cancelled():
                    pb_utils.Logger.log_info(f"sleeper {name} cancelled request={request.is_cancelled()} "
                                             f"sender={sender.is_cancelled()}")
                    break
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("T", np.array([time.monotonic() - t0], np.float32))]))
                time.sleep(0.02)
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""
FAILING_PY = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("initialize failed on purpose 4711")

    def execute(self, requests):
        return None
"""


def _duration(seconds: float) -> dict[str, np.ndarray]:
    return {"DUR": np.array([seconds], np.float32)}


# --- without a server ------------------------------------------------------------------------------------------


def test_missing_tritonserver_names_the_install_command() -> None:
    # -S: no site-packages, so no nvidia-pytriton; an empty PATH: no tritonserver there either
    code = ("from runtime.serving.server import find_tritonserver\n"
            "try:\n    find_tritonserver()\nexcept FileNotFoundError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO_ROOT, env={"PATH": "/nonexistent"},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "pip install 'lance-trt[serve]'" in out.stdout


def test_server_arguments() -> None:
    gpu = ServerOptions().arguments(8001, 8000, 8002)
    assert {"--grpc-address=127.0.0.1", "--grpc-port=8001", "--http-address=127.0.0.1", "--http-port=8000",
            "--metrics-address=127.0.0.1", "--metrics-port=8002", "--exit-on-error=true", "--exit-timeout-secs=30",
            "--cuda-memory-pool-byte-size=0:536870912", "--pinned-memory-pool-byte-size=268435456",
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
            "--backend-config=python,stub-timeout-seconds=300", "--log-verbose=0"} <= set(gpu)
    assert not any(a.startswith("--model-config-name") for a in gpu)
    cpu = ServerOptions(cpu=True, address="0.0.0.0", exit_on_error=False, extra_args=("--strict-readiness=false",))
    args = cpu.arguments(1, 2, 3)
    assert f"--model-config-name={CPU_CONFIG_NAME}" in args and "--pinned-memory-pool-byte-size=0" in args
    assert "--grpc-address=0.0.0.0" in args and "--exit-on-error=false" in args
    assert not any(a.startswith("--cuda-memory-pool-byte-size") for a in args)
    assert args[-1] == "--strict-readiness=false"
    assert "--model-config-name=h100" in ServerOptions(model_config_name="h100").arguments(1, 2, 3)


@pytest.mark.parametrize("bad", [dict(grpc_port=70000), dict(shm_default_byte_size=0), dict(log_verbose=-1),
                                 dict(model_config_name="a b"), dict(stub_timeout_seconds=0)])
def test_server_options_reject(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        ServerOptions(**bad)


def test_serve_parser() -> None:
    args = build_serve_parser().parse_args(["--cpu", "--shm-default-byte-size", "64M", "--cuda-memory-pool-byte-size",
                                            "1GiB", "--no-exit-on-error", "--grpc-port", "9001"])
    assert args.cpu and not args.exit_on_error and args.grpc_port == 9001 and args.http_port == 8000
    assert (args.shm_default_byte_size, args.cuda_memory_pool_byte_size) == (64 << 20, 1 << 30)
    assert args.repo == Path("triton_repo")
    assert (args.max_restarts, args.restart_backoff, args.drain_timeout) == (3, 1.0, 120.0)
    assert "--model-control-mode=explicit" in ServerOptions().arguments(1, 2, 3)  # serve drains by unloading lance
    for bad in (["--grpc-port", "0"], ["--shm-growth-byte-size", "lots"]):
        with pytest.raises(SystemExit):
            build_serve_parser().parse_args(bad)


@pytest.mark.parametrize("layout", ["missing", "empty", "config_only"])
def test_unpopulated_repo_gets_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str) -> None:
    repo = tmp_path / "triton_repo"
    if layout != "missing":
        repo.mkdir()
    if layout == "config_only":
        write_model(repo, "echo", ECHO_CONFIG, ECHO_PY)
        (repo / "lance").mkdir()
        (repo / "lance" / "config.pbtxt").write_text("")
    assert serve_main(["--repo", str(repo)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "`lance-trt repo ENGINE_DIR --checkpoint DIR`" in err and "`lance-trt demo`" in err and str(repo) in err


def test_admin_arguments() -> None:
    """The admin APIs are restricted on both protocols; health joins them only when asked."""
    key = "k" * 24
    args = ServerOptions(address="0.0.0.0").arguments(1, 2, 3, admin_key=key)
    apis = "model-repository,model-config,logging,trace,statistics,shared-memory"
    assert f"--http-restricted-api={apis}:lance-admin-key={key}" in args
    assert f"--grpc-restricted-protocol={apis}:lance-admin-key={key}" in args
    assert "--metrics-address=127.0.0.1" in args and "--http-address=0.0.0.0" in args   # metrics stay on loopback
    health = ServerOptions(restrict_health=True).arguments(1, 2, 3, admin_key=key)
    assert f"--http-restricted-api={apis},health:lance-admin-key={key}" in health
    with pytest.raises(ValueError, match="admin_key"):
        ServerOptions(admin_key="short")


def test_admin_key_from_file_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.serving.server import admin_key

    monkeypatch.delenv("LANCE_ADMIN_KEY", raising=False)
    assert admin_key(None) is None
    monkeypatch.setenv("LANCE_ADMIN_KEY", "from-the-environment-0123")
    assert admin_key(None) == "from-the-environment-0123"
    (tmp_path / "key").write_text("from-a-file-0123456789\n")
    assert admin_key(tmp_path / "key") == "from-a-file-0123456789"
    with pytest.raises(ValueError, match="--admin-key-file"):
        admin_key(tmp_path / "missing")


@pytest.mark.parametrize("option", ["--grpc-port", "--http-port", "--metrics-port"])
def test_taken_port_is_refused_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str) -> None:
    """Another listener on a port: one line naming the option, exit 2, and no tritonserver started (it would exit
    with "Socket already in use" while the other listener answered the readiness polls)."""
    write_lance_standin(tmp_path / "repo")
    ports = {name: free_port() for name in ("--grpc-port", "--http-port", "--metrics-port")}
    with socket.socket() as other:
        other.bind(("127.0.0.1", ports[option]))
        other.listen()
        argv = ["--repo", str(tmp_path / "repo"), "--cpu", *(a for item in ports.items() for a in map(str, item))]
        assert serve_main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"lance-trt serve: {option} {ports[option]}: 127.0.0.1:{ports[option]} is already in use (another "
                   "server?); stop it or choose another port\n")
    assert not (tmp_path / "tritonserver.log").exists()


def test_listens_on_tells_processes_apart() -> None:
    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert listens_on(os.getpid(), port) is True
        other = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert other.stdout.readline() == "up\n"       # past exec: its /proc/<pid>/fd is readable
            assert listens_on(other.pid, port) is False
        finally:
            other.kill()
            other.wait()
            other.stdout.close()
    assert listens_on(os.getpid(), port) is False


def test_serve_logs_beside_the_repository(tmp_path: Path) -> None:
    assert default_log_path(tmp_path / "triton_repo") == tmp_path.resolve() / "tritonserver.log"
    assert build_serve_parser().parse_args([]).log_file is None   # None means default_log_path, not the temp folder
    assert "default: tritonserver.log beside the repository" in " ".join(build_serve_parser().format_help().split())


def test_unwritable_log_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A log that cannot be written (a repository under a read-only mount, a missing folder) is refused before the
    server starts: one line naming --log-file, exit 2, no traceback."""
    write_lance_standin(tmp_path / "repo")
    log_file = tmp_path / "no such folder" / "server.log"
    ports = [a for option in ("--grpc-port", "--http-port", "--metrics-port") for a in (option, str(free_port()))]
    assert serve_main(["--repo", str(tmp_path / "repo"), "--cpu", *ports, "--log-file", str(log_file)]) == 2
    err = capsys.readouterr().err
    assert err == (f"lance-trt serve: --log-file {log_file}: cannot write the server log there (No such file or "
                   "directory); choose another with --log-file\n")


def test_endpoints_follow_the_allow_flags(tmp_path: Path) -> None:
    """The endpoints probed before the start and required at readiness: metrics on its own address, and none that
    an extra argument turns off (a server without metrics must still become ready)."""
    options = ServerOptions(address="0.0.0.0", grpc_port=1001, http_port=1002, metrics_port=1003)
    assert TritonServer(tmp_path, options).endpoints() == [
        ("--grpc-port", "0.0.0.0", 1001), ("--http-port", "0.0.0.0", 1002), ("--metrics-port", "127.0.0.1", 1003)]
    off = ServerOptions(grpc_port=1001, http_port=1002, metrics_port=1003,
                        extra_args=("--allow-metrics=false", "--allow-grpc", "false", "--allow-gpu-metrics=false"))
    assert [option for option, _, _ in TritonServer(tmp_path, off).endpoints()] == ["--http-port"]


# --- a real server ---------------------------------------------------------------------------------------------


def _http_status(url: str, headers: dict[str, str], data: bytes | None = None) -> int:
    request = urllib.request.Request(url, headers=headers, data=data)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@triton_test
def test_admin_apis_closed_without_the_key(tmp_path: Path) -> None:
    """Config, repository, statistics and logging answer 403 (HTTP) or an error status (gRPC) without the key and
    work with it; health and inference stay open."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    write_model(tmp_path / "repo", "echo", ECHO_CONFIG, ECHO_PY)
    key = "operator-key-0123456789"
    with running_server(tmp_path / "repo", admin_key=key) as server:
        admin, none = {"lance-admin-key": key}, {}
        wrong = {"lance-admin-key": "not-the-key-0123456789"}
        for path, data in (("/v2/models/echo/config", None), ("/v2/repository/index", b"{}"),
                           ("/v2/models/echo/stats", None), ("/v2/logging", b'{"log_verbose_level": 1}')):
            assert _http_status(server.http_url + path, none, data) == 403, path
            assert _http_status(server.http_url + path, wrong, data) == 403, path
            assert _http_status(server.http_url + path, admin, data) == 200, path
        assert _http_status(server.http_url + "/v2/health/ready", none) == 200
        client = grpc_client(server)
        try:
            with pytest.raises(InferenceServerException, match="restricted"):
                client.get_model_config("echo")
            with pytest.raises(InferenceServerException, match="restricted"):
                client.get_inference_statistics("echo")
            assert client.get_model_config("echo", headers=server.admin_grpc_headers).config.name == "echo"
            with pytest.raises(InferenceServerException, match="restricted"):
                client.get_model_config("echo", headers=admin)  # the HTTP header name is not the gRPC one
            x = grpcclient.InferInput("X", [2], "FP32")
            x.set_data_from_numpy(np.array([1.0, 2.0], np.float32))
            np.testing.assert_array_equal(client.infer("echo", [x]).as_numpy("Y"), [2.0, 4.0])
        finally:
            client.close()


@triton_test
def test_restricted_health_still_starts(tmp_path: Path) -> None:
    """With health behind the key too, the launcher's own readiness poll sends it; anonymous polls get 403."""
    write_model(tmp_path / "repo", "echo", ECHO_CONFIG, ECHO_PY)
    with running_server(tmp_path / "repo", restrict_health=True) as server:
        assert _http_status(server.http_url + "/v2/health/ready", {}) == 403
        assert _http_status(server.http_url + "/v2/health/ready", server.admin_headers) == 200


@triton_test
def test_start_ready_stop(tmp_path: Path) -> None:
    write_model(tmp_path / "repo", "echo", ECHO_CONFIG, ECHO_PY)
    with running_server(tmp_path / "repo") as server:
        client = grpc_client(server)
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("echo")
        if "pytriton" in str(server.binary):
            assert client.get_server_metadata().version == "2.51.0"
        with urllib.request.urlopen(f"{server.http_url}/v2/health/ready", timeout=5) as response:
            assert response.status == 200
        import tritonclient.grpc as grpcclient

        x = grpcclient.InferInput("X", [3], "FP32")
        x.set_data_from_numpy(np.array([1.0, 2.0, 3.0], np.float32))
        np.testing.assert_array_equal(client.infer("echo", [x]).as_numpy("Y"), [2.0, 4.0, 6.0])
        client.close()
        stubs = server.children()
        assert len(stubs) == 1 and stubs[0].alive()
        backend_dir = Path(next(a for a in server.process.args if a.startswith("--backend-directory=")).split("=")[1])
        assert (backend_dir / "python" / "triton_python_backend_stub").exists()
        assert server.log_path.read_text().count("successfully loaded 'echo'") == 1
    assert server.process.returncode == 0  # SIGTERM: a graceful exit
    if "pytriton" in str(server.binary):
        assert not backend_dir.exists()  # the symlink folder is removed
    assert server.stop() == 0  # a second stop is harmless


@triton_test
def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    write_model(tmp_path / "repo", "broken", ECHO_CONFIG, FAILING_PY)
    server = TritonServer(tmp_path / "repo", ServerOptions(cpu=True), log_path=tmp_path / "log.txt")
    with pytest.raises(ServerStartError, match="initialize failed on purpose 4711"):
        server.start(timeout=120)
    assert server.process.returncode not in (None, 0)
    assert ProcessHandle.of(server.pid) is None
    assert not server.children() and not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))


class _NoPortCheck(TritonServer):
    """A server whose up-front port check is skipped: the race where another process takes a port after the check
    and before tritonserver binds it, which only the readiness poll can catch."""

    def check_ports(self) -> None:
        pass


class _AlwaysReady(http.server.BaseHTTPRequestHandler):
    """Another server on the HTTP port that answers every /v2/health/ready with 200."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@triton_test
@pytest.mark.parametrize("taken", ["http_port", "metrics_port"])
def test_port_taken_after_the_check_is_not_ready(tmp_path: Path, taken: str) -> None:
    """tritonserver exits with "Socket already in use": start() raises instead of reporting ready, whether the HTTP
    port belongs to another server that answers /v2/health/ready or the metrics port (opened after HTTP answers)
    is taken; no stub and no /dev/shm region of the server is left."""
    write_model(tmp_path / "repo", "echo", ECHO_CONFIG, ECHO_PY)
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AlwaysReady)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        server = _NoPortCheck(tmp_path / "repo", ServerOptions(cpu=True, **{taken: other.server_address[1]}),
                              log_path=tmp_path / "log.txt")
        with pytest.raises(ServerStartError, match="before it was ready") as info:
            server.start(timeout=120)
    finally:
        other.shutdown()
        other.server_close()
    assert "already in use" in str(info.value)
    assert server.process.returncode not in (None, 0)
    assert not server.children() and not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))


@pytest.fixture(scope="module")
def sleeper(tmp_path_factory: pytest.TempPathFactory):
    """A server whose `sleeper` has its queue bound only in configs/cpu.pbtxt: `--cpu` must pick that file, while
    `echo`, which has no configs/ folder, falls back to config.pbtxt."""
    repo = tmp_path_factory.mktemp("queue") / "repo"
    write_model(repo, "sleeper", SLEEPER_CONFIG, SLEEPER_PY, configs={CPU_CONFIG_NAME: SLEEPER_CONFIG + SLEEPER_QUEUE})
    write_model(repo, "echo", ECHO_CONFIG, ECHO_PY)
    with running_server(repo) as server:
        yield server


def _wait_running(stream: Stream) -> None:
    """Block until the request's execute has sent its first response."""
    assert stream.collect(timeout=20, first_response=True).responses, "the request never started"


@triton_test
def test_bounded_queue_rejects_excess(sleeper: TritonServer) -> None:
    running = Stream(sleeper.grpc_url, "sleeper", _duration(1.5), request_id="run")
    waiting: list[Stream] = []
    try:
        _wait_running(running)
        waiting += [Stream(sleeper.grpc_url, "sleeper", _duration(0.1), request_id=f"q{i}") for i in range(4)]
        outcomes = [s.collect(timeout=30) for s in waiting]
        assert running.collect(timeout=30).final_at is not None
    finally:
        for s in [running, *waiting]:
            s.close()
    rejected = [o for o in outcomes if o.error is not None]
    served = [o for o in outcomes if o.final_at is not None]
    assert len(rejected) == 2 and len(served) == 2, outcomes
    for o in rejected:
        at, status, message = o.error
        assert "Exceeds maximum queue size" in message
        assert status is None  # 2.51 sends it as an in-stream error without a gRPC code
    # the refusals come at once, before any queued request is served (those waited for the running one): an order
    # of events, not a wall-clock bound
    assert max(o.error[0] for o in rejected) < min(o.final_at for o in served)


@triton_test
def test_cancel_reaches_running_and_queued_requests(sleeper: TritonServer) -> None:
    running = Stream(sleeper.grpc_url, "sleeper", _duration(30.0), request_id="long")
    streams = [running]
    try:
        _wait_running(running)
        queued = Stream(sleeper.grpc_url, "sleeper", _duration(30.0), request_id="dropped")
        after = Stream(sleeper.grpc_url, "sleeper", _duration(0.1), request_id="after")
        streams += [queued, after]
        time.sleep(0.2)
        queued.cancel()  # still waiting in the queue
        running.cancel()  # inside execute
        outcome = after.collect(timeout=20)   # well inside the 30 s the running request would otherwise take
        assert outcome.final_at is not None, outcome
    finally:
        for s in streams:
            s.close()
    log = sleeper.log_path.read_text()
    assert "sleeper long cancelled request=True sender=True" in log
    assert "sleeper dropped start" not in log
    assert "sleeper after start" in log


@triton_test
def test_cpu_mode_picks_configs_cpu(sleeper: TritonServer) -> None:
    client = grpc_client(sleeper)
    try:
        admin = sleeper.admin_grpc_headers
        config = client.get_model_config("sleeper", headers=admin).config
        assert config.dynamic_batching.default_queue_policy.max_queue_size == 2
        assert client.is_model_ready("echo")  # no configs/ folder: config.pbtxt
        assert not client.get_model_config("echo", headers=admin).config.HasField("dynamic_batching")
    finally:
        client.close()
    outcome = stream_infer(sleeper.grpc_url, "sleeper", _duration(0.05))
    assert outcome.error is None and outcome.final_at is not None and outcome.responses


@triton_test
def test_stop_outlasts_a_rejected_then_cancelled_stream(tmp_path: Path) -> None:
    """Triton 2.51 keeps a model referenced after a stream whose request the full queue refused is cancelled (as a
    client that crashes after the refusal does): graceful shutdown then waits the whole --exit-timeout-secs. stop()
    must still end everything."""
    write_model(tmp_path / "repo", "sleeper", SLEEPER_CONFIG + SLEEPER_QUEUE.replace("2", "1"), SLEEPER_PY)
    with running_server(tmp_path / "repo", exit_timeout_secs=2) as server:
        running = Stream(server.grpc_url, "sleeper", _duration(0.5), request_id="run")
        _wait_running(running)
        queued = Stream(server.grpc_url, "sleeper", _duration(0.1), request_id="queued")
        refused = Stream(server.grpc_url, "sleeper", _duration(0.1), request_id="refused")
        assert "Exceeds maximum queue size" in refused.collect(timeout=10).error[2]
        refused.cancel()
        for stream in (running, queued):
            assert stream.collect(timeout=10).final_at is not None
            stream.close()
    # running_server's exit has stopped the server and checked for leftover processes and shared memory
    if "pytriton" in str(server.binary):
        assert "Exit timeout expired" in server.log_path.read_text()
