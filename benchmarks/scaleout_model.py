"""`lance-trt bench scaleout`: t2i latency and throughput at 8 GPUs and 8 nodes, on paper, from the one-GPU figures.

A model, not a measurement: nothing here runs on a GPU or reads a clock. What is **measured** comes from the committed
JSONs of one NVIDIA H100 80GB HBM3 (docs/benchmarks.md), bf16 fast engines, t2i at ``--size`` (1024 px, 30 steps,
CFG 4.0):

* the denoise forward of one branch (B = 1) and of both CFG branches batched (B = 2), ``runner.infer``
  (``--denoise``, part ``denoise``);
* the in-process request end to end and its ``denoise`` stage (``--denoise``, part ``e2e``): the per-step loop
  overhead is the stage less its forwards, the fixed part (plan, prefill, VAE decode) the request less the stage;
* the served request through tritonserver, steady state, and its ``denoise`` stage (``--serving``): with ``--basis
  served`` the fixed part is the served request less its stage (server, gRPC and progress included), and every
  denoise step is scaled by the served loop over the in-process one of ``--denoise`` (equal within 0.2 % in run 4);
* a second one-GPU run of the same request (``--components``), reported as a cross-check only.

What is **modelled**:

* a *replica* (one GPU, whole requests one after another) takes the measured one-GPU latency; replicas add throughput
  linearly, in one server or behind a load balancer across nodes (no cross-node traffic per request);
* a *CFG pair* (two GPUs of one node, `runtime.pipeline.cfg_pair.CfgPair`) runs every step with B = 1 on each GPU:
  a CFG step costs the B = 1 step plus an all-gather of the velocity, a step without CFG the B = 1 step plus a
  broadcast, and every step one more broadcast of a one-element flag (the agreed cancellation check,
  `CfgPair.agreed`); each collective costs ``--link-latency-us`` + bytes / ``--link-gbps`` (NVLink, assumed);
  the pair's fixed part is the replica's (that each GPU prefills only its own branch is not counted);
* pairs never span nodes; a node's GPUs split into pairs and replicas as the configuration says;
* at saturation each unit completes 1 / latency requests per second; a mix's mean latency weights each unit by its
  share of completed requests;
* under load (the queueing columns, ``--arrival-rate``): Poisson arrivals into one queue in front of all units
  (Triton's queue in one server; a least-outstanding-requests balancer across nodes), the units taken as equal
  servers of the mix's mean latency, the wait as M/D/c approximated by half the M/M/c (Erlang C) wait.

Two-GPU figures are not measured (no two-GPU machine was lent): re-fit once they are.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FAST = "fast compiled (runner.infer)"
"""The denoise rows' variant: the product's bf16 fast runner, timed through ``runner.infer``."""
SCOPES = (("1 GPU (measured)", 1, 1), ("1 node x 8 GPUs", 1, 8), ("8 nodes x 1 GPU", 8, 1), ("8 nodes x 8 GPUs", 8, 8))
"""(name, nodes, GPUs per node) of each configuration family in the table."""
SENSITIVITY = (("NVLink, as assumed", None, None), ("PCIe Gen5 through the host", 25.0, 50.0),
               ("100 Gb/s network (pairs do not span nodes)", 12.0, 100.0), ("slow: 1 ms a collective", None, 1000.0),
               ("slow: 10 ms a collective", None, 10000.0))
"""Link variants of the sensitivity table: (name, GB/s, microseconds per collective); None keeps the option's value."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lance-trt bench scaleout", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--denoise", type=Path, default=HERE / "h100_denoise_e2e.json", help="denoise forwards and t2i end to end")
    add("--serving", type=Path, default=HERE / "h100_serving_run4.json", help="t2i served through tritonserver")
    add("--components", type=Path, default=HERE / "h100_components.json", help="a second t2i run (cross-check)")
    add("--size", type=int, default=1024, help="t2i side (px); the JSONs must hold rows of that size")
    add("--steps", type=int, default=30, help="denoise steps of the modelled request")
    add("--basis", choices=("served", "inprocess"), default="served",
        help="one GPU's request as served through tritonserver or as the in-process pipeline")
    add("--link-gbps", type=float, default=200.0, help="effective bandwidth of a pair's collective (GB/s, assumed)")
    add("--link-latency-us", type=float, default=20.0, help="fixed cost of one collective (us, assumed)")
    add("--target-s", type=float, default=2.0, help="the latency target (s)")
    add("--target-kind", choices=("every", "mean"), default="every",
        help="every: each unit's latency meets the target; mean: the mean over completed requests does")
    add("--arrival-rate", type=float, help="requests/s: check the target with the modelled queueing at this rate")
    add("--load", type=float, default=0.8, help="the load (fraction of capacity) of the table's queueing column")
    add("--out", type=Path, default=Path("scaleout_model.json"), help="JSON results file")
    return parser


