"""Checkpoint I/O for the real Hugging Face layout of `bytedance-research/Lance` (docs/design/model.md §7).

```
<root>/Lance_3B/{model.safetensors, llm_config.json, generation_config.json, tokenizer files}
<root>/Qwen2.5-VL-ViT/{vit.safetensors, config.json}
<root>/Wan2.2_VAE.pth
<root>/Lance_3B_Video/{model.safetensors, llm_config.json, tokenizer files}      (video model only)
```

* `resolve_checkpoint` / `download`: a local folder, or a Hub repo fetched with only the files the runtime reads.
* `CheckpointLayout`: the path of every file; `check()` names the missing ones.
* `load_lance`: builds each network with its parameters on the `meta` device, reads the tensors one at a time from
  the memory-mapped files, converts floats to the requested dtype and assigns them (`load_state_dict(assign=True)`),
  so the weights are never held twice. Every key and shape is verified first: a missing, unexpected or mis-shaped
  tensor raises `CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from runtime.spec import constants
from runtime.models.mot import LanceLLMConfig, LanceMoT
from runtime.models.vae import WanVAE, WanVAEConfig
from runtime.models.vit import Qwen25VisionTransformer, VisionConfig
from runtime.models.tokenizer import TOKENIZER_JSON, SpecialIds, TokenizerError, load_tokenizer

logger = logging.getLogger(__name__)

_GENERATION_CONFIG_FILE = "generation_config.json"
# Upstream pops this sin-cos table from the checkpoint and regenerates it (L:inference_lance.py
# init_from_model_path_if_needed); it must still be in the file, with the shape the module builds.
REGENERATED_KEYS = frozenset({"latent_pos_embed.pos_embed"})
# Prefix of the ViT tensors inside Lance_3B_Video/model.safetensors (Lance registers the tower as `vit_model`).
VIT_PREFIX = "vit_model."
# Latent frames of the video model's position table: 31 * 64 * 64 rows (docs/design/model.md §8).
VIDEO_LATENT_FRAMES = 31
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_MAX_NAMED = 8  # keys listed per kind of mismatch before "... and N more"


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or does not match the modules: names the file and the key."""


# --- Layout -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointLayout:
    """Paths of every file of a checkpoint folder; `video` selects `Lance_3B_Video/` for the LLM and tokenizer.

    The ViT and the VAE are shared by the image and the video model.
    """

    root: Path
    video: bool = False

    @property
    def llm_dir(self) -> Path:
        return self.root / (constants.VIDEO_CKPT_DIR if self.video else constants.IMAGE_CKPT_DIR)

    @property
    def llm_weights(self) -> Path:
        return self.llm_dir / constants.LLM_WEIGHTS_FILE

    @property
    def llm_config(self) -> Path:
        return self.llm_dir / constants.LLM_CONFIG_FILE

    @property
    def generation_config(self) -> Path:
        """Shipped beside the LLM; read by nothing at load time (the sampling defaults are in `constants`)."""
        return self.llm_dir / _GENERATION_CONFIG_FILE

    @property
    def tokenizer_dir(self) -> Path:
        return self.llm_dir

    @property
    def tokenizer_files(self) -> tuple[Path, ...]:
        """All four Qwen2 tokenizer files (fetched and written); loading needs only tokenizer.json."""
        return tuple(self.tokenizer_dir / name for name in constants.TOKENIZER_FILES)

    @property
    def vit_dir(self) -> Path:
        return self.root / constants.VIT_DIR

    @property
    def vit_weights(self) -> Path:
        return self.vit_dir / constants.VIT_WEIGHTS_FILE

    @property
    def vit_config(self) -> Path:
        return self.vit_dir / constants.VIT_CONFIG_FILE

    @property
    def vae_weights(self) -> Path:
        return self.root / constants.VAE_FILE

    @property
    def required_files(self) -> tuple[Path, ...]:
        """The files `load_lance` reads."""
        return (self.llm_weights, self.llm_config, self.tokenizer_dir / TOKENIZER_JSON, self.vit_weights,
                self.vit_config, self.vae_weights)

    @property
    def hub_files(self) -> tuple[str, ...]:
        """Repo-relative paths to fetch from the Hub: the required files, all tokenizer files and
        generation_config.json (a pattern the repo lacks fetches nothing and is no error)."""
        files = {*self.required_files, *self.tokenizer_files, self.generation_config}
        return tuple(sorted(p.relative_to(self.root).as_posix() for p in files))

    def missing(self) -> list[Path]:
        return [p for p in self.required_files if not p.is_file()]

    def check(self) -> None:
        """Raise `CheckpointError` listing every required file that is absent."""
        missing = self.missing()
        if missing:
            names = ", ".join(p.relative_to(self.root).as_posix() for p in missing)
            raise CheckpointError(
                f"checkpoint {self.root} ({'video' if self.video else 'image'} model) lacks {len(missing)} file(s): "
                f"{names}. Fetch them with `lance-trt download --dir {self.root}{' --video' if self.video else ''}`"
            )


