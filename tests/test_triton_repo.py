"""runtime/serving/repository.py without a server: the generated configs (parsed with Triton's own ModelConfig protobuf, checked
against the contract), the files installed, the paths recorded, and the refusal of plans whose sidecar names another
contract, TensorRT version or GPU architecture. Plans here are placeholder bytes with real sidecars: the writer never
reads a plan, and TensorRT cannot run on this machine."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from runtime.spec import registry
from runtime.spec import request as request_spec
from runtime.spec.contract import ENGINES, EngineSpec
from runtime.runners.trt import Sidecar
from runtime.serving.repository import (
    CHILD_MODELS,
    MODEL_TEMPLATES,
    TEMPLATE_DIR,
    ConfigError,
    EngineSettings,
    LanceSettings,
    RepoError,
    ServingTarget,
    check_io,
    check_lance_config,
    checkpoint_specs,
    config_parameters,
    pbtxt_string,
    repo_main,
    write_repository,
)

H100 = ServingTarget("10.5.0.18", {0: ("NVIDIA H100 80GB HBM3", "9.0")})
L40S = ServingTarget("10.5.0.18", {0: ("NVIDIA L40S", "8.9")})
BOTH = ServingTarget("10.5.0.18", {0: ("NVIDIA H100 80GB HBM3", "9.0"), 1: ("NVIDIA L40S", "8.9")})


@pytest.fixture(scope="module")
def specs(tiny_checkpoint: Path) -> dict[str, EngineSpec]:
    return checkpoint_specs(tiny_checkpoint)


def fake_engines(root: Path, specs: dict[str, EngineSpec], *, onnx: bool = True, plans: bool = True,
                 tensorrt: str = "10.5.0.18", cc: str = "9.0", gpu: str = "NVIDIA H100 80GB HBM3",
                 digest: str | None = None) -> Path:
    """An engine folder as export + build write it: fp32 graphs (placeholder bytes, mot with external data) and bf16
    plans (placeholder bytes) with real sidecars."""
    for name, spec in specs.items():
        if onnx:
            (root / "fp32").mkdir(parents=True, exist_ok=True)
            (root / "fp32" / f"{name}.onnx").write_bytes(f"onnx {name}".encode())
            if name == "mot":
                (root / "fp32" / "mot.onnx.data").write_bytes(b"weights")
        if plans:
            (root / "bf16").mkdir(parents=True, exist_ok=True)
            (root / "bf16" / f"{name}.plan").write_bytes(f"plan {name} {cc}".encode())
            Sidecar(engine=name, precision="bf16", tensorrt=tensorrt, gpu=gpu, compute_capability=cc,
                    contract_sha256=digest or spec.digest(), onnx=f"{name}.onnx", onnx_sha256="0" * 64,
                    profiles={}, flags=[]).write(root / "bf16" / f"{name}.json")
    return root


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def params(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def io(config: model_config_pb2.ModelConfig) -> tuple[dict, dict]:
    def rows(entries) -> dict:
        return {e.name: (model_config_pb2.DataType.Name(e.data_type), list(e.dims),
                         getattr(e, "optional", False)) for e in entries}

    return rows(config.input), rows(config.output)


def test_pbtxt_string_escapes() -> None:
    assert pbtxt_string('a "b" \\ c') == '"a \\"b\\" \\\\ c"'
    parsed = text_format.Parse(f'name: {pbtxt_string(json.dumps({"k": "v"}))}', model_config_pb2.ModelConfig())
    assert json.loads(parsed.name) == {"k": "v"}


def test_repository_layout_and_configs(tmp_path: Path, tiny_checkpoint: Path, specs: dict[str, EngineSpec]) -> None:
    engines = fake_engines(tmp_path / "engines", specs)
    out = tmp_path / "repo"
    report = write_repository([engines], tiny_checkpoint, out, max_queue_size=5, gpus=(0, 1), target=H100)
    assert not report.warnings
    names = {p.relative_to(out).as_posix() for p in report.files}
    for engine, model in CHILD_MODELS.items():
        assert {f"{model}/1/model.py", f"{model}/1/{engine}.plan", f"{model}/1/{engine}.json",
                f"{model}/1/{engine}.onnx", f"{model}/config.pbtxt", f"{model}/configs/cpu.pbtxt"} <= names
        assert (out / model / "1" / "model.py").read_text() == (TEMPLATE_DIR / MODEL_TEMPLATES[model]).read_text()
    assert {"lance/1/model.py", "lance/1/mot.plan", "lance/1/mot.json", "lance/1/mot.onnx", "lance/1/mot.onnx.data",
            "lance/config.pbtxt", "lance/configs/cpu.pbtxt"} <= names
    assert (out / "lance/1/mot.plan").read_bytes() == b"plan mot 9.0"

    for engine, model in CHILD_MODELS.items():
        spec = specs[engine]
        gpu, cpu = parse(out / model / "config.pbtxt"), parse(out / model / "configs/cpu.pbtxt")
        assert (gpu.name, gpu.platform, gpu.max_batch_size) == (model, "tensorrt_plan", 0)
        assert gpu.default_model_filename == f"{engine}.plan" and not gpu.cc_model_filenames
        (group,) = gpu.instance_group
        assert list(group.gpus) == [0, 1] and list(group.profile) == (
            [str(i) for i in range(len(spec.profiles))] if len(spec.profiles) > 1 else [])
        # one warmup per profile, each at a shape only that profile admits
        assert [w.name for w in gpu.model_warmup] == [p.name for p in spec.profiles]
        for warmup, profile in zip(gpu.model_warmup, spec.profiles):
            shapes = {name: list(value.dims) for name, value in warmup.inputs.items()}
            assert set(shapes) == set(spec.input_names)
            dims = spec.dims_of(shapes)
            assert [p.name for p in spec.profiles if p.contains(dims)][0] == profile.name
        assert (cpu.name, cpu.backend, cpu.max_batch_size) == (model, "python", 0)
        assert EngineSpec.from_dict(json.loads(params(cpu)["engine_spec"])) == spec
        assert params(cpu)["onnx"] == f"{engine}.onnx"
        gpu_io, cpu_io = io(gpu), io(cpu)
        # Same names and shapes; the CPU set is the fp32 graph, the GPU set the plan's precision.
        for block_gpu, block_cpu, tensors in zip(gpu_io, cpu_io, (spec.inputs, spec.outputs)):
            assert list(block_gpu) == list(block_cpu) == [t.name for t in tensors]
            for t in tensors:
                assert block_gpu[t.name][1] == block_cpu[t.name][1]
                assert block_gpu[t.name][0] == t.dtype.concrete("bf16").triton
                assert block_cpu[t.name][0] == t.dtype.concrete("fp32").triton

    gpu, cpu = parse(out / "lance/config.pbtxt"), parse(out / "lance/configs/cpu.pbtxt")
    for config in (gpu, cpu):
        assert (config.name, config.backend, config.max_batch_size) == ("lance", "python", 0)
        assert config.model_transaction_policy.decoupled
        assert config.dynamic_batching.default_queue_policy.max_queue_size == 5
        inputs, outputs = io(config)
        assert inputs == {s.name: (s.dtype.triton, [-1 if isinstance(d, str) else d for d in s.shape], s.optional)
                          for s in request_spec.LANCE_INPUTS}
        assert list(outputs) == [s.name for s in request_spec.LANCE_OUTPUTS]
        assert outputs["image"][:2] == ("TYPE_UINT8", [-1, -1, 3])
        assert not any(str(tiny_checkpoint.resolve()) in value for value in params(config).values())
    # the checkpoint's path stays out of the config (the config API would show it): a file beside model.py
    assert (out / "lance/1/checkpoint.path").read_text() == f"{tiny_checkpoint.resolve()}\n"   # outside: absolute
    in_process = [name for name, engine in registry.ENGINES.items() if engine.triton_model is None]
    assert params(gpu) == {
        "video": "false", "child_timeout_s": "600", "vit_model": "lance_vit",
        "vae_encode_model": "lance_vae_encode", "vae_decode_model": "lance_vae_decode", "engine_set": "tensorrt",
        "precision": "bf16", "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        **{f"{name}_engine": f"{name}.plan" for name in in_process}}
    assert (params(cpu)["engine_set"], params(cpu)["precision"]) == ("onnxruntime", "fp32")
    assert {name: params(cpu)[f"{name}_engine"] for name in in_process} == {name: f"{name}.onnx" for name in in_process}
    assert all((out / "lance/1" / f"{name}.onnx").is_file() for name in in_process)
    assert [g.kind for g in gpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert [g.kind for g in cpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]


def test_rewrite_replaces_stale_files(tmp_path: Path, tiny_checkpoint: Path, specs: dict[str, EngineSpec]) -> None:
    out = tmp_path / "repo"
    write_repository([fake_engines(tmp_path / "a", specs)], tiny_checkpoint, out, target=H100)
    write_repository([fake_engines(tmp_path / "b", specs, plans=False)], tiny_checkpoint, out, target=H100)
    assert not list(out.glob("*/1/*.plan")) and not list(out.glob("*/1/*.json"))
    assert (out / "lance/1/mot.onnx").is_file()


def test_several_gpu_architectures(tmp_path: Path, tiny_checkpoint: Path, specs: dict[str, EngineSpec]) -> None:
    hopper = fake_engines(tmp_path / "sm90", specs)
    ada = fake_engines(tmp_path / "sm89", specs, plans=True, onnx=False, cc="8.9", gpu="NVIDIA L40S")
    out = tmp_path / "repo"
    write_repository([hopper, ada], tiny_checkpoint, out, gpus=(0, 1), target=BOTH)
    vit = parse(out / "lance_vit/config.pbtxt")
    assert dict(vit.cc_model_filenames) == {"9.0": "vit_cc9.0.plan", "8.9": "vit_cc8.9.plan"}
    assert (out / "lance_vit/1/vit_cc8.9.plan").read_bytes() == b"plan vit 8.9"
    assert (out / "lance_vit/1/vit_cc8.9.json").is_file()
    lance = params(parse(out / "lance/config.pbtxt"))
    assert (lance["mot_engine_cc9.0"], lance["mot_engine_cc8.9"]) == ("mot_cc9.0.plan", "mot_cc8.9.plan")
    assert (out / "lance/1/mot_cc8.9.plan").read_bytes() == b"plan mot 8.9"


@pytest.mark.parametrize("kwargs, target, words", [
    ({"tensorrt": "10.4.0.26"}, H100, ["built with TensorRT 10.4.0.26", "10.5.0.18", "rebuild"]),
    ({}, L40S, ["compute capability 9.0", "NVIDIA L40S (8.9)", "rebuild"]),
    ({"digest": "0" * 64}, H100, ["another contract", "rebuild"]),
], ids=["tensorrt-version", "gpu-architecture", "contract"])
def test_mismatched_plans_are_refused(tmp_path: Path, tiny_checkpoint: Path, specs: dict[str, EngineSpec],
                                      kwargs: dict, target: ServingTarget, words: list[str]) -> None:
    engines = fake_engines(tmp_path / "engines", specs, **kwargs)
    with pytest.raises(RepoError) as info:
        write_repository([engines], tiny_checkpoint, tmp_path / "repo", target=target)
    message = str(info.value)
    assert str(engines / "bf16") in message
    for word in words:
        assert word in message, message
    assert not (tmp_path / "repo").exists(), "nothing is written before every plan is accepted"


def test_unverifiable_target_installs_the_plans(tmp_path: Path, tiny_checkpoint: Path,
                                                specs: dict[str, EngineSpec]) -> None:
    """No TensorRT and no GPU here: the plans are installed (the lance model and Triton check them at load)."""
    engines = fake_engines(tmp_path / "engines", specs, tensorrt="10.4.0.26", cc="8.0")
    write_repository([engines], tiny_checkpoint, tmp_path / "repo", target=ServingTarget(None))
    assert (tmp_path / "repo/lance_vit/1/vit.plan").is_file()


def test_incomplete_or_missing_engines(tmp_path: Path, tiny_checkpoint: Path, specs: dict[str, EngineSpec]) -> None:
    engines = fake_engines(tmp_path / "engines", specs, onnx=False)
    (engines / "bf16" / "vae_encode.plan").unlink()
    with pytest.raises(RepoError, match=r"not \['vae_encode'\].*lance-trt build"):
        write_repository([engines], tiny_checkpoint, tmp_path / "repo", target=H100)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepoError, match="no engines in"):
        write_repository([tmp_path / "empty"], tiny_checkpoint, tmp_path / "repo", target=H100)
    with pytest.raises(RepoError, match="--checkpoint"):
        write_repository([engines], tmp_path / "empty", tmp_path / "repo", target=H100)


def test_onnx_only_warns_about_the_gpu_set(tmp_path: Path, tiny_checkpoint: Path,
                                           specs: dict[str, EngineSpec]) -> None:
    report = write_repository([fake_engines(tmp_path / "engines", specs, plans=False)], tiny_checkpoint,
                              tmp_path / "repo", target=H100)
    assert len(report.warnings) == 1 and "serve with --cpu" in report.warnings[0]
    assert parse(tmp_path / "repo/lance_vit/config.pbtxt").default_model_filename == "vit.plan"


def test_checkpoint_inside_the_repository_is_relative(tmp_path: Path, tiny_checkpoint: Path,
                                                      specs: dict[str, EngineSpec]) -> None:
    out = tmp_path / "repo"
    inside = out / "checkpoint"
    shutil.copytree(tiny_checkpoint, inside)
    write_repository([fake_engines(tmp_path / "engines", specs, plans=False)], inside, out, target=H100)
    recorded = (out / "lance/1/checkpoint.path").read_text().strip()
    assert recorded == "../../checkpoint"
    assert (out / "lance" / "1" / recorded).resolve() == inside.resolve()


def test_repo_main(tmp_path: Path, tiny_checkpoint: Path, specs: dict[str, EngineSpec],
                   capsys: pytest.CaptureFixture[str]) -> None:
    engines = fake_engines(tmp_path / "engines", specs, plans=False)
    out = tmp_path / "repo"
    assert repo_main([str(engines), "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--max-queue-size",
                      "3", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert "lance-trt serve --cpu --repo" in captured.out and "no bf16 plans" in captured.err
    assert params(parse(out / "lance_vae_decode/configs/cpu.pbtxt"))["threads"] == "1"
    assert repo_main([str(tmp_path / "nowhere"), "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "nowhere is not a folder" in capsys.readouterr().err
    assert repo_main([str(engines), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                      "--max-queue-size", "0"]) == 2
    assert "--max-queue-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        repo_main([str(engines), "--checkpoint", str(tiny_checkpoint), "--gpus", "a"])


def test_every_engine_has_a_model() -> None:
    in_process = {name for name, engine in registry.ENGINES.items() if engine.triton_model is None}
    assert "mot" in in_process and set(CHILD_MODELS) == set(ENGINES) - in_process
    for model in ("lance", *CHILD_MODELS.values()):
        source = (TEMPLATE_DIR / MODEL_TEMPLATES[model]).read_text()
        assert "class TritonPythonModel(" in source and "triton_python_backend_utils" not in source


# --- The models' side: the parameters parse back -------------------------------------------------------------


def as_model_config(path: Path) -> dict:
    """A config as Triton hands it to a Python model (``args["model_config"]``: the proto as JSON, field names)."""
    return json_format.MessageToDict(parse(path), preserving_proto_field_name=True)


def test_written_parameters_parse_back(tmp_path: Path, tiny_checkpoint: Path, specs: dict[str, EngineSpec]) -> None:
    out = tmp_path / "repo"
    write_repository([fake_engines(tmp_path / "sm90", specs),
                      fake_engines(tmp_path / "sm89", specs, onnx=False, cc="8.9", gpu="NVIDIA L40S")],
                     tiny_checkpoint, out, child_timeout_s=30, threads=2, gpus=(0, 1), target=BOTH)
    folder = out / "lance" / "1"
    cpu = as_model_config(out / "lance/configs/cpu.pbtxt")
    check_lance_config("lance", cpu)
    settings = LanceSettings.parse("lance", config_parameters(cpu), folder)
    assert settings.checkpoint.resolve() == tiny_checkpoint.resolve()
    assert (settings.engine_set, settings.engines["mot"], settings.precision) == ("onnxruntime", folder / "mot.onnx",
                                                                                 "fp32")
    assert settings.engines["vae_decode_chunk"] == folder / "vae_decode_chunk.onnx" and not settings.video
    assert (settings.children, settings.child_timeout_s, settings.threads, settings.warmup) == (
        CHILD_MODELS, 30.0, 2, True)
    gpu = as_model_config(out / "lance/config.pbtxt")
    check_lance_config("lance", gpu)
    for capability, plan in (("8.9", "mot_cc8.9.plan"), ("9.0", "mot_cc9.0.plan")):
        settings = LanceSettings.parse("lance", config_parameters(gpu), folder, capability)
        assert (settings.engine_set, settings.engines["mot"], settings.precision) == ("tensorrt", folder / plan, "bf16")
        assert settings.engines["mot"].read_bytes() == f"plan mot {capability}".encode()
        assert settings.engines["vae_encode_first"] == folder / f"vae_encode_first_cc{capability}.plan"
    for engine, model in CHILD_MODELS.items():
        config = as_model_config(out / model / "configs/cpu.pbtxt")
        settings = EngineSettings.parse(model, config_parameters(config), out / model / "1")
        assert (settings.spec, settings.onnx, settings.threads) == (specs[engine], out / model / "1" / f"{engine}.onnx",
                                                                   2)
        check_io(model, config, settings.spec.inputs, settings.spec.outputs, "fp32")
        check_io(model, as_model_config(out / model / "config.pbtxt"), settings.spec.inputs, settings.spec.outputs,
                 "bf16")


@pytest.mark.parametrize("params, words", [
    ({"engine_set": "tvm"}, "parameter 'engine_set' must be one of torch, onnxruntime, tensorrt"),
    ({"engine_set": "torch", "warmup_sizes": "1024"}, "parameter 'warmup_sizes' must list sizes HxW"),
    ({"engine_set": "torch", "warmup_sizes": "1024x1000"}, "parameter 'warmup_sizes' must list sizes HxW"),
    ({"engine_set": "torch", "fp8_fast_accum": "true"}, "parameter 'fp8_fast_accum' needs 'fp8_gen'"),
    ({"mot_engine": "m", "engine_set": "tensorrt", "fp8_gen": "true"}, "'fp8_gen' and 'fp8_fast_accum' belong to "
                                                                       "engine_set torch"),
    ({}, "parameter 'mot_engine' is not set"),
    ({"mot_engine": "m", "precision": "fp16"}, "parameter 'precision' must be one of fp32, bf16"),
    ({"mot_engine": "m", "warmup": "no"}, "parameter 'warmup' must be true or false, got 'no'"),
    ({"mot_engine": "m", "threads": "-1"}, "parameter 'threads' must be an integer >= 0, got '-1'"),
    ({"mot_engine": "m", "child_timeout_s": "soon"}, "'child_timeout_s' must be a number >= 0, got 'soon'"),
    ({"mot_engine": "m", "video": "yes"}, "parameter 'video' must be true or false, got 'yes'"),
])
def test_bad_lance_parameters(params: dict, words: str, tmp_path: Path) -> None:
    (tmp_path / "checkpoint.path").write_text("/ckpt\n")
    with pytest.raises(ConfigError, match=re.escape(words)):
        LanceSettings.parse("lance", params, tmp_path)


def test_missing_checkpoint_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'checkpoint.path'} names no checkpoint")):
        LanceSettings.parse("lance", {"mot_engine": "m"}, tmp_path)


def test_parameter_details(tmp_path: Path) -> None:
    assert config_parameters({"parameters": {"a": {"string_value": "x"}, "b": {"string_value": "${b}"},
                                             "c": {"string_value": ""}}}) == {"a": "x"}
    (tmp_path / "checkpoint.path").write_text("/ckpt\n")
    assert LanceSettings.parse("lance", {"engine_set": "torch", "warmup": "False", "fp8_gen": "TRUE",
                                         "warmup_sizes": "512x768  1024x1024"}, tmp_path) == LanceSettings(
        checkpoint=Path("/ckpt"), video=False, engine_set="torch", engines={}, precision="fp32", children={},
        child_timeout_s=600.0, threads=None, warmup=False, warmup_sizes=((512, 768), (1024, 1024)), fp8_gen=True)
    with pytest.raises(ConfigError, match="'engine_spec' is not an engine contract"):
        EngineSettings.parse("lance_vit", {"engine_spec": "{}", "onnx": "vit.onnx"}, Path("/repo/lance_vit/1"))


def test_config_checks_name_the_difference(tmp_path: Path, tiny_checkpoint: Path,
                                           specs: dict[str, EngineSpec]) -> None:
    write_repository([fake_engines(tmp_path / "engines", specs, plans=False)], tiny_checkpoint, tmp_path / "repo",
                     target=H100)
    config = as_model_config(tmp_path / "repo/lance/configs/cpu.pbtxt")
    with pytest.raises(ConfigError, match="needs model_transaction_policy"):
        check_lance_config("lance", {**config, "model_transaction_policy": {}})
    with pytest.raises(ConfigError, match="needs max_batch_size: 0, got 4"):
        check_lance_config("lance", {**config, "max_batch_size": 4})
    wrong = {**config, "input": [dict(e, data_type="TYPE_INT32") if e["name"] == "steps" else e
                                 for e in config["input"]]}
    with pytest.raises(ConfigError, match="input 'steps' is TYPE_INT32, the contract says TYPE_INT64"):
        check_lance_config("lance", wrong)
    with pytest.raises(ConfigError, match=r"outputs are \['image', 'progress', 'text', 'video'\]"):
        check_lance_config("lance", {**config, "output": [e for e in config["output"] if e["name"] != "timings"]})


def test_bench_dispatcher(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.cli import BENCHMARKS, bench_main

    assert {"triton", "gpu", "serving"} <= set(BENCHMARKS)
    assert bench_main([]) == 2 and "triton" in capsys.readouterr().err
    assert bench_main(["nope"]) == 2
    with pytest.raises(SystemExit) as info:
        bench_main(["triton", "--help"])
    assert info.value.code == 0 and "--runs" in capsys.readouterr().out


# --- The torch engine set (GPU serving without TensorRT) ---------------------------------------------------------


def test_torch_set_is_lance_alone_on_the_gpus(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """``--engine-set torch``: one model, KIND_GPU on every listed GPU, no child models, no CPU set, the FP8 and
    warm-up choices as parameters that parse back."""
    out = tmp_path / "repo"
    (out / "lance" / "configs").mkdir(parents=True)
    (out / "lance" / "configs" / "cpu.pbtxt").write_text("left by an earlier repository")
    report = write_repository([], tiny_checkpoint, out, engine_set="torch", gpus=(0, 1), fp8_gen=True,
                              warmup_sizes=[(512, 768), (1024, 1024)])
    assert sorted(p.relative_to(out).as_posix() for p in report.files) == [
        "lance/1/checkpoint.path", "lance/1/model.py", "lance/config.pbtxt"]
    config = parse(out / "lance/config.pbtxt")
    assert (config.backend, config.model_transaction_policy.decoupled) == ("python", True)
    assert [(g.kind, list(g.gpus)) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, [0, 1])]
    assert params(config) == {"video": "false", "engine_set": "torch", "precision": "bf16", "fp8_gen": "true",
                              "fp8_fast_accum": "false", "warmup_sizes": "512x768 1024x1024",
                              "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
    as_dict = as_model_config(out / "lance/config.pbtxt")
    check_lance_config("lance", as_dict)
    settings = LanceSettings.parse("lance", config_parameters(as_dict), out / "lance" / "1", "9.0")
    assert (settings.engine_set, settings.engines, settings.children, settings.fp8_gen, settings.warmup_sizes) == (
        "torch", {}, {}, True, ((512, 768), (1024, 1024)))
    assert settings.checkpoint.resolve() == tiny_checkpoint.resolve()


@pytest.mark.parametrize("kwargs, words", [
    (dict(engine_dirs=[Path("engines")]), "--engine-set torch builds every engine from the checkpoint"),
    (dict(fp8_fast_accum=True), "--fp8-fast-accum needs --fp8-gen"),
    (dict(engine_set="tensorrt", fp8_gen=True), "--fp8-gen selects the torch engine set's FP8 gen expert"),
    (dict(engine_set="tensorrt", gpus=None, precision="fp32"), "serves the torch set in fp32 only"),
    (dict(gpus=None), "serves the torch set in fp32 only"),
    (dict(engine_set="onnxruntime"), "--engine-set must be one of tensorrt, torch"),
])
def test_torch_set_refusals(tmp_path: Path, tiny_checkpoint: Path, kwargs: dict, words: str) -> None:
    options = {"engine_dirs": [], "engine_set": "torch", **kwargs}
    with pytest.raises(RepoError, match=re.escape(words)):
        write_repository(options.pop("engine_dirs"), tiny_checkpoint, tmp_path / "repo", **options)


def test_torch_set_refuses_a_folder_with_child_models(tmp_path: Path, tiny_checkpoint: Path,
                                                      specs: dict[str, EngineSpec]) -> None:
    """tritonserver loads every model of its repository: a TensorRT set's children beside the torch set's lance
    would load plans nobody calls (or fail without them)."""
    out = tmp_path / "repo"
    write_repository([fake_engines(tmp_path / "engines", specs, plans=False)], tiny_checkpoint, out, target=H100)
    with pytest.raises(RepoError, match="holds the models lance_vae_decode, lance_vae_encode, lance_vit of a TensorRT"):
        write_repository([], tiny_checkpoint, out, engine_set="torch")


def test_torch_set_cli_never_imports_tensorrt(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """`lance-trt repo --engine-set torch` in a fresh interpreter: the repository is written, the message names no
    CPU set, and neither TensorRT nor the TensorRT runner was imported (nor is one needed to serve it: the fast
    engines come from `runtime.runners.factory`'s torch branch)."""
    import subprocess
    import sys

    out = tmp_path / "repo"
    code = ("import sys; from runtime.serving.repository import repo_main; "
            f"rc = repo_main(['--engine-set', 'torch', '--checkpoint', {str(tiny_checkpoint)!r}, '--out', {str(out)!r},"
            " '--warmup-sizes', '512x512', '768x1024']); "
            "from runtime.pipeline import LancePipeline; "
            f"LancePipeline.from_checkpoint({str(tiny_checkpoint)!r}, runner='torch'); "
            "print('imported', sorted(m for m in ('tensorrt', 'runtime.runners.trt') if m in sys.modules)); "
            "sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "imported []" in run.stdout and "serve with `lance-trt serve --repo" in run.stdout
    assert "--cpu" not in run.stdout
    assert params(parse(out / "lance/config.pbtxt"))["warmup_sizes"] == "512x512 768x1024"
    with pytest.raises(SystemExit):
        repo_main(["--engine-set", "torch", "--checkpoint", str(tiny_checkpoint), "--warmup-sizes", "1000x1000"])
