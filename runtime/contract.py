"""The one I/O contract: every engine's tensors and the Triton request/response tensors.

Export (names, dynamic axes), the TensorRT build (optimization profiles), the runners (binding), the Triton
``config.pbtxt`` generation, the client and the tests all read this module; no tensor name or shape rule is written
anywhere else (style.md §6).

A shape is a tuple of ints and dimension names. A name is either a dynamic dimension with a (min, opt, max) range in
every profile of its engine, or a size fixed by the model configuration (resolved by ``EngineSpec.resolve``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np


class DType(str, enum.Enum):
    """Tensor element types. ``FLOAT`` is the engine's compute precision: fp32 in ``fp32/`` graphs, bf16 in ``bf16/``."""

    FLOAT = "float"
    FP32 = "fp32"
    BF16 = "bf16"
    INT64 = "int64"
    BOOL = "bool"
    UINT8 = "uint8"
    BYTES = "bytes"

    def concrete(self, precision: str) -> "DType":
        """The dtype in a graph of ``precision`` ("fp32" or "bf16")."""
        if self is DType.FLOAT:
            return DType.BF16 if precision == "bf16" else DType.FP32
        return self

    @property
    def triton(self) -> str:
        """Triton's config.pbtxt spelling."""
        return _TRITON_DTYPES[self]

    @property
    def numpy(self) -> type:
        """The numpy dtype a client sends or receives (BF16 has none: it never crosses the wire)."""
        return _NUMPY_DTYPES[self]


_TRITON_DTYPES = {
    DType.FP32: "TYPE_FP32",
    DType.BF16: "TYPE_BF16",
    DType.INT64: "TYPE_INT64",
    DType.BOOL: "TYPE_BOOL",
    DType.UINT8: "TYPE_UINT8",
    DType.BYTES: "TYPE_STRING",
}
_NUMPY_DTYPES = {
    DType.FP32: np.float32,
    DType.INT64: np.int64,
    DType.BOOL: np.bool_,
    DType.UINT8: np.uint8,
    DType.BYTES: np.object_,
}

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of an engine or of the Triton interface.

    Attributes:
        name: the tensor name in ONNX, TensorRT and Triton.
        dtype: element type.
        shape: ints and dimension names.
        doc: what the tensor holds.
        optional: a Triton request input the client may leave out.
    """

    name: str
    dtype: DType
    shape: tuple[Dim, ...]
    doc: str
    optional: bool = False


# --- Triton request interface of model `lance` (stable: new optional inputs/outputs may be added) -------------

TASKS = ("t2i", "x2t", "edit")

LANCE_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("task", DType.BYTES, (1,), "one of: " + ", ".join(TASKS)),
    TensorSpec("prompt", DType.BYTES, (1,), "UTF-8 prompt (t2i), question (x2t) or instruction (edit)"),
    TensorSpec("image", DType.BYTES, (1,), "encoded PNG or JPEG: required for x2t and edit", optional=True),
    TensorSpec("height", DType.INT64, (1,), "output height, multiple of 16 in [256, 1024]", optional=True),
    TensorSpec("width", DType.INT64, (1,), "output width, multiple of 16 in [256, 1024]", optional=True),
    TensorSpec("steps", DType.INT64, (1,), "denoising steps in [1, 200]", optional=True),
    TensorSpec("seed", DType.INT64, (1,), "noise seed >= 0", optional=True),
    TensorSpec("max_new_tokens", DType.INT64, (1,), "x2t answer budget in [1, 2048]", optional=True),
    TensorSpec("cfg_scale", DType.FP32, (1,), "text guidance scale in [1, 20]", optional=True),
)

LANCE_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("progress", DType.INT64, (2,), "(done, total) per denoise step or generated token"),
    TensorSpec("image", DType.UINT8, ("H", "W", 3), "generated image, final response of t2i and edit"),
    TensorSpec("text", DType.BYTES, (1,), "UTF-8 answer, final response of x2t"),
)


def by_name(specs: tuple[TensorSpec, ...]) -> Mapping[str, TensorSpec]:
    """Index a spec tuple by tensor name."""
    return {spec.name: spec for spec in specs}


# --- Engines -----------------------------------------------------------------------------------------------------
#
# Product ranges the profiles derive from (README "Request interface"): output sides are multiples of 16 in
# [256, 1024] => 16..64 latent cells per side; an edit reference is resized to its aspect bucket at the requested
# area, whose short side can fall to 160 px (21:9 at 256x256) => 10 cells; the ViT sees 7/8 of the VAE side, up to
# 896 px for a 1024x1024 request.

MAX_PROMPT_TOKENS = 1024        # user text split; longer prompts are refused with a RequestError on `prompt`
MAX_PAST = 8192                 # KV rows: system + prompt + ViT block + reference latents + glue, or x2t + answer
MAX_LATENT_SIDE = 64            # constants.MAX_LATENT_SIZE
MIN_LATENT_SIDE = 10
MAX_VIT_PATCHES = 4704          # 14-px patches of the largest ViT bucket (24 x 196 ... see tests/test_contract.py)
MAX_PREFILL_ROWS = MAX_VIT_PATCHES // 4 + 2   # the largest und block: <vs> + merged ViT rows + <ve>

Range = tuple[int, int, int]


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: a (min, opt, max) range for every dynamic dimension of the engine."""

    name: str
    dims: Mapping[str, Range]

    def __post_init__(self) -> None:
        for dim, (lo, opt, hi) in self.dims.items():
            if not 0 <= lo <= opt <= hi:
                raise ValueError(f"profile {self.name!r}: dimension {dim} needs 0 <= min <= opt <= max, got {lo, opt, hi}")