# --- Hub --------------------------------------------------------------------------------------------------------------


def _hub_patterns(video: bool, *, both: bool = False) -> list[str]:
    layouts = (CheckpointLayout(Path("."), False), CheckpointLayout(Path("."), True)) if both else (
        CheckpointLayout(Path("."), video),)
    return sorted({name for layout in layouts for name in layout.hub_files})


def _snapshot(repo_id: str, patterns: list[str], local_dir: Path | None) -> Path:
    """`snapshot_download` with its failures turned into one `CheckpointError` that says how to get the files."""
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id, allow_patterns=patterns, local_dir=local_dir)
    except LocalEntryNotFoundError as err:
        reason = "HF_HUB_OFFLINE is set" if hub_constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        if local_dir is None:
            problem = (f"checkpoint {repo_id!r} is not a local folder, {reason}, and the Hugging Face cache "
                       f"({hub_constants.HF_HUB_CACHE}) holds no complete copy of")
        else:
            problem = f"cannot download {repo_id!r} into {local_dir}: {reason}, and that folder lacks some of"
        raise CheckpointError(
            f"{problem} the files needed: {', '.join(patterns)}. Fetch them where the Hub is reachable with "
            f"`lance-trt download --dir <folder>` (add --video for Lance_3B_Video) and pass that folder as the "
            f"checkpoint"
        ) from err
    except (HfHubHTTPError, HFValidationError) as err:
        raise CheckpointError(f"cannot fetch {repo_id!r} from the Hugging Face Hub: {err}") from err
    return Path(path)


def resolve_checkpoint(path_or_repo_id: str | Path, video: bool = False) -> Path:
    """The checkpoint folder: an existing folder as is, else a Hub repo id fetched (or found in the HF cache) with
    only the files `load_lance(video=video)` reads.

    Raises:
        CheckpointError: neither a folder nor a repo id, or the repo cannot be fetched (offline and not cached:
            the message lists the files and how to fetch them); also when a fetched copy lacks a file.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if path.exists() or not _REPO_ID.fullmatch(text):
        raise CheckpointError(f"checkpoint {text!r}: not a folder, and not a Hugging Face repo id (owner/name)")
    root = _snapshot(text, _hub_patterns(video), local_dir=None)
    CheckpointLayout(root, video).check()
    return root


def download(dest_dir: str | Path, repo_id: str = constants.HF_REPO_ID, video: bool = False) -> Path:
    """Fetch the files the runtime needs from `repo_id` into `dest_dir` (`lance-trt download`); `video` adds
    Lance_3B_Video/. Returns `dest_dir`."""
    dest_dir = Path(dest_dir)
    _snapshot(repo_id, _hub_patterns(video, both=video), local_dir=dest_dir)
    CheckpointLayout(dest_dir, False).check()
    if video:
        CheckpointLayout(dest_dir, True).check()
    logger.info("checkpoint %s is in %s", repo_id, dest_dir)
    return dest_dir


# --- Lazy tensor files ------------------------------------------------------------------------------------------------


def _torch_load(path: Path) -> object:
    """`torch.load` memory-mapped; a legacy (pre-zip) file cannot be mapped and is read into memory instead."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        logger.warning("%s is in torch's legacy format: reading it without a memory map", path)
        return torch.load(path, map_location="cpu", weights_only=True)


