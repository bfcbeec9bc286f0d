"""CFG pairs in the served ``lance`` (``lance-trt repo --engine-set torch --cfg-pair``): each request's cfg_text
branch on a second device.

The Triton instance is rank 0 (`runtime.pipeline.cfg_pair.COND`). `CfgPartner` starts rank 1 as a process of its own
(``python -m runtime.serving.cfg_partner FD``) on the partner device; both join one process group (NCCL between GPUs,
gloo between CPU processes) and load the same checkpoint at the same time. `PairedPipeline.generate` hands each paired
request (`LancePipeline.pairs`: a task that denoises, with CFG on) to rank 1 over a local socket, runs it itself, and
then reads rank 1's outcome. Requests without CFG (x2t, CFG scale 1) run on rank 0 alone. Rank 1 runs nothing on its
own: the load-time warm-up reaches it as rank 0's requests do.

Failures. A refused or a cancelled request ends the same way on both ranks (the same validation, and the cancellation
check that both ranks agree on, `CfgPair.agreed`). Any other failure of either rank, or rank 1's exit, breaks the
pair: rank 1 is stopped, the request in flight fails, and the instance goes on alone, both branches batched on its own
device, saying so in the log. A collective waits at most `PAIR_TIMEOUT` for the other rank; between GPUs NCCL's
watchdog acts on that timeout (it may end the process, and `lance-trt serve` then reports the dead stub).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from runtime.pipeline import LancePipeline
from runtime.pipeline.cfg_pair import CFG_TEXT, COND, CfgPair
from runtime.pipeline.core import PRECISION_DTYPES, CancelCheck, ProgressCallback
from runtime.serving.repository import LanceSettings
from runtime.spec.request import Cancelled, GenerationRequest, GenerationResult, RequestError, one_line

logger = logging.getLogger(__name__)

PAIR_TIMEOUT = datetime.timedelta(minutes=5)
"""How long a collective, or rank 0 reading rank 1's outcome, waits for the other rank."""
LOAD_TIMEOUT_S = 1800.0
"""How long rank 0 waits for rank 1 to load the checkpoint and build its engines."""
STOP_TIMEOUT_S = 30.0


class PartnerError(RuntimeError):
    """Rank 1 failed, exited or did not answer; the message says which and on what device."""


def torch_set_pipeline(settings: LanceSettings, device: torch.device,
                       cfg_pair: CfgPair | None = None) -> LancePipeline:
    """The torch set's pipeline: every engine in this process, built from the checkpoint on ``device``."""
    return LancePipeline.from_checkpoint(settings.checkpoint, runner="torch", device=device,
                                         dtype=PRECISION_DTYPES[settings.precision], fp8_gen=settings.fp8_gen,
                                         fp8_fast_accum=settings.fp8_fast_accum, video=settings.video,
                                         cfg_pair=cfg_pair)