# --- Measured -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """The one-GPU figures the model is fitted to, all read from the JSONs (seconds).

    Attributes:
        gpu: the GPU the rows name (``environment.gpu``).
        size: t2i side (px).
        steps, cfg_steps: denoise steps of the measured request and how many of them ran both CFG branches.
        step_b1_s, step_b2_s: one denoise forward, one branch / both CFG branches batched.
        inprocess_s, inprocess_denoise_s: the in-process request end to end (median) and its ``denoise`` stage.
        served_s, served_denoise_s: the served request, steady state (median), and the server's ``denoise`` stage.
        cross_check_s: the same in-process request in ``--components`` (another run; None where absent).
    """

    gpu: str
    size: int
    steps: int
    cfg_steps: int
    step_b1_s: float
    step_b2_s: float
    inprocess_s: float
    inprocess_denoise_s: float
    served_s: float
    served_denoise_s: float
    cross_check_s: float | None = None


def cfg_step_count(steps: int) -> int:
    """How many of ``steps`` run the cfg_text branch: the product's schedule and CFG interval (26 of 30)."""
    from runtime.pipeline.scheduler import cfg_active, make_schedule

    return sum(cfg_active(t) for t in make_schedule(steps).timesteps[:steps])


def _row(rows: Sequence[dict[str, Any]], part: str, name: str, variant: str) -> dict[str, Any]:
    found = [r for r in rows if r["part"] == part and r["name"].startswith(name) and r["variant"] == variant]
    if not found:
        raise ValueError(f"no row part={part!r} name={name!r}... variant={variant!r}")
    return found[0]


def _t2i_row(rows: Sequence[dict[str, Any]], size: int) -> tuple[dict[str, Any], int]:
    """The bf16 fast engines' t2i row at ``size`` and its step count (from the row's name)."""
    row = _row(rows, "e2e", f"t2i {size}x{size} ", "fast")
    return row, int(re.search(r"(\d+) steps", row["name"]).group(1))


def _served_args(serving: dict[str, Any]) -> argparse.Namespace:
    """The serving run's options, its recorded argv through its own parser (the JSON stores no size)."""
    from benchmarks.gpu_serving import _parser as serving_parser

    return serving_parser().parse_args(serving["argv"])


def load_measured(denoise: Path, serving: Path, components: Path | None, size: int = 1024) -> Measured:
    """Read the one-GPU figures at ``size``; the serving run must be the same request on the same GPU model."""
    bench, served = json.loads(denoise.read_text()), json.loads(serving.read_text())
    t2i, steps = _t2i_row(bench["rows"], size)
    served_args = _served_args(served)
    if getattr(served_args, "cfg_pair", False):
        raise ValueError(f"{serving} served CFG pairs; the model is fitted to one GPU")
    if (served_args.size, served_args.steps) != (size, steps):
        raise ValueError(f"{serving} serves {served_args.size} px, {served_args.steps} steps; the model needs "
                         f"{size} px, {steps} steps")
    gpu = bench["environment"]["gpu"]
    if not served["environment"]["gpu"].startswith(gpu):
        raise ValueError(f"{serving} ran on {served['environment']['gpu']!r}, {denoise} on {gpu!r}")
    cross = None
    if components is not None and components.is_file():
        cross = _t2i_row(json.loads(components.read_text())["rows"], size)[0]["ms"] / 1e3
    forward = {b: _row(bench["rows"], "denoise", f"denoise forward {size}px B={b}", FAST)["ms"] / 1e3 for b in (1, 2)}
    return Measured(gpu=gpu, size=size, steps=steps, cfg_steps=cfg_step_count(steps), step_b1_s=forward[1],
                    step_b2_s=forward[2], inprocess_s=t2i["ms"] / 1e3,
                    inprocess_denoise_s=t2i["extra"]["stages_s"]["denoise"],
                    served_s=served["serve"]["t2i"]["median_ms"] / 1e3,
                    served_denoise_s=served["serve"]["t2i"]["stages_s"]["denoise"], cross_check_s=cross)