@dataclass(frozen=True)
class EngineSpec:
    """An engine's tensors (inputs, then outputs) and its optimization profiles.

    ``sizes`` maps the configuration-fixed dimension names (hidden size, layer count, ...) to ints; every other name in a
    shape is dynamic and must have a range in every profile (checked on construction).
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: tuple[Profile, ...]
    sizes: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dynamic = self.dynamic_dims
        for profile in self.profiles:
            missing = dynamic - set(profile.dims)
            extra = set(profile.dims) - dynamic
            if missing or extra:
                raise ValueError(
                    f"engine {self.name!r} profile {profile.name!r}: missing ranges {sorted(missing)}, "
                    f"unknown dims {sorted(extra)}"
                )

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def dynamic_dims(self) -> set[str]:
        """Names in input shapes that the configuration does not fix."""
        return {d for t in self.inputs for d in t.shape if isinstance(d, str) and d not in self.sizes}

    def profile(self, name: str) -> Profile:
        for profile in self.profiles:
            if profile.name == name:
                return profile
        raise KeyError(f"engine {self.name!r} has no profile {name!r}; it has {[p.name for p in self.profiles]}")

    def shape(self, tensor: TensorSpec, **dims: int) -> tuple[int, ...]:
        """The concrete shape of ``tensor`` for the given dynamic dimension values (output-only names included)."""
        values = {**self.sizes, **dims}
        try:
            return tuple(d if isinstance(d, int) else values[d] for d in tensor.shape)
        except KeyError as err:
            raise KeyError(f"engine {self.name!r} tensor {tensor.name!r}: no value for dimension {err}") from None

    def profile_shapes(self, profile: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape per input for one profile: what TensorRT's ``IOptimizationProfile.set_shape`` takes."""
        dims = self.profile(profile).dims
        return {
            t.name: tuple(self.shape(t, **{k: v[i] for k, v in dims.items()}) for i in range(3))  # type: ignore[misc]
            for t in self.inputs
        }