class TensorFile:
    """One weights file, opened lazily: shapes from the header, tensors read one at a time from a memory map.

    `.safetensors` through `safe_open`; `.pth` through `torch.load(weights_only=True, mmap=True)` (a plain state dict).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            if path.suffix == ".safetensors":
                self._handle = safe_open(str(path), framework="pt", device="cpu")
                self.shapes = {k: tuple(self._handle.get_slice(k).get_shape()) for k in self._handle.keys()}
                self._state: dict[str, Tensor] | None = None
            else:
                state = _torch_load(path)
                if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
                    raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
                self._state = state
                self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        except CheckpointError:
            raise
        except Exception as err:  # safetensors and torch.load raise assorted types for a corrupt file
            raise CheckpointError(f"{path}: cannot read weights: {err}") from err

    def read(self, key: str) -> Tensor:
        """The tensor `key` as stored (CPU; a view of the memory map where the format allows)."""
        return self._handle.get_tensor(key) if self._state is None else self._state[key]

    def close(self) -> None:
        self._handle = self._state = None


@contextmanager
def _open(*paths: Path) -> Iterator[tuple[TensorFile, ...]]:
    files = tuple(TensorFile(p) for p in paths)
    try:
        yield files
    finally:
        for f in files:
            f.close()


# --- Verification and loading -----------------------------------------------------------------------------------------


def _named(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_NAMED])
    return shown + (f" ... and {len(keys) - _MAX_NAMED} more" if len(keys) > _MAX_NAMED else "")


def verify_tensors(
    description: str,
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
) -> None:
    """Raise `CheckpointError` unless `found` has exactly the keys and shapes of `expected`.

    `description` names the file (and key prefix) in the message; every missing, unexpected and mis-shaped key is
    counted, the first few are named with expected vs found shapes.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_named(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_named(unexpected)}")
    if mismatched:
        shapes = [f"{k} expected {list(expected[k])} found {list(found[k])}" for k in mismatched]
        problems.append(f"{len(mismatched)} mis-shaped tensor(s): {_named(shapes)}")
    if problems:
        raise CheckpointError(f"{description}: " + "; ".join(problems))


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with every parameter on the `meta` device while buffers are computed for real.

    Parameters are replaced by storage-less meta tensors as they are registered, so building the full-size model
    costs no memory and no random init; buffers the modules compute (RoPE frequencies, latent statistics, the
    position table) keep their values, since they are not in the checkpoint or are regenerated. Patches
    `nn.Module.register_parameter` for the duration: build one model at a time.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _cast(tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)


