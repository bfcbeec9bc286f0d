"""`lance-trt serve` in operation, against a real tritonserver: stop signals, the drain on SIGTERM, supervision of the
server and its Python stubs (kill -9, bounded restarts), and no process or /dev/shm region left after any stop.

Each test runs `serve_main` in its own process, as an orchestrator would, and checks what a client and a probe see:
readiness over HTTP, results over gRPC, the server's processes and shared memory in /proc and /dev/shm.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from runtime.serving.repository import ServingTarget, write_repository
from runtime.serving.server import ProcessHandle, descendants, free_port
from runtime.spec.request import GenerationRequest, request_to_tensors
from tests.triton_harness import REPO_ROOT, SHM_PREFIX, Stream, triton_test, write_lance_standin

SIZE = 256
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
READY_PATHS = ("/v2/health/ready", "/v2/models/lance/ready")


class Serve:
    """`lance-trt serve --cpu` in a subprocess on free loopback ports; stdout lines are collected by a thread."""

    def __init__(self, repo: Path, log: Path, *flags: str, ports: list[int] | None = None) -> None:
        self.ports = ports or [free_port() for _ in range(3)]
        self.stderr_path = log.with_suffix(".stderr")
        command = [sys.executable, "-c", "import sys; from runtime.serving.server import serve_main; "
                   "sys.exit(serve_main())", "--repo", str(repo), "--cpu", "--grpc-port", str(self.ports[0]),
                   "--http-port", str(self.ports[1]), "--metrics-port", str(self.ports[2]), "--log-file", str(log),
                   "--exit-timeout-secs", "5", *flags]
        env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)}
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr,
                                         text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports[0]}"

    def wait_for_line(self, words: str, timeout: float = 180.0) -> str:
        """The next stdout line holding ``words``; fails when serve exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}: {self.stderr()}"
                continue
            if words in line:
                return line
        raise AssertionError(f"no line with {words!r} after {timeout} s: {self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def ready_statuses(self) -> list[int | None]:
        """HTTP status of each readiness endpoint; None for a refused connection."""
        return [_status(f"http://127.0.0.1:{self.ports[1]}{path}") for path in READY_PATHS]

    def family(self) -> tuple[list[ProcessHandle], set[str]]:
        """tritonserver and its stubs, and the stubs' /dev/shm regions (each stub gets its region as an argument)."""
        processes = descendants(self.proc.pid)
        regions = {arg for p in processes for arg in _argv(p.pid) if arg.startswith(SHM_PREFIX)}
        assert len(processes) >= 2 and regions, f"no server with stubs under serve: {processes}"
        return processes, regions

    def stub_of(self, model: str) -> ProcessHandle:
        return next(p for p in descendants(self.proc.pid) if any(a.endswith(f"/{model}/1/model.py")
                                                                 for a in _argv(p.pid)))

    def server_pid(self) -> int:
        return next(p.pid for p in descendants(self.proc.pid) if "tritonserver" in " ".join(_argv(p.pid)[:1]))

    def finish(self, timeout: float = 90.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _status(url: str) -> int | None:
    try:
        with _NO_PROXY.open(url, timeout=2.0) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def poll_until(condition, timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until ``condition()`` held, or None when ``timeout`` passed first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(interval)
    return None


def assert_gone(family: tuple[list[ProcessHandle], set[str]]) -> None:
    processes, regions = family
    assert not [p for p in processes if p.alive()], f"processes left: {processes}"
    assert not [r for r in regions if Path("/dev/shm", r).exists()], f"shared memory left: {regions}"


def t2i(seed: int, steps: int) -> dict[str, np.ndarray]:
    return request_to_tensors(GenerationRequest("t2i", "a red cube", height=SIZE, width=SIZE, steps=steps, seed=seed))


def run(url: str, inputs: dict[str, np.ndarray], timeout: float = 60.0):
    stream = Stream(url, "lance", inputs)
    try:
        return stream.collect(timeout)
    finally:
        stream.close()


def image_of(outcome) -> np.ndarray:
    assert outcome.error is None and outcome.final_at is not None, outcome.error
    return next(r["image"] for _, r in outcome.responses if "image" in r)


@pytest.fixture(scope="module")
def tiny_repo(tiny_checkpoint: Path, engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ops") / "repo"
    write_repository([engine_dir], tiny_checkpoint, out, max_queue_size=4, target=ServingTarget(None))
    return out


# --- Stop signals ----------------------------------------------------------------------------------------------


@triton_test
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_main_until_interrupt(tmp_path: Path, signum: int) -> None:
    write_lance_standin(tmp_path / "repo")
    serve = Serve(tmp_path / "repo", tmp_path / "server.log")
    try:
        line = serve.wait_for_line("Lance is served", timeout=60)
        assert f"grpc {serve.grpc_url}" in line and f"http http://127.0.0.1:{serve.ports[1]}" in line
        family = serve.family()
        serve.proc.send_signal(signum)  # SIGINT is what Ctrl-C delivers
        assert serve.finish(timeout=60) == 0
    finally:
        serve.finish(timeout=0)
    assert "stopping tritonserver" in serve.stderr() and f"(log {tmp_path / 'server.log'})" in serve.stderr()
    assert_gone(family)


@triton_test
def test_sigterm_drains_a_request_in_flight(tiny_repo: Path, tmp_path: Path) -> None:
    """SIGTERM during a 200-step request: readiness goes off, a new request is refused, the running one completes
    (its BLS calls still find the children), serve exits 0 leaving nothing, and the next start is clean."""
    serve = Serve(tiny_repo, tmp_path / "server.log")
    running = None
    try:
        serve.wait_for_line("Lance is served")
        family = serve.family()
        running = Stream(serve.grpc_url, "lance", t2i(seed=1, steps=200))
        assert running.collect(timeout=60, first_response=True).responses, "the request never started"
        serve.proc.send_signal(signal.SIGTERM)
        assert poll_until(lambda: 200 not in serve.ready_statuses(), timeout=5) is not None
        refused = run(serve.grpc_url, t2i(seed=2, steps=2), timeout=30)
        assert running.outcome.final_at is None, "the request ended before the drain could be observed"
        assert refused.error is not None and "'lance' has no available versions" in refused.error[2], refused.error
        outcome = running.collect(timeout=120)
        running.close()  # Triton holds an unloading model while a stream that used it stays open
        assert serve.finish() == 0, serve.stderr()
    finally:
        if running is not None:
            running.close()
        serve.finish(timeout=0)
    image_of(outcome)
    assert [tuple(r["progress"]) for _, r in outcome.responses if "progress" in r][-1] == (200, 200)
    assert "drained: stopping tritonserver" in serve.stderr()
    assert_gone(family)
    again = Serve(tiny_repo, tmp_path / "again.log", ports=serve.ports)
    try:
        again.wait_for_line("Lance is served")
        assert image_of(run(again.grpc_url, t2i(seed=2, steps=2))).shape == (SIZE, SIZE, 3)
        again.proc.send_signal(signal.SIGINT)
        assert again.finish() == 0
    finally:
        again.finish(timeout=0)


# --- Supervision -----------------------------------------------------------------------------------------------


@triton_test
def test_killed_lance_stub_is_noticed_and_service_restored(tiny_repo: Path, tmp_path: Path) -> None:
    """kill -9 of the `lance` stub (which Triton 2.51 neither restarts nor reports: its readiness stays 200): readiness
    refuses within 5 s, the request in flight gets an error, and after the restart results are exact again."""
    serve = Serve(tiny_repo, tmp_path / "server.log", "--max-restarts", "2", "--restart-backoff", "0.5")
    try:
        serve.wait_for_line("Lance is served")
        before = image_of(run(serve.grpc_url, t2i(seed=5, steps=2)))
        family = serve.family()
        in_flight = Stream(serve.grpc_url, "lance", t2i(seed=1, steps=200))
        try:
            assert in_flight.collect(timeout=60, first_response=True).responses
            os.kill(serve.stub_of("lance").pid, signal.SIGKILL)
            took = poll_until(lambda: all(status != 200 for status in serve.ready_statuses()), timeout=5)
            assert took is not None, f"readiness still answers 200: {serve.ready_statuses()}"
            cut = in_flight.collect(timeout=30)
        finally:
            in_flight.close()
        assert cut.error is not None and cut.final_at is None, cut
        serve.wait_for_line("Lance is served again after restart 1")
        assert serve.ready_statuses() == [200, 200]
        assert np.array_equal(image_of(run(serve.grpc_url, t2i(seed=5, steps=2))), before)
        assert_gone(family)
        restarted = serve.family()
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.finish() == 0
    finally:
        serve.finish(timeout=0)
    assert "the stub of model lance" in serve.stderr() and "restart 1 of 2" in serve.stderr()
    print(f"readiness refused {took:.2f} s after kill -9 of the lance stub; in-flight error: {cut.error}")
    assert_gone(restarted)


@triton_test
def test_killed_server_and_stub_leave_nothing_and_the_bound_ends_serve(tmp_path: Path) -> None:
    """kill -9 of tritonserver: serve restarts it (once: --max-restarts 1) without leftovers; kill -9 of a stub of
    the restarted server spends the bound: serve exits 1, again leaving no process or shared memory."""
    write_lance_standin(tmp_path / "repo")
    serve = Serve(tmp_path / "repo", tmp_path / "server.log", "--max-restarts", "1", "--restart-backoff", "0.2")
    try:
        serve.wait_for_line("Lance is served", timeout=60)
        first = serve.family()
        os.kill(serve.server_pid(), signal.SIGKILL)
        serve.wait_for_line("Lance is served again after restart 1", timeout=60)
        assert_gone(first)
        second = serve.family()
        os.kill(serve.stub_of("lance").pid, signal.SIGKILL)
        assert serve.finish(timeout=60) == 1
    finally:
        serve.finish(timeout=0)
    assert_gone(second)
    stderr = serve.stderr()
    assert "exited with code -9" in stderr and "restart 1 of 1" in stderr, stderr
    assert "the stub of model lance" in stderr and "1 restarts spent: exiting" in stderr, stderr
