"""The CFG pair inside the served ``lance`` (`lance-trt repo --engine-set torch --cfg-pair`,
`runtime.serving.cfg_partner`), on this CPU machine: the instance is rank 0, rank 1 a second process, the velocities
exchanged over gloo, all through a real tritonserver and gRPC. Between GPUs the same code runs over NCCL (measured
only where a two-GPU machine is lent: docs/benchmarks.md).

Checked: the configs written and parsed back, and their refusals; every served output within 1/255 of one process's
(t2i, edit; x2t runs on rank 0 alone and is byte-identical), concurrency, an agreed cancel that leaves the pair working;
rank 1 killed in the middle of a request: that request fails INTERNAL, the instance goes on alone (its next output
byte-identical to one process's), and nothing is left behind when the server stops.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest

from runtime.client import LanceClient, LanceClientError
from runtime.pipeline import LancePipeline
from runtime.serving.repository import ConfigError, LanceSettings, RepoError, parse_pairs, repo_main, write_repository
from runtime.spec.request import GenerationRequest
from tests.triton_harness import running_server, triton_test

T2I = dict(task="t2i", prompt="a lighthouse on a cliff at dusk", height=256, width=256, steps=8, seed=5)


def _parameters(config: Path) -> dict[str, str]:
    return dict(re.findall(r'parameters \{ key: "([^"]+)" value: \{ string_value: "([^"]*)" \} \}',
                           config.read_text()))


def test_gpus_pair_up_in_order(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    write_repository([], tiny_checkpoint, out, engine_set="torch", gpus=(0, 1, 2, 3), cfg_pair=True)
    config = (out / "lance" / "config.pbtxt").read_text()
    assert "instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0, 2 ] } ]" in config
    params = _parameters(out / "lance" / "config.pbtxt")
    assert params["cfg_pair"] == "cuda:0=cuda:1 cuda:2=cuda:3"
    settings = LanceSettings.parse("lance", params, out / "lance" / "1")
    assert settings.cfg_partner("lance", "cuda:2") == "cuda:3"
    with pytest.raises(ConfigError, match="names no partner for the instance on cuda:1"):
        settings.cfg_partner("lance", "cuda:1")
    write_repository([], tiny_checkpoint, out, engine_set="torch", gpus=(0, 1))
    assert "cfg_pair" not in _parameters(out / "lance" / "config.pbtxt")
    assert LanceSettings.parse("lance", {"engine_set": "torch"}, out / "lance" / "1").cfg_partner("lance",
                                                                                                  "cuda:0") is None


@pytest.mark.parametrize("gpus", [(0,), (0, 1, 2), (0, 0)])
def test_unpaired_gpus_are_refused(tiny_checkpoint: Path, tmp_path: Path, gpus: tuple[int, ...]) -> None:
    with pytest.raises(RepoError, match="pairs up --gpus in order: list an even number of distinct GPUs"):
        write_repository([], tiny_checkpoint, tmp_path / "repo", engine_set="torch", gpus=gpus, cfg_pair=True)


def test_cfg_pair_belongs_to_the_torch_set(tiny_checkpoint: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert repo_main([str(tmp_path), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "repo"),
                      "--cfg-pair"]) == 2
    assert "--cfg-pair is an option of the torch engine set (--engine-set torch)" in capsys.readouterr().err
    (tmp_path / "checkpoint.path").write_text(str(tiny_checkpoint))
    with pytest.raises(ConfigError, match="parameter 'cfg_pair' belongs to engine_set torch"):
        LanceSettings.parse("lance", {"engine_set": "onnxruntime", "mot_engine": "mot.onnx", "cfg_pair": "cpu=cpu"},
                            tmp_path)


@pytest.mark.parametrize("text", ["cuda:0=cuda:0", "cuda:0=cpu", "cuda:0=cuda:1 cuda:1=cuda:2", "gpu0=gpu1",
                                  "cuda:0", "cuda:0=cuda:1 cuda:0=cuda:2"])
def test_malformed_pairs_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=r"parameter 'cfg_pair' must list DEVICE=PARTNER pairs \(cuda:0=cuda:1"):
        parse_pairs("lance", "cfg_pair", text)


@pytest.fixture(scope="module")
def single_outputs(tiny_checkpoint: Path) -> dict[str, np.ndarray]:
    """One process, both branches batched: what the pair must match."""
    pipeline = LancePipeline.from_checkpoint(tiny_checkpoint, runner="torch")
    return {seed: pipeline.generate(GenerationRequest(**{**T2I, "seed": seed})).image for seed in (5, 6)}


@triton_test
@pytest.mark.slow
def test_served_pair_matches_one_process(tmp_path: Path) -> None:
    """`lance-trt bench serving --cfg-pair` on the CPU: the served pair against one process on the same engines."""
    from benchmarks.gpu_serving import main

    out = tmp_path / "serving.json"
    assert main(["--tiny", "--device", "cpu", "--cfg-pair", "--work", str(tmp_path / "work"), "--size", "256",
                 "--steps", "8", "--repeat", "1", "--max-new-tokens", "4", "--cancel-at", "2",
                 "--memory-requests", "2", "--concurrency", "2", "--out", str(out)]) == 0
    served = json.loads(out.read_text())["serve"]
    for compared in (*served["t2i"]["vs_inprocess"], served["edit"]["vs_inprocess"],
                     served["cancel"]["next_request"]):
        assert compared.get("max_abs", 0) <= 1, compared
    assert served["x2t"]["vs_inprocess"]["identical"]
    assert served["concurrency"]["identical"] == {"1": True, "2": True} and not served["concurrency"]["errors"]
    assert 0 <= served["cancel"]["steps_after_cancel"] <= 1
    log = (tmp_path / "work" / "server.log").read_text()
    assert "CFG pair ready: the conditional branch on cpu, the cfg_text branch on cpu" in log
    assert "CFG pair broken" not in log


@triton_test
@pytest.mark.slow
def test_instance_goes_on_alone_when_rank_1_dies(tiny_checkpoint: Path, tmp_path: Path,
                                                  single_outputs: dict[int, np.ndarray]) -> None:
    repo = tmp_path / "repo"
    write_repository([], tiny_checkpoint, repo, engine_set="torch", gpus=None, precision="fp32", cfg_pair=True,
                     warmup_sizes=[(256, 256)])
    log_path = tmp_path / "server.log"
    with running_server(repo, log_path=log_path) as server:
        match = re.search(r"CFG partner: rank 1 \(pid (\d+)\) joined on cpu", log_path.read_text())
        assert match, "rank 1 never joined"
        rank1 = int(match[1])
        client = LanceClient(server.grpc_url)
        paired = client.generate(**T2I, timeout=120).image
        assert np.abs(paired.astype(int) - single_outputs[5].astype(int)).max() <= 1

        def kill_rank1(done: int, total: int) -> None:
            if done == 1:
                os.kill(rank1, signal.SIGKILL)

        with pytest.raises(LanceClientError) as failed:
            client.generate(**{**T2I, "seed": 6}, on_progress=kill_rank1, timeout=120)
        # an INTERNAL error (a decoupled stream's errors carry no gRPC code), one line that says what happened
        assert failed.value.message.startswith("PartnerError: the CFG pair failed during the request (RuntimeError: ")
        assert failed.value.message.endswith("the instance goes on alone") and "\n" not in failed.value.message
        alone = client.generate(**{**T2I, "seed": 6}, timeout=120).image
        assert np.array_equal(alone, single_outputs[6]), "alone, the instance must batch both branches as one process"
        assert re.search(r"CFG pair broken: rank 0 failed during the request .*; the instance on cpu goes on alone",
                         log_path.read_text())
        assert not Path(f"/proc/{rank1}").exists()