def _assign(
    module: nn.Module,
    sources: Mapping[str, tuple[TensorFile, str]],
    description: str,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Verify `sources` (state-dict key -> (file, key in file)) against `module`, then load it tensor by tensor.

    Regenerated keys must be in `sources` with the module's shape; the module's own value is kept (cast like the
    rest). Moves the remaining buffers to `device`, puts the module in eval mode without gradients.
    """
    own = module.state_dict()
    verify_tensors(description, {k: tuple(v.shape) for k, v in own.items()},
                   {k: f.shapes[src] for k, (f, src) in sources.items()})
    state = {}
    for key, (file, src) in sources.items():
        if key in REGENERATED_KEYS:
            assert own[key].device.type != "meta", f"{key} must be computed by the module, not a parameter"
            state[key] = _cast(own[key], device, dtype)
            continue
        tensor = file.read(src)
        if tensor.is_floating_point() != own[key].is_floating_point():
            raise CheckpointError(f"{file.path}: tensor {src} has dtype {tensor.dtype}, expected a "
                                  f"{'floating' if own[key].is_floating_point() else 'integer'} tensor")
        state[key] = _cast(tensor, device, dtype)
    module.load_state_dict(state, strict=True, assign=True)
    module.to(device)  # only the computed non-persistent buffers are still elsewhere
    module.requires_grad_(False)
    module.eval()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read JSON: {err}") from err


def _vae_config(shapes: Mapping[str, tuple[int, ...]], path: Path) -> WanVAEConfig:
    """The VAE ships without a config file: its widths are read off the tensors, the rest is Wan2.2's (the shape
    verification then catches any other difference)."""
    default = WanVAEConfig()
    try:
        dim = shapes["encoder.conv1.weight"][0]
        dec_dim = shapes["decoder.head.0.gamma"][0] // default.dim_mult[0]
    except KeyError as err:
        raise CheckpointError(f"{path}: missing tensor {err.args[0]} (needed to read the VAE widths)") from None
    return replace(default, dim=dim, dec_dim=dec_dim)


def load_mot(layout: CheckpointLayout, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> tuple[LanceMoT, LanceLLMConfig]:
    """The MoT LLM and generation adapters from `<llm_dir>/model.safetensors` + `llm_config.json`."""
    config = _llm_config(layout)
    device = torch.device(device)
    with parameters_on_meta():
        mot = LanceMoT(config)
    with _open(layout.llm_weights) as (weights,):
        sources = {k: (weights, k) for k in weights.shapes if not k.startswith(VIT_PREFIX)}
        logger.info("loading %d tensors from %s", len(sources), weights.path)
        _assign(mot, sources, str(weights.path), device, dtype)
    return mot, config


def _llm_config(layout: CheckpointLayout) -> LanceLLMConfig:
    """llm_config.json, with the position-table size of the model family (not a file field: upstream sets it per
    model, and the stored table must match it)."""
    try:
        return LanceLLMConfig.from_dict(_read_json(layout.llm_config),
                                        max_latent_frames=VIDEO_LATENT_FRAMES if layout.video else 1)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{layout.llm_config}: {err}") from err


def _vision_config(layout: CheckpointLayout) -> VisionConfig:
    try:
        return VisionConfig.from_dict(_read_json(layout.vit_config))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{layout.vit_config}: {err}") from err


def _tokenizer(layout: CheckpointLayout) -> tuple[PreTrainedTokenizerBase, SpecialIds]:
    try:
        return load_tokenizer(layout.tokenizer_dir)
    except TokenizerError as err:
        raise CheckpointError(f"{layout.tokenizer_dir}: {err}") from err


def load_vit(layout: CheckpointLayout, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> tuple[Qwen25VisionTransformer, VisionConfig]:
    """The vision tower from `Qwen2.5-VL-ViT/vit.safetensors` + `config.json`.

    Video model: `vit_model.*` tensors inside `Lance_3B_Video/model.safetensors`, if any, override those of
    vit.safetensors, as upstream loads vit.safetensors first and the Lance checkpoint over it
    (docs/design/model.md §7.2).
    vit.safetensors must be complete either way.
    """
    config = _vision_config(layout)
    device = torch.device(device)
    with parameters_on_meta():
        vit = Qwen25VisionTransformer(config)
    expected = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    with ExitStack() as stack:
        (base,) = stack.enter_context(_open(layout.vit_weights))
        verify_tensors(str(base.path), expected, base.shapes)
        sources = {k: (base, k) for k in base.shapes}
        if layout.video:
            (lance,) = stack.enter_context(_open(layout.llm_weights))
            # Any subset may be present (upstream loads with strict=False), but each must be a ViT key and shape.
            found = {k: shape for k, shape in lance.shapes.items() if k.startswith(VIT_PREFIX)}
            verify_tensors(f"{lance.path} ({VIT_PREFIX}* tensors)",
                           {VIT_PREFIX + k: shape for k, shape in expected.items() if VIT_PREFIX + k in found}, found)
            if found:
                logger.info("%d ViT tensors of %s override %s", len(found), lance.path, base.path)
            sources |= {k[len(VIT_PREFIX):]: (lance, k) for k in found}
        logger.info("loading %d ViT tensors", len(sources))
        _assign(vit, sources, str(base.path), device, dtype)
    return vit, config


def load_vae(layout: CheckpointLayout, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> tuple[WanVAE, WanVAEConfig]:
    """The Wan2.2 VAE from `Wan2.2_VAE.pth` (a plain state dict; widths read off its tensors)."""
    device = torch.device(device)
    with _open(layout.vae_weights) as (weights,):
        config = _vae_config(weights.shapes, weights.path)
        with parameters_on_meta():
            vae = WanVAE(config)
        logger.info("loading %d VAE tensors from %s", len(weights.shapes), weights.path)
        _assign(vae, {k: (weights, k) for k in weights.shapes}, str(weights.path), device, dtype)
    # The latent mean/std are non-persistent buffers: cast them with the weights, as upstream's `vae.to(bf16)` does
    # (a no-op for the already-assigned parameters, so the fp32 mmap stays shared).
    return vae.to(device=device, dtype=dtype), config


@dataclass(frozen=True)
class LanceModels:
    """Everything `load_lance` builds: the three networks (eval mode, no gradients), the tokenizer and its ids,
    and the configs they were built from."""

    mot: LanceMoT
    vit: Qwen25VisionTransformer
    vae: WanVAE
    tokenizer: PreTrainedTokenizerBase
    special_ids: SpecialIds
    llm_config: LanceLLMConfig
    vision_config: VisionConfig
    vae_config: WanVAEConfig
    layout: CheckpointLayout


def load_lance(
    checkpoint: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    video: bool = False,
) -> LanceModels:
    """Load Lance from a checkpoint folder or Hub repo id (see `resolve_checkpoint`).

    Args:
        checkpoint: folder in the HF layout, or a repo id such as `bytedance-research/Lance`.
        device: where the weights go (each tensor is moved as it is read).
        dtype: floating dtype of every checkpoint tensor (the files are bf16 / fp32; both are converted).
        video: load the video model (`Lance_3B_Video/`) instead of the image model (`Lance_3B/`).

    Raises:
        CheckpointError: a missing file, or a missing / unexpected / mis-shaped tensor (named with its file).
    """
    layout = CheckpointLayout(resolve_checkpoint(checkpoint, video=video), video)
    layout.check()
    tokenizer, special_ids = _tokenizer(layout)
    mot, llm_config = load_mot(layout, device=device, dtype=dtype)
    vit, vision_config = load_vit(layout, device=device, dtype=dtype)
    if vision_config.out_hidden_size != llm_config.hidden_size:
        raise CheckpointError(f"{layout.vit_config}: out_hidden_size {vision_config.out_hidden_size} differs from "
                              f"the LLM hidden_size {llm_config.hidden_size} ({layout.llm_config})")
    vae, vae_config = load_vae(layout, device=device, dtype=dtype)
    return LanceModels(mot=mot, vit=vit, vae=vae, tokenizer=tokenizer, special_ids=special_ids,
                       llm_config=llm_config, vision_config=vision_config, vae_config=vae_config, layout=layout)


EMBED_KEY = "language_model.model.embed_tokens.weight"


@dataclass(frozen=True)
class LanceHostParts:
    """What the pipeline computes with on the host when the engines hold the networks (ONNX Runtime, TensorRT):
    the tokenizer, the three configs and the token embedding, nothing else."""

    tokenizer: PreTrainedTokenizerBase
    special_ids: SpecialIds
    llm_config: LanceLLMConfig
    vision_config: VisionConfig
    vae_config: WanVAEConfig
    embed_weight: Tensor


def load_host_parts(checkpoint: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, video: bool = False) -> LanceHostParts:
    """The host side of a checkpoint without building any network: one tensor (the token embedding) is read from
    the memory map; the VAE's widths come from its file header. A real Lance_3B host then holds ~0.6 GB (bf16), not
    the 12 GB of weights the engines already carry.

    Raises:
        CheckpointError: a missing file, or an embedding missing or not ``(vocab_size, hidden_size)``.
    """
    layout = CheckpointLayout(resolve_checkpoint(checkpoint, video=video), video)
    layout.check()
    tokenizer, special_ids = _tokenizer(layout)
    llm_config = _llm_config(layout)
    with _open(layout.llm_weights, layout.vae_weights) as (llm, vae):
        expected = (llm_config.vocab_size, llm_config.hidden_size)
        verify_tensors(str(layout.llm_weights), {EMBED_KEY: expected},
                       {EMBED_KEY: llm.shapes[EMBED_KEY]} if EMBED_KEY in llm.shapes else {})
        embed_weight = _cast(llm.read(EMBED_KEY), torch.device(device), dtype)
        vae_config = _vae_config(vae.shapes, vae.path)
    return LanceHostParts(tokenizer=tokenizer, special_ids=special_ids, llm_config=llm_config,
                          vision_config=_vision_config(layout), vae_config=vae_config, embed_weight=embed_weight)