def join_pair(rank: int, device: torch.device, store: dist.Store) -> None:
    """Join the two-rank process group: NCCL between GPUs (NVLink multicast off, which the pair does not need and
    which needs fabric set-up), gloo between CPU processes."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=2, timeout=PAIR_TIMEOUT)


def _python() -> str:
    """An interpreter of this environment: inside a Triton stub ``sys.executable`` may name the stub, not Python."""
    for candidate in (sys.executable, str(Path(sys.prefix) / "bin" / "python3")):
        if candidate and Path(candidate).name.startswith("python") and os.access(candidate, os.X_OK):
            return candidate
    raise PartnerError(f"no Python interpreter to start the CFG partner with (sys.executable {sys.executable!r}, "
                       f"sys.prefix {sys.prefix!r})")


class CfgPartner:
    """Rank 0's handle on rank 1: the process, the socket to it and the process group they share."""

    def __init__(self, settings: LanceSettings, device: torch.device) -> None:
        """Start rank 1 on ``device`` and join the process group with it; returns while rank 1 loads (`wait_ready`).

        Raises:
            PartnerError: rank 1 exited before it joined.
        """
        self.device = device
        store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=PAIR_TIMEOUT, wait_for_workers=False)
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")) if p)}
        self.process = subprocess.Popen([_python(), "-m", "runtime.serving.cfg_partner", str(theirs.fileno())],
                                        pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self.connection = Connection(ours.detach())
        self.connection.send((settings, str(device), store.port))
        try:
            self.expect("joining", timeout=PAIR_TIMEOUT.total_seconds())
            join_pair(COND, device, store)
        except BaseException:
            self.stop()
            raise
        logger.info("CFG partner: rank 1 (pid %d) joined on %s", self.process.pid, device)

    def receive(self, timeout: float) -> tuple[str, Any]:
        """Rank 1's next message, ``(kind, detail)``.

        Raises:
            PartnerError: rank 1 exited, or sent nothing within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not self.connection.poll(1.0):
            if self.process.poll() is not None:
                break
            if time.monotonic() > deadline:
                raise PartnerError(f"the CFG partner on {self.device} sent nothing for {timeout:.0f} s")
        try:
            return self.connection.recv()
        except (EOFError, OSError):
            raise PartnerError(f"the CFG partner on {self.device} exited (code {self.process.wait()})") from None

    def expect(self, kind: str, timeout: float) -> Any:
        """The detail of rank 1's next message, which must be ``kind``; a ``failed`` message raises its text."""
        got, detail = self.receive(timeout)
        if got != kind:
            raise PartnerError(f"the CFG partner on {self.device} {'failed: ' if got == 'failed' else 'sent '}"
                               f"{detail if got == 'failed' else repr(got)}")
        return detail

    def submit(self, request: GenerationRequest) -> None:
        """Hand rank 1 a request to run beside rank 0.

        Raises:
            PartnerError: rank 1 has exited.
        """
        if self.process.poll() is not None:
            raise PartnerError(f"the CFG partner on {self.device} exited (code {self.process.returncode})")
        try:
            self.connection.send(("request", request))
        except OSError as err:
            raise PartnerError(f"the CFG partner on {self.device} is gone ({err})") from None

    def stop(self) -> None:
        """Ask rank 1 to leave (kill it after `STOP_TIMEOUT_S`), close the socket and leave the process group."""
        try:
            self.connection.send(None)
        except OSError:
            pass
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.connection.close()
        if dist.is_initialized():
            dist.destroy_process_group()


OUTCOMES = {RequestError: "refused", Cancelled: "cancelled"}
"""The outcomes that both ranks reach together, by the exception rank 0 raises; otherwise ``ok`` or ``failed``."""


class PairedPipeline:
    """Rank 0 of a CFG pair: `generate` as `LancePipeline.generate`, with each paired request run on both ranks."""

    def __init__(self, pipeline: LancePipeline, partner: CfgPartner) -> None:
        self.pipeline = pipeline
        self.partner: CfgPartner | None = partner
        """None once the pair is broken: the instance then runs alone."""

    @classmethod
    def start(cls, settings: LanceSettings, device: torch.device, partner_device: torch.device) -> "PairedPipeline":
        """Start rank 1 on ``partner_device``, load rank 0 here meanwhile, and return once both have loaded.

        Raises:
            PartnerError: rank 1 failed to start or to load (its one-line reason).
        """
        partner = CfgPartner(settings, partner_device)
        try:
            pipeline = torch_set_pipeline(settings, device, CfgPair(COND))
            partner.expect("ready", timeout=LOAD_TIMEOUT_S)
        except BaseException:
            partner.stop()
            raise
        logger.info("CFG pair ready: the conditional branch on %s, the cfg_text branch on %s", device, partner_device)
        return cls(pipeline, partner)

    def generate(self, request: GenerationRequest, on_progress: ProgressCallback | None = None,
                 is_cancelled: CancelCheck | None = None) -> GenerationResult:
        """`LancePipeline.generate`; a paired request runs on both ranks, the others here alone."""
        request.validate()                    # a refusal here never reaches rank 1
        self.pipeline.check_task(request)
        if not self.pipeline.pairs(request):   # no CFG, or the pair is broken (`go_alone` clears cfg_pair)
            return self.pipeline.generate(request, on_progress, is_cancelled)
        try:
            self.partner.submit(request)
        except PartnerError as err:
            self.go_alone(str(err))             # this request and the next ones run here, both branches batched
            return self.pipeline.generate(request, on_progress, is_cancelled)
        try:
            result = self.pipeline.generate(request, on_progress, is_cancelled)
        except tuple(OUTCOMES) as err:
            self.settle(OUTCOMES[type(err)])
            raise
        except Exception as err:
            self.go_alone(f"rank 0 failed during the request ({one_line(err)})")
            raise PartnerError(f"the CFG pair failed during the request ({one_line(err)}); the instance goes on "
                               "alone") from err
        self.settle("ok")
        return result

    def settle(self, expected: str) -> None:
        """Read rank 1's outcome of the request both ran; one that differs from rank 0's breaks the pair."""
        try:
            outcome, detail = self.partner.receive(PAIR_TIMEOUT.total_seconds())
        except PartnerError as err:
            self.go_alone(str(err))
            return
        if outcome != expected:
            self.go_alone(f"rank 1 ended the request {outcome} ({detail}), rank 0 {expected}")

    def go_alone(self, reason: str) -> None:
        """Break the pair: stop rank 1; this instance then runs both branches of every request itself."""
        logger.error("CFG pair broken: %s; the instance on %s goes on alone, both CFG branches batched", reason,
                     self.pipeline.device)
        partner, self.partner, self.pipeline.cfg_pair = self.partner, None, None
        partner.process.kill()
        partner.stop()

    def close(self) -> None:
        if self.partner is not None:
            self.partner.stop()
            self.partner = None


# --- Rank 1 ---------------------------------------------------------------------------------------------------------


def serve_requests(pipeline: LancePipeline, connection: Connection) -> None:
    """Run rank 0's requests until it sends None; each outcome goes back, a failure also ends the process."""
    while (message := connection.recv()) is not None:
        _, request = message
        try:
            pipeline.generate(request)
            connection.send(("ok", ""))
        except tuple(OUTCOMES) as err:
            connection.send((OUTCOMES[type(err)], one_line(err)))
        except Exception as err:
            connection.send(("failed", one_line(err)))
            raise


def main(argv: Sequence[str] | None = None) -> int:
    """Rank 1: ``python -m runtime.serving.cfg_partner FD``, FD its end of rank 0's socket."""
    argv = sys.argv[1:] if argv is None else argv
    connection = Connection(int(argv[0]))
    settings, device_name, port = connection.recv()
    device = torch.device(device_name)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s cfg partner (rank 1, {device}) %(name)s: %(message)s")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    connection.send(("joining", os.getpid()))
    join_pair(CFG_TEXT, device, dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=PAIR_TIMEOUT))
    try:
        try:
            pipeline = torch_set_pipeline(settings, device, CfgPair(CFG_TEXT))
        except Exception as err:
            connection.send(("failed", f"loading {settings.checkpoint}: {one_line(err)}"))
            raise
        connection.send(("ready", ""))
        serve_requests(pipeline, connection)
    except EOFError:
        logger.info("rank 0 is gone; leaving")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