# --- Modelled -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A CFG pair's collective, assumed (not measured): ``latency_us`` + bytes / ``gbps``."""

    gbps: float = 200.0
    latency_us: float = 20.0

    def seconds(self, nbytes: int) -> float:
        return self.latency_us * 1e-6 + nbytes / (self.gbps * 1e9)


def velocity_bytes(size: int) -> int:
    """One rank's velocity ``(1, (size / 16)^2, 48)`` in bf16: what each collective moves per rank."""
    from runtime.spec import constants

    return (size // constants.VAE_DOWNSAMPLE_SPATIAL) ** 2 * constants.LATENT_CHANNELS * 2


@dataclass(frozen=True)
class StepModel:
    """One request's latency built from measured parts, for one GPU and for a CFG pair (seconds).

    Attributes:
        fixed_s: the request less its denoise loop (plan, prefill, VAE decode; served: server and progress too).
        step_b1_s, step_b2_s: denoise forward, one branch / both branches (measured, in-process).
        loop_s: the loop's own cost per step (in-process stage less its forwards, per step).
        scale: denoise loop as served / in-process (1 for ``--basis inprocess``), applied to every step.
        steps, cfg_steps: the modelled request's steps and CFG steps.
        exchange_bytes: bytes per rank of one velocity collective.
        flags: one-byte collectives a step besides the velocity's (the agreed cancellation check).
    """

    fixed_s: float
    step_b1_s: float
    step_b2_s: float
    loop_s: float
    scale: float
    steps: int
    cfg_steps: int
    exchange_bytes: int
    flags: int = 1

    def replica_loop_s(self) -> float:
        """One GPU's denoise loop: B = 2 on CFG steps, B = 1 on the others."""
        plain = self.steps - self.cfg_steps
        return self.scale * (self.cfg_steps * (self.step_b2_s + self.loop_s) + plain * (self.step_b1_s + self.loop_s))

    def pair_loop_s(self, link: Link) -> float:
        """A CFG pair's denoise loop: B = 1 on each GPU every step, plus its collectives."""
        return self.scale * self.steps * (self.step_b1_s + self.loop_s) + self.steps * self.exchange_s(link)

    def exchange_s(self, link: Link) -> float:
        """A pair's collectives in one step: the velocity (all-gather on CFG steps, broadcast on the others) and the
        flags."""
        return link.seconds(self.exchange_bytes) + self.flags * link.seconds(1)

    def replica_s(self) -> float:
        return self.fixed_s + self.replica_loop_s()

    def pair_s(self, link: Link) -> float:
        return self.fixed_s + self.pair_loop_s(link)

    def loop_speedup(self, link: Link) -> float:
        """Denoise loop, one GPU over a pair; with a free link ``(cfg (b2 + o) + plain (b1 + o)) / (steps (b1 + o))``
        (o: the loop's cost a step)."""
        return self.replica_loop_s() / self.pair_loop_s(link)

    def collective_budget_s(self, target_s: float) -> float:
        """The most one collective may cost (all taken as equal) for a pair to meet ``target_s`` (negative: not even
        with a free link)."""
        return (target_s - self.pair_s(Link(math.inf, 0.0))) / (self.steps * (1 + self.flags))


def fit(measured: Measured, basis: str = "served", steps: int | None = None) -> StepModel:
    """The step model from the measured figures; the one-GPU latency at the measured steps equals the measurement."""
    forwards = measured.cfg_steps * measured.step_b2_s + (measured.steps - measured.cfg_steps) * measured.step_b1_s
    loop_s = (measured.inprocess_denoise_s - forwards) / measured.steps
    if basis == "served":
        fixed = measured.served_s - measured.served_denoise_s
        scale = measured.served_denoise_s / measured.inprocess_denoise_s
    elif basis == "inprocess":
        fixed, scale = measured.inprocess_s - measured.inprocess_denoise_s, 1.0
    else:
        raise ValueError(f"basis is 'served' or 'inprocess', got {basis!r}")
    steps = measured.steps if steps is None else steps
    cfg_steps = measured.cfg_steps if steps == measured.steps else cfg_step_count(steps)
    return StepModel(fixed_s=fixed, step_b1_s=measured.step_b1_s, step_b2_s=measured.step_b2_s, loop_s=loop_s,
                     scale=scale, steps=steps, cfg_steps=cfg_steps, exchange_bytes=velocity_bytes(measured.size))


@dataclass(frozen=True)
class Config:
    """``pairs`` CFG pairs and ``replicas`` one-GPU replicas over ``nodes`` nodes of ``gpus_per_node`` GPUs, with
    the unit latencies (s) of the model."""

    scope: str
    nodes: int
    gpus_per_node: int
    pairs: int
    replicas: int
    pair_s: float
    replica_s: float

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def pools(self) -> list[tuple[int, float]]:
        """(units, latency) of the pools in use."""
        return [(n, s) for n, s in ((self.pairs, self.pair_s), (self.replicas, self.replica_s)) if n]

    def throughput(self) -> float:
        """Requests/s at saturation: each unit completes one request per its latency."""
        return sum(n / s for n, s in self.pools())

    def worst_s(self) -> float:
        return max(s for _, s in self.pools())

    def mean_s(self) -> float:
        """Mean latency over completed requests at saturation (each pool weighted by its completions)."""
        return sum(n for n, _ in self.pools()) / self.throughput()

    def layout(self) -> str:
        """Pairs (p) and replicas (r) per node, pairs packed first: ``3 x (4p) + 1 x (1p+6r) + 4 x (8r)``."""
        left, counts = self.pairs, {}
        for _ in range(self.nodes):
            pairs = min(left, self.gpus_per_node // 2)
            left -= pairs
            node = "+".join(f"{n}{unit}" for n, unit in ((pairs, "p"), (self.gpus_per_node - 2 * pairs, "r")) if n)
            counts[node] = counts.get(node, 0) + 1
        return " + ".join(f"{count} x ({node})" if self.nodes > 1 else node for node, count in counts.items())


def configurations(scope: str, nodes: int, gpus_per_node: int, model: StepModel, link: Link) -> list[Config]:
    """Every split of the GPUs into node-local pairs and replicas, pairs from none to as many as fit."""
    pair_s, replica_s = model.pair_s(link), model.replica_s()
    return [Config(scope, nodes, gpus_per_node, p, nodes * gpus_per_node - 2 * p, pair_s, replica_s)
            for p in range(nodes * (gpus_per_node // 2) + 1)]


def mdc_wait_s(servers: int, service_s: float, arrival_rate: float) -> float:
    """Mean queueing wait of M/D/c, approximated as half the M/M/c wait (Erlang C); inf at or past capacity."""
    offered = arrival_rate * service_s
    if offered >= servers:
        return math.inf
    blocking = 1.0
    for k in range(1, servers + 1):              # Erlang B by its recursion, then Erlang C
        blocking = offered * blocking / (k + offered * blocking)
    rho = offered / servers
    waiting = blocking / (1 - rho * (1 - blocking))
    return 0.5 * waiting * service_s / (servers * (1 - rho))


def loaded_s(config: Config, arrival_rate: float) -> tuple[float, float]:
    """(worst unit, mean) latency plus the modelled wait in the one queue at ``arrival_rate``."""
    wait = mdc_wait_s(sum(n for n, _ in config.pools()), config.mean_s(), arrival_rate)
    return config.worst_s() + wait, config.mean_s() + wait


def meets(config: Config, target_s: float, kind: str, arrival_rate: float | None = None) -> bool:
    """Whether ``config`` meets the target: ``every`` pool's latency or the ``mean`` over requests, at saturation
    without queueing or, with ``arrival_rate``, with the modelled queueing wait."""
    if config.throughput() == 0:
        return False
    if arrival_rate is None:
        worst, mean = config.worst_s(), config.mean_s()
    else:
        worst, mean = loaded_s(config, arrival_rate)
    return (worst if kind == "every" else mean) <= target_s


def best(configs: Sequence[Config], target_s: float, kind: str = "every",
         arrival_rate: float | None = None) -> Config | None:
    """The configuration with the most throughput that meets the target (None: none does)."""
    fitting = [c for c in configs if meets(c, target_s, kind, arrival_rate)]
    return max(fitting, key=Config.throughput, default=None)


def max_rate(config: Config, target_s: float, kind: str = "every") -> float:
    """The highest arrival rate (requests/s) at which ``config`` still meets the target with the modelled queueing
    (0: not even without a queue), by bisection."""
    if not meets(config, target_s, kind):
        return 0.0
    low, high = 0.0, config.throughput()
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if meets(config, target_s, kind, middle) else (low, middle)
    return low


# --- Report -------------------------------------------------------------------------------------------------------


def _shown(configs: Sequence[Config], chosen: Config | None) -> list[Config]:
    """The table's rows of one scope: the same mix on every node, plus the chosen one where it is not among them."""
    per_node = configs[0].gpus_per_node // 2
    rows = [c for c in configs if c.pairs % max(1, configs[0].nodes) == 0 and c.pairs // configs[0].nodes <= per_node]
    return rows + [chosen] if chosen is not None and chosen.scope == configs[0].scope and chosen not in rows else rows


def _seconds(value: float) -> str:
    return "-" if math.isinf(value) or math.isnan(value) else f"{value:.2f}"


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the table shows, as plain data."""
    measured = load_measured(args.denoise, args.serving, args.components, args.size)
    model = fit(measured, args.basis, args.steps)
    link = Link(args.link_gbps, args.link_latency_us)
    scopes = []
    for name, nodes, gpus in SCOPES:
        configs = configurations(name, nodes, gpus, model, link)
        chosen = best(configs, args.target_s, args.target_kind, args.arrival_rate)
        rows = [dict(asdict(c), layout=c.layout(), throughput=c.throughput(), per_gpu=c.throughput() / c.gpus,
                     mean_s=c.mean_s(), loaded_s=loaded_s(c, args.load * c.throughput()),
                     meets=meets(c, args.target_s, args.target_kind, args.arrival_rate))
                for c in _shown(configs, chosen)]
        scopes.append({"scope": name, "nodes": nodes, "gpus_per_node": gpus, "rows": rows,
                       "chosen": None if chosen is None else {
                           "layout": chosen.layout(), "pairs": chosen.pairs, "replicas": chosen.replicas,
                           "throughput": chosen.throughput(),
                           "max_rate": max_rate(chosen, args.target_s, args.target_kind)}})
    sensitivity = []
    for label, gbps, latency_us in SENSITIVITY:
        variant = replace(link, **{k: v for k, v in (("gbps", gbps), ("latency_us", latency_us)) if v is not None})
        sensitivity.append({"link": label, "gbps": variant.gbps, "latency_us": variant.latency_us,
                            "exchange_ms": 1e3 * model.steps * model.exchange_s(variant),
                            "pair_s": model.pair_s(variant), "loop_speedup": model.loop_speedup(variant)})
    return {"measured": asdict(measured), "model": asdict(model), "basis": args.basis, "link": asdict(link),
            "target": {"seconds": args.target_s, "kind": args.target_kind, "arrival_rate": args.arrival_rate},
            "load": args.load, "replica_s": model.replica_s(), "pair_s": model.pair_s(link),
            "loop_speedup": model.loop_speedup(link), "loop_speedup_free_link": model.loop_speedup(Link(math.inf, 0)),
            "request_speedup": model.replica_s() / model.pair_s(link),
            "collective_budget_ms": 1e3 * model.collective_budget_s(args.target_s),
            "scopes": scopes, "sensitivity": sensitivity}


def _chosen(chosen: dict[str, Any] | None) -> str:
    if chosen is None:
        return "none"
    return (f"{chosen['layout']} ({chosen['throughput']:.2f} req/s; with the queue up to {chosen['max_rate']:.2f} "
            f"req/s)")


def table(result: dict[str, Any]) -> str:
    """The markdown the docs quote: the inputs, the configurations, the choice per scope, the link's sensitivity."""
    m, model, link, target = result["measured"], result["model"], result["link"], result["target"]
    cross = f"; another run's in-process request {m['cross_check_s']:.2f} s" if m["cross_check_s"] else ""
    lines = [(f"Measured on {m['gpu']} (t2i {m['size']} px, {m['steps']} steps, {m['cfg_steps']} with CFG): denoise "
             f"forward B=1 {1e3 * m['step_b1_s']:.1f} ms, B=2 {1e3 * m['step_b2_s']:.1f} ms; in-process "
             f"{m['inprocess_s']:.2f} s (loop {m['inprocess_denoise_s']:.2f}); served {m['served_s']:.2f} s "
             f"(loop {m['served_denoise_s']:.2f}){cross}."),
             (f"Model ({result['basis']}): fixed {1e3 * model['fixed_s']:.0f} ms, loop {1e3 * model['loop_s']:.2f} "
             f"ms a step, scale {model['scale']:.3f}; link {link['gbps']:g} GB/s + {link['latency_us']:g} us a "
             f"collective of {model['exchange_bytes'] / 1e3:.0f} KB (assumed). Replica {result['replica_s']:.2f} s, "
             f"pair {result['pair_s']:.2f} s: denoise loop x{result['loop_speedup']:.3f} (free link "
             f"x{result['loop_speedup_free_link']:.3f}), request x{result['request_speedup']:.3f}."),
             "",
             (f"| scope | layout | pair s | replica s | req/s | req/s/GPU | mean s | at {result['load']:.0%} load: "
             f"mean / worst s | meets {target['kind']} <= {target['seconds']:g} s |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for scope in result["scopes"]:
        for row in scope["rows"]:
            pair = _seconds(row["pair_s"]) if row["pairs"] else "-"
            replica = _seconds(row["replica_s"]) if row["replicas"] else "-"
            lines.append(f"| {scope['scope']} | {row['layout']} | {pair} | {replica} | {row['throughput']:.2f} | "
                         f"{row['per_gpu']:.3f} | {_seconds(row['mean_s'])} | "
                         f"{' / '.join(map(_seconds, row['loaded_s']))} | "
                         f"{'yes' if row['meets'] else 'no'} |")
    at = f" at {target['arrival_rate']:g} req/s" if target["arrival_rate"] else ""
    lines += ["", (f"Most throughput meeting {target['kind']} <= {target['seconds']:g} s{at} (a pair meets "
                   f"{target['seconds']:g} s while one collective costs <= {result['collective_budget_ms']:.2f} ms):"),
              "",
              *(f"- {s['scope']}: {_chosen(s['chosen'])}" for s in result["scopes"][1:]), "",
              "| link (assumed) | GB/s | us a collective | exchange ms a request | pair s | loop speed-up |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {s['link']} | {s['gbps']:g} | {s['latency_us']:g} | {s['exchange_ms']:.2f} | {s['pair_s']:.2f} | "
              f"x{s['loop_speedup']:.3f} |" for s in result["sensitivity"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    result = {"argv": argv, **report(args)}
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
