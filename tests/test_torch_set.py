"""The torch engine set (`lance-trt repo --engine-set torch`, GPU serving without TensorRT), on this CPU machine.

What needs no GPU is run for real: the load-time warm-up requests, the refusals of `lance-trt serve` and of
tritonserver itself where no GPU exists, and the whole serving path of the set -- model ``lance`` owning every engine,
warm-up at load, progress, cancellation, metrics -- through a real tritonserver and gRPC, on a CPU instance running the
plain modules in fp32 (`benchmarks.gpu_serving --tiny --device cpu`, the script whose GPU figures are in
docs/benchmarks.md). The fast CUDA engines themselves are tested on a GPU (tests/test_cuda_runner.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.pipeline.scheduler import cfg_active, make_schedule
from runtime.pipeline.warmup import warmup_requests, warmup_steps
from runtime.serving.repository import write_repository
from runtime.serving.server import ServerOptions, ServerStartError, TritonServer, serve_main
from runtime.spec import constants
from tests.triton_harness import triton_test


def test_warmup_runs_both_cfg_layouts_at_each_size() -> None:
    def layouts(steps: int) -> set[bool]:
        return {cfg_active(t, constants.CFG_INTERVAL) for t in make_schedule(steps).timesteps[:-1]}

    steps = warmup_steps()
    assert layouts(steps) == {True, False} and all(len(layouts(n)) == 1 for n in range(1, steps))
    requests = warmup_requests([(512, 768), (1024, 1024)])
    assert [(r.task, r.height, r.width) for r in requests if r.task != "x2t"] == [
        ("t2i", 512, 768), ("edit", 512, 768), ("t2i", 1024, 1024), ("edit", 1024, 1024)]
    assert [r.task for r in requests].count("x2t") == 1
    for request in requests:
        request.validate()
        assert request.steps == steps or request.task == "x2t"


@pytest.fixture(scope="module")
def torch_repo(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("torch_set") / "repo"
    write_repository([], tiny_checkpoint, out, engine_set="torch")
    return out


@pytest.mark.skipif(Path("/proc/driver/nvidia/gpus").is_dir(), reason="this machine has an NVIDIA GPU")
def test_serve_refuses_the_gpu_set_without_a_gpu(torch_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main(["--repo", str(torch_repo)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "runs lance on a GPU (KIND_GPU) and this machine shows no NVIDIA GPU" in err and "--cpu" in err


def test_serve_cpu_refuses_a_repository_without_a_cpu_set(torch_repo: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main(["--repo", str(torch_repo), "--cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--cpu: this repository has no CPU set ({torch_repo / 'lance/configs/cpu.pbtxt'} is missing)" in err
    assert "`lance-trt repo --engine-set torch` writes it" in err


@triton_test
@pytest.mark.skipif(Path("/proc/driver/nvidia/gpus").is_dir(), reason="this machine has an NVIDIA GPU")
def test_tritonserver_itself_refuses_the_gpu_set_without_a_gpu(torch_repo: Path, tmp_path: Path) -> None:
    """Started directly (not through `lance-trt serve`), tritonserver fails the load and exits, naming the GPU id."""
    server = TritonServer(torch_repo, ServerOptions(), log_path=tmp_path / "server.log")
    with pytest.raises(ServerStartError, match="exited with code 1 before it was ready"):
        server.start(timeout=120)
    assert "specifies invalid or unsupported gpu id 0" in (tmp_path / "server.log").read_text()


@triton_test
@pytest.mark.slow
def test_served_torch_set_matches_in_process(tmp_path: Path) -> None:
    """The torch set through tritonserver and gRPC against the in-process pipeline on the same engines: t2i, x2t and
    edit byte-identical; 2 concurrent clients get the bytes of 2 sequential requests; a cancel at step 1 stops the
    loop within one step and the next request is exact; the metrics port shows the load phases, per-stage seconds and
    the outcomes."""
    from benchmarks.gpu_serving import main

    out = tmp_path / "serving.json"
    assert main(["--tiny", "--device", "cpu", "--work", str(tmp_path / "work"), "--size", "256", "--steps", "3",
                 "--repeat", "1", "--max-new-tokens", "4", "--cancel-at", "1", "--memory-requests", "2",
                 "--concurrency", "2", "--out", str(out)]) == 0
    served = json.loads(out.read_text())["serve"]
    assert [c["identical"] for c in served["t2i"]["vs_inprocess"]] == [True, True] and not served["t2i"]["errors"]
    assert served["x2t"]["vs_inprocess"]["identical"] and served["edit"]["vs_inprocess"]["identical"]
    assert served["concurrency"]["identical"] == {"1": True, "2": True} and not served["concurrency"]["errors"]
    cancel = served["cancel"]
    assert cancel["client_cancelled_at_step"] == 1 and 0 <= cancel["steps_after_cancel"] <= 1
    assert cancel["next_request"]["identical"]
    assert all(phase > 0 for phase in served["load"]["phases_s"].values())
    metrics = "\n".join(served["metrics"])
    for line in ('lance_requests_total{outcome="cancelled",task="t2i"} 1',
                 'lance_requests_total{outcome="ok",task="x2t"} 1',
                 'lance_stage_seconds_total{stage="denoise",task="t2i"}',
                 'lance_stage_seconds_total{stage="vit",task="edit"}',
                 'lance_stage_seconds_total{stage="progress_ipc",task="t2i"}',
                 'lance_load_seconds{phase="warmup"}'):
        assert line in metrics, line