def mot_spec(*, hidden: int, layers: int, kv_heads: int, head_dim: int, vocab: int, latent_channels: int) -> EngineSpec:
    """The MoT step (runtime.models.mot.LanceMoT.step): one graph for text prefill, ViT-block prefill, AR decode,
    VAE-reference prefill and the denoise query.

    Rows come as three groups in sequence order, any of which may be empty: ``und_head`` (und expert: text, ViT rows,
    <|vision_start|>), ``latents`` (gen expert, embedded in-graph with the time and position embeddings) and
    ``und_tail`` (und expert: <|vision_end|>). Routing is static slicing, so no ScatterND/NonZero. The attention mode
    is an input (``causal``). Past K/V come in as the runner's preallocated buffer sliced to ``P`` rows with
    ``past_len`` valid rows per batch entry; the new K/V rows come out and the runner writes them, so the graph needs
    no in-place update layer (TensorRT 10.5 compatible). ``B`` is 1, or 2 for the two CFG branches.
    """
    hidden_f = TensorSpec
    return EngineSpec(
        name="mot",
        inputs=(
            hidden_f("und_head", DType.FLOAT, ("B", "Lh", "D"), "und rows before the latent rows (embeddings)"),
            hidden_f("latents", DType.FLOAT, ("B", "Lg", "Z"), "latent tokens routed to the gen expert"),
            hidden_f("timestep", DType.FLOAT, ("B",), "flow time t in [0, 1] of the latent rows"),
            hidden_f("latent_pos", DType.FLOAT, ("Lg", "D"), "latent position-embedding rows"),
            hidden_f("und_tail", DType.FLOAT, ("B", "Lt", "D"), "und rows after the latent rows (embeddings)"),
            hidden_f("cos", DType.FP32, ("B", "L", "HD"), "mRoPE cosines, merged per mrope_section"),
            hidden_f("sin", DType.FP32, ("B", "L", "HD"), "mRoPE sines, merged per mrope_section"),
            hidden_f("past_key", DType.FLOAT, ("NL", "B", "P", "KVH", "HD"), "cached keys (after q/k-norm and RoPE)"),
            hidden_f("past_value", DType.FLOAT, ("NL", "B", "P", "KVH", "HD"), "cached values"),
            hidden_f("past_len", DType.INT64, ("B",), "valid past rows per batch entry (<= P)"),
            hidden_f("causal", DType.BOOL, (), "True: causal among the query rows; False: bidirectional block"),
        ),
        outputs=(
            hidden_f("logits", DType.FP32, ("B", "V"), "lm_head(norm(h)) of the last query row"),
            hidden_f("velocity", DType.FLOAT, ("B", "Lg", "Z"), "llm2vae(norm_moe_gen(h)) on the latent rows"),
            hidden_f("key", DType.FLOAT, ("NL", "B", "L", "KVH", "HD"), "new key rows, written to the cache by the runner"),
            hidden_f("value", DType.FLOAT, ("NL", "B", "L", "KVH", "HD"), "new value rows"),
        ),
        profiles=(
            Profile("prefill", {"B": (1, 1, 2), "Lh": (1, 256, MAX_PREFILL_ROWS), "Lg": (0, 0, 0), "Lt": (0, 0, 0),
                                "L": (1, 256, MAX_PREFILL_ROWS), "P": (0, 256, MAX_PAST)}),
            Profile("decode", {"B": (1, 1, 1), "Lh": (1, 1, 1), "Lg": (0, 0, 0), "Lt": (0, 0, 0),
                               "L": (1, 1, 1), "P": (1, 1024, MAX_PAST)}),
            Profile("gen", {"B": (1, 2, 2), "Lh": (1, 1, 1), "Lg": (MIN_LATENT_SIDE**2, 48 * 48, MAX_LATENT_SIDE**2),
                            "Lt": (1, 1, 1), "L": (MIN_LATENT_SIDE**2 + 2, 48 * 48 + 2, MAX_LATENT_SIDE**2 + 2),
                            "P": (1, 512, MAX_PAST)}),
        ),
        sizes={"D": hidden, "Z": latent_channels, "NL": layers, "KVH": kv_heads, "HD": head_dim, "V": vocab},
    )
