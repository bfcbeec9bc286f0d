"""Export the full-size Lance_3B engines with random weights and report file sizes, node counts and export times.

No real weights are downloadable here, so the real-size architecture (the configs' defaults) is built with random
weights: what this measures is the graph (size, node counts, exporter time), which does not depend on the values.
Run it on a machine with >= 64 GB of RAM (the GPU machine's CPUs do): `python benchmarks/export_full_size.py OUT`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from export.onnx_export import export_models
from runtime.spec.contract import ENGINES, engine_specs
from runtime.runners.graphs import VaeDecodeGraph, VaeEncodeGraph
from runtime.models.mot import LanceLLMConfig, LanceMoT
from runtime.models.vae import WanVAE, WanVAEConfig
from runtime.models.vit import Qwen25VisionTransformer, VisionConfig


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(argv[0] if argv else "engines_full")
    precisions = tuple(argv[1].split(",")) if len(argv) > 1 else ("bf16",)
    engines = tuple(argv[2].split(",")) if len(argv) > 2 else ENGINES
    torch.manual_seed(0)
    start = time.perf_counter()
    llm, vision, vae_config = LanceLLMConfig(), VisionConfig(), WanVAEConfig()
    mot, vit, vae = LanceMoT(llm).eval(), Qwen25VisionTransformer(vision).eval(), WanVAE(vae_config).eval()
    build_s = time.perf_counter() - start
    modules = {"vit": vit, "mot": mot, "vae_encode": VaeEncodeGraph(vae),
               "vae_decode": VaeDecodeGraph(vae)}
    reports = export_models(modules, engine_specs(llm, vision, vae_config), out, precisions, engines,
                            source="random full-size Lance_3B")
    rows = []
    for r in reports:
        files = [Path(r.path)] + ([Path(r.path).with_name(r.data_file)] if r.data_file else [])
        size = sum(f.stat().st_size for f in files)
        rows.append({"engine": r.engine, "precision": r.precision, "bytes": size, "exported_nodes": r.exported_nodes,
                     "nodes": r.nodes, "seconds": round(r.seconds, 1), "passes": r.passes})
        print(f"{r.engine:11s} {r.precision:5s} {size / 2**30:8.2f} GiB  nodes {r.exported_nodes:5d} -> {r.nodes:5d}"
              f"  {r.seconds:7.1f} s", flush=True)
    result = {"cpu_count": os.cpu_count(), "build_seconds": round(build_s, 1), "torch": torch.__version__,
              "graphs": rows}
    (out / f"export_full_size_{'_'.join(engines)}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
