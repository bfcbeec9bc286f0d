"""The engine contract: every engine's tensors, shapes and optimization profiles.

Export (names, dynamic axes), the TensorRT build (optimization profiles), the runners (binding), the Triton
``config.pbtxt`` generation, and the tests all read this module (the request tensors of model ``lance`` are in
`runtime.spec.request`); no tensor name or shape rule is written anywhere else. The engines themselves are declared
in `runtime.spec.registry`.

A shape is a tuple of ints, dimension names and `DimExpr`s. A name is either a dynamic dimension with a (min, opt, max)
range in every profile of its engine, or a size fixed by the model configuration (``EngineSpec.sizes``); a `DimExpr`
derives a dimension from dynamic ones (``16*h``, ``Lhead+Lgen+Ltail``). Dimension names must parse as plain sympy
symbols, because torch.export parses them (``N``, ``S``, ``Lt``, ``Le`` ... do not). Every other form is a view
generated here once for all engines: `dynamic_axes` (ONNX), `torch_dynamic_shapes` (torch.export),
``EngineSpec.profile_shapes`` (TensorRT), `sample_inputs` (export and tests), `triton_io` (config.pbtxt).

This module imports numpy only (the spec layer stays free of torch); torch is imported inside the views that need it.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from runtime.spec import registry
from runtime.spec.limits import MAX_PROMPT_TOKENS, MAX_TEXT_ROWS


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

@dataclass(frozen=True)
class DimExpr:
    """A dimension derived from dynamic ones: ``sum(coef * name) + offset``.

    Examples: ``scaled("h", 16)`` is an image side of ``h`` latent cells, ``total("Lhead", "Lgen", "Ltail")`` the rows
    of a MoT block, ``last_index("M")`` the largest index into ``M`` rows. ``str()`` is the spelling in ONNX graphs and
    messages (``16*h``, ``Lhead+Lgen+Ltail``, ``M-1``).
    """

    terms: tuple[tuple[str, int], ...]
    offset: int = 0

    def __post_init__(self) -> None:
        if not self.terms or any(coef < 1 for _, coef in self.terms):
            raise ValueError(f"DimExpr needs at least one term with a positive coefficient, got {self.terms}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.terms)

    def evaluate(self, values: Mapping[str, int]) -> int:
        return sum(coef * values[name] for name, coef in self.terms) + self.offset

    def __str__(self) -> str:
        text = "+".join(name if coef == 1 else f"{coef}*{name}" for name, coef in self.terms)
        return text + (f"{self.offset:+d}" if self.offset else "")

    @classmethod
    def parse(cls, text: str) -> "DimExpr":
        """Inverse of ``str()``: ``"16*h"``, ``"Lhead+Lgen+Ltail"``, ``"M-1"``.

        Raises:
            ValueError: not of that form.
        """
        body, offset = text, 0
        for sign in ("+", "-"):
            head, _, tail = text.rpartition(sign)
            if head and tail.isdigit():
                body, offset = head, int(sign + tail)
                break
        terms = []
        for term in body.split("+"):
            coef, _, name = term.rpartition("*")
            if not name.isidentifier() or (coef and not coef.isdigit()):
                raise ValueError(f"not a dimension expression: {text!r}")
            terms.append((name, int(coef) if coef else 1))
        return cls(tuple(terms), offset)


def scaled(name: str, factor: int) -> DimExpr:
    """``factor * name``."""
    return DimExpr(((name, factor),))


def total(*names: str) -> DimExpr:
    """``names[0] + names[1] + ...``."""
    return DimExpr(tuple((name, 1) for name in names))


def last_index(name: str) -> DimExpr:
    """``name - 1``: the largest valid index into ``name`` rows."""
    return DimExpr(((name, 1),), -1)


Dim = int | str | DimExpr


def dim_names(dim: Dim) -> tuple[str, ...]:
    """The dimension names a shape entry refers to."""
    if isinstance(dim, str):
        return (dim,)
    if isinstance(dim, DimExpr):
        return dim.names
    return ()


def resolve(dim: Dim, values: Mapping[str, int]) -> int:
    """The value of a shape entry given every name it refers to.

    Raises:
        KeyError: a name without a value.
    """
    if isinstance(dim, int):
        return dim
    if isinstance(dim, DimExpr):
        return dim.evaluate(values)
    return values[dim]


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of an engine or of the Triton interface.

    Attributes:
        name: the tensor name in ONNX, TensorRT and Triton.
        dtype: element type.
        shape: ints, dimension names and `DimExpr`s.
        doc: what the tensor holds.
        optional: a Triton request input the client may leave out.
        bounds: inclusive (low, high) value range of an integer engine input (indices, lengths); `sample_inputs`
            draws within it and runners may check it.
    """

    name: str
    dtype: DType
    shape: tuple[Dim, ...]
    doc: str
    optional: bool = False
    bounds: tuple[Dim, Dim] | None = None


# --- Engines -----------------------------------------------------------------------------------------------------
#
# The profiles derive from what the product accepts (runtime.spec.request, runtime.pipeline.preprocess; tests/test_contract.py
# recomputes every limit below from preprocess.bucket_table):
# * t2i: output sides are multiples of 16 in [256, 1024] => 16..64 latent cells per side.
# * edit: the reference is resized to its aspect bucket (21:9 .. 9:16) at the requested area (sides 256..1024) and the
#   target shares its latent grid => sides of 10 (21:9 at 256^2: 160 px) .. 98 cells (21:9 at 1024^2: 1568 px), the
#   short side at most 64, at most 42 x 98 = 4116 latent tokens.
# * ViT: buckets at 7/8 of the VAE area side (672 for 768, upstream's image_768res), cropped to multiples of 28:
#   200 .. 4116 patches of 14 px, i.e. 50 .. 1029 merged rows.

MAX_TEXT_SPLIT = MAX_PROMPT_TOKENS + 8   # a user text plus the template tokens sharing its split (x2t's assistant turn)
MIN_LATENT_SIDE = 10            # edit reference, 21:9 at 256 x 256
MAX_LATENT_SIDE = 98            # edit reference, 21:9 at 1024 x 1024 (positions alias past 64, as upstream)
MAX_LATENT_SHORT_SIDE = 64      # the shorter latent side never exceeds constants.MAX_LATENT_SIZE
MIN_LATENT_TOKENS = 230         # 10 x 23: the smallest latent grid (edit, 21:9 at 256 x 256)
MAX_LATENT_TOKENS = 4116        # 42 x 98: the largest latent grid (edit, 21:9 at 1024 x 1024)
MIN_VIT_PATCHES = 200           # 10 x 20 patches: 21:9 at 224 (7/8 of 256), cropped to 140 x 280
MAX_VIT_PATCHES = 4116          # 42 x 98 patches: 21:9 at 896 (7/8 of 1024), cropped to 588 x 1372
VIT_MERGE_UNIT = 4              # patches per merged row (2 x 2): the real and the tiny towers alike
MAX_VIDEO_LATENT_TOKENS = 31 * 1645   # 121 frames (31 latent) of the largest video_480p bucket, 752 x 560 = 47 x 35
MAX_VIDEO_VIT_ROWS = 37 * 464   # 73 input frames = 37 frame pairs of the largest 616-area ViT bucket, 464 x 832 px
MAX_PREFILL_ROWS = max(MAX_VIT_PATCHES // VIT_MERGE_UNIT + 2, MAX_VIDEO_VIT_ROWS + 2, MAX_TEXT_SPLIT)  # a block, or text
MAX_PAST = 256 + MAX_PREFILL_ROWS + MAX_VIDEO_LATENT_TOKENS + 2 + MAX_TEXT_ROWS
"""KV rows: system + ViT block + reference block + prompt (video edit at its largest), or x2t context + answer."""
DEFAULT_LATENT_SIDE = 48        # 768 px, upstream's default size: the profiles' opt
DEFAULT_VIT_ROWS = 576          # 672 x 672 px => 48 x 48 patches => 576 merged rows

ENGINES = tuple(registry.ENGINES)
PRECISIONS = ("fp32", "bf16")

# Metadata of every exported graph (ONNX ``metadata_props``) and plan sidecar: the contract travels with the engine.
META_ENGINE = "lance.engine"
META_PRECISION = "lance.precision"
META_CONTRACT = "lance.contract"        # EngineSpec.to_dict() as JSON
META_SOURCE = "lance.source"            # the checkpoint the weights came from

Range = tuple[int, int, int]


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: a (min, opt, max) range for every dynamic dimension of the engine."""

    name: str
    dims: Mapping[str, Range]

    def __post_init__(self) -> None:
        for dim, (lo, opt, hi) in self.dims.items():
            if not 0 <= lo <= opt <= hi:
                raise ValueError(f"profile {self.name!r}: dimension {dim} needs 0 <= min <= opt <= max, "
                                 f"got {lo, opt, hi}")

    def point(self, which: int) -> dict[str, int]:
        """Every dimension at its min (0), opt (1) or max (2)."""
        return {dim: rng[which] for dim, rng in self.dims.items()}

    def contains(self, values: Mapping[str, int]) -> bool:
        return all(lo <= values[dim] <= hi for dim, (lo, _, hi) in self.dims.items())


@dataclass(frozen=True)
class EngineSpec:
    """An engine's tensors (inputs, then outputs) and its optimization profiles.

    ``sizes`` maps the configuration-fixed dimension names (hidden size, layer count, ...) to ints. Every other name
    in a shape is dynamic: it must have a range in every profile and appear bare (not only inside a `DimExpr`) in
    some input, so that its value can be read off a feed (`dims_of`). Checked on construction.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: tuple[Profile, ...]
    sizes: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError(f"engine {self.name!r}: duplicate tensor names {sorted(names)}")
        if not self.profiles:
            raise ValueError(f"engine {self.name!r}: needs at least one profile")
        dynamic = self.dynamic_dims
        bare = {d for t in self.inputs for d in t.shape if isinstance(d, str)}
        if dynamic - bare:
            raise ValueError(f"engine {self.name!r}: dims {sorted(dynamic - bare)} appear only inside expressions; "
                             "each dynamic dim must be a whole axis of some input")
        for t in self.outputs:
            unknown = {n for d in t.shape for n in dim_names(d)} - dynamic - set(self.sizes)
            if unknown:
                raise ValueError(f"engine {self.name!r} output {t.name!r}: dims {sorted(unknown)} are neither inputs' "
                                 "dims nor sizes")
        for profile in self.profiles:
            missing = dynamic - set(profile.dims)
            extra = set(profile.dims) - dynamic
            if missing or extra:
                raise ValueError(
                    f"engine {self.name!r} profile {profile.name!r}: missing ranges {sorted(missing)}, "
                    f"unknown dims {sorted(extra)}"
                )
            for which in range(3):
                for t in self.tensors:
                    if min(self.shape(t, **profile.point(which)), default=0) < 0:
                        raise ValueError(f"engine {self.name!r} profile {profile.name!r}: {t.name!r} has a negative "
                                         "dimension")

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"engine {self.name!r} has no tensor {name!r}; it has {[t.name for t in self.tensors]}")

    @property
    def dynamic_dims(self) -> frozenset[str]:
        """Names in input shapes that the configuration does not fix."""
        return frozenset(n for t in self.inputs for d in t.shape for n in dim_names(d) if n not in self.sizes)

    def profile(self, name: str) -> Profile:
        for profile in self.profiles:
            if profile.name == name:
                return profile
        raise KeyError(f"engine {self.name!r} has no profile {name!r}; it has {[p.name for p in self.profiles]}")

    def shape(self, tensor: TensorSpec, **dims: int) -> tuple[int, ...]:
        """The concrete shape of ``tensor`` for the given dynamic dimension values."""
        values = {**self.sizes, **dims}
        try:
            return tuple(resolve(d, values) for d in tensor.shape)
        except KeyError as err:
            raise KeyError(f"engine {self.name!r} tensor {tensor.name!r}: no value for dimension {err}") from None

    def dims_of(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
        """The dynamic dimension values of a feed, read off its input shapes and checked against every input.

        Args:
            shapes: every input's shape by name.
        Raises:
            ValueError: a missing input, a wrong rank, or a shape that contradicts the others or the sizes (the message
                names the tensor).
        """
        values: dict[str, int] = {}
        for t in self.inputs:
            if t.name not in shapes:
                raise ValueError(f"engine {self.name!r}: input {t.name!r} is missing")
            shape = tuple(shapes[t.name])
            if len(shape) != len(t.shape):
                raise ValueError(f"engine {self.name!r} input {t.name!r}: rank {len(shape)}, expected "
                                 f"{len(t.shape)} {_spelled(t.shape)}")
            for d, n in zip(t.shape, shape):
                if isinstance(d, str) and d not in self.sizes:
                    values.setdefault(d, int(n))
        for t in self.inputs:
            expected = self.shape(t, **values)
            if tuple(shapes[t.name]) != expected:
                raise ValueError(f"engine {self.name!r} input {t.name!r}: shape {tuple(shapes[t.name])}, expected "
                                 f"{expected} = {_spelled(t.shape)} with {values}")
        return values

    def select_profile(self, dims: Mapping[str, int]) -> int:
        """Index of the first profile whose ranges hold ``dims``.

        Raises:
            ValueError: no profile holds them (names the engine and every profile's ranges).
        """
        for index, profile in enumerate(self.profiles):
            if profile.contains(dims):
                return index
        ranges = "; ".join(f"{p.name}: {dict(p.dims)}" for p in self.profiles)
        raise ValueError(f"engine {self.name!r}: dims {dict(dims)} fit no profile ({ranges})")

    def profile_shapes(self, profile: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape per input for one profile: what TensorRT's ``IOptimizationProfile.set_shape`` takes."""
        p = self.profile(profile)
        return {t.name: (self.shape(t, **p.point(0)), self.shape(t, **p.point(1)), self.shape(t, **p.point(2)))
                for t in self.inputs}

    def dim_range(self, dim: str) -> tuple[int, int]:
        """(min, max) of a dynamic dimension over all profiles: the range the exported graph must cover."""
        return min(p.dims[dim][0] for p in self.profiles), max(p.dims[dim][2] for p in self.profiles)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (exported graphs carry it; `EngineSpec.from_dict` reads it back)."""

        def tensor(t: TensorSpec) -> dict[str, Any]:
            entry: dict[str, Any] = {"name": t.name, "dtype": t.dtype.value, "shape": [_dim_json(d) for d in t.shape],
                                     "doc": t.doc}
            if t.bounds is not None:
                entry["bounds"] = [_dim_json(b) for b in t.bounds]
            return entry

        return {"name": self.name, "inputs": [tensor(t) for t in self.inputs],
                "outputs": [tensor(t) for t in self.outputs],
                "profiles": [{"name": p.name, "dims": {k: list(v) for k, v in p.dims.items()}} for p in self.profiles],
                "sizes": dict(self.sizes)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EngineSpec":
        """Inverse of `to_dict`.

        Raises:
            ValueError, KeyError: a malformed mapping.
        """

        def tensor(entry: Mapping[str, Any]) -> TensorSpec:
            bounds = entry.get("bounds")
            return TensorSpec(entry["name"], DType(entry["dtype"]), tuple(_dim_from_json(d) for d in entry["shape"]),
                              entry["doc"], bounds=None if bounds is None else tuple(_dim_from_json(b) for b in bounds))

        return cls(
            name=values["name"],
            inputs=tuple(tensor(t) for t in values["inputs"]),
            outputs=tuple(tensor(t) for t in values["outputs"]),
            profiles=tuple(Profile(p["name"], {k: tuple(v) for k, v in p["dims"].items()}) for p in values["profiles"]),
            sizes=dict(values["sizes"]),
        )

    def digest(self) -> str:
        """sha256 of the canonical `to_dict` JSON: equal digests mean the same tensors, sizes and profiles."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _dim_json(dim: Dim) -> int | str:
    """Ints stay ints; names and expressions become their spelling ("16*h")."""
    return dim if isinstance(dim, int) else str(dim)


def _dim_from_json(value: int | str) -> Dim:
    if isinstance(value, int) or value.isidentifier():
        return value
    return DimExpr.parse(value)


def _spelled(shape: Iterable[Dim]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


# --- The engines -------------------------------------------------------------------------------------------------


def mot_spec(*, hidden: int, layers: int, kv_heads: int, head_dim: int, vocab: int, latent_channels: int) -> EngineSpec:
    """The MoT step (runtime.models.mot.LanceMoT.step): one graph for text prefill, ViT-block prefill, AR decode,
    VAE-reference prefill and the denoise query.

    Rows come as three groups in sequence order, any of which may be empty: ``und_head`` (und expert: text, ViT rows,
    <|vision_start|>), ``latents`` (gen expert, embedded in-graph with the time and position embeddings) and
    ``und_tail`` (und expert: <|vision_end|>); ``L = Lhead + Lgen + Ltail``. Routing is static slicing, so no
    ScatterND/NonZero. The attention mode is an input (``causal``). Past K/V come in as the runner's preallocated
    buffer sliced to ``P`` rows with ``past_len`` valid rows per batch entry; the new K/V rows come out and the runner
    writes them, so the graph needs no in-place update layer (TensorRT 10.5 compatible). ``B`` is 1, or 2 for the two
    CFG branches. The flow time stays fp32 in every precision, as upstream's ``timestep`` tensor, and comes per latent row
    as upstream's: i2v keeps its first latent frame clean (t = 0) inside the noise block.
    """
    rows = total("Lhead", "Lgen", "Ltail")
    return EngineSpec(
        name="mot",
        inputs=(
            TensorSpec("und_head", DType.FLOAT, ("B", "Lhead", "D"), "und rows before the latent rows (embeddings)"),
            TensorSpec("latents", DType.FLOAT, ("B", "Lgen", "Z"), "latent tokens routed to the gen expert"),
            TensorSpec("timestep", DType.FP32, ("B", "Lgen"),
                       "flow time t in [0, 1] of each latent row (0: clean, a reference or an i2v first frame)"),
            TensorSpec("latent_pos", DType.FLOAT, ("Lgen", "D"), "latent position-embedding rows"),
            TensorSpec("und_tail", DType.FLOAT, ("B", "Ltail", "D"), "und rows after the latent rows (embeddings)"),
            TensorSpec("cos", DType.FP32, ("B", rows, "HD"), "mRoPE cosines, merged per mrope_section"),
            TensorSpec("sin", DType.FP32, ("B", rows, "HD"), "mRoPE sines, merged per mrope_section"),
            TensorSpec("past_key", DType.FLOAT, ("NL", "B", "P", "KVH", "HD"), "cached keys (after q/k-norm and RoPE)"),
            TensorSpec("past_value", DType.FLOAT, ("NL", "B", "P", "KVH", "HD"), "cached values"),
            TensorSpec("past_len", DType.INT64, ("B",), "valid past rows per batch entry (<= P)", bounds=(0, "P")),
            TensorSpec("causal", DType.BOOL, (), "True: causal among the query rows; False: bidirectional block"),
        ),
        outputs=(
            TensorSpec("logits", DType.FP32, ("B", "V"), "lm_head(norm(h)) of the last query row"),
            TensorSpec("velocity", DType.FLOAT, ("B", "Lgen", "Z"), "llm2vae(norm_moe_gen(h)) on the latent rows"),
            TensorSpec("key", DType.FLOAT, ("NL", "B", rows, "KVH", "HD"),
                       "new key rows, written to the cache by the runner"),
            TensorSpec("value", DType.FLOAT, ("NL", "B", rows, "KVH", "HD"), "new value rows"),
        ),
        profiles=(
            Profile("prefill", {"B": (1, 1, 2), "Lhead": (1, 256, MAX_PREFILL_ROWS), "Lgen": (0, 0, 0),
                                "Ltail": (0, 0, 0), "P": (0, 256, MAX_PAST)}),
            Profile("decode", {"B": (1, 1, 1), "Lhead": (1, 1, 1), "Lgen": (0, 0, 0), "Ltail": (0, 0, 0),
                               "P": (1, 1024, MAX_PAST)}),
            Profile("gen", {"B": (1, 2, 2), "Lhead": (1, 1, 1),
                            "Lgen": (MIN_LATENT_TOKENS, DEFAULT_LATENT_SIDE**2,
                                     max(MAX_LATENT_TOKENS, MAX_VIDEO_LATENT_TOKENS)),
                            "Ltail": (1, 1, 1), "P": (1, 512, MAX_PAST)}),
        ),
        sizes={"D": hidden, "Z": latent_channels, "NL": layers, "KVH": kv_heads, "HD": head_dim, "V": vocab},
    )


def vit_spec(*, patch_dim: int, head_dim: int, out_hidden: int, merge_unit: int) -> EngineSpec:
    """The vision tower (runtime.models.vit.Qwen25VisionTransformer.forward) on one image's ``merge_unit * M``
    patches (``M`` merged rows out); window order, rotary tables and block masks come from the host
    (``vision_inputs``)."""
    patches = scaled("M", merge_unit)
    return EngineSpec(
        name="vit",
        inputs=(
            TensorSpec("patches", DType.FP32, (patches, "PD"), "patch rows in preprocessing order"),
            TensorSpec("cos", DType.FP32, (patches, "HD"), "2-D rotary cosines in window order"),
            TensorSpec("sin", DType.FP32, (patches, "HD"), "2-D rotary sines in window order"),
            TensorSpec("window_mask", DType.FP32, (patches, patches), "additive block mask per window"),
            TensorSpec("full_mask", DType.FP32, (patches, patches), "additive block mask per frame"),
            TensorSpec("window_index", DType.INT64, ("M",), "merge group at each window-order slot",
                       bounds=(0, last_index("M"))),
            TensorSpec("reverse_index", DType.INT64, ("M",), "inverse permutation of window_index",
                       bounds=(0, last_index("M"))),
        ),
        outputs=(TensorSpec("hidden", DType.FLOAT, ("M", "DO"), "one LLM row per merged token, raster order"),),
        profiles=(Profile("image", {"M": (MIN_VIT_PATCHES // VIT_MERGE_UNIT, DEFAULT_VIT_ROWS,
                                          MAX_VIT_PATCHES // VIT_MERGE_UNIT)}),),
        sizes={"PD": patch_dim, "HD": head_dim, "DO": out_hidden},
    )


def _latent_profiles() -> tuple[Profile, ...]:
    """Landscape and portrait grids: the short side is at most `MAX_LATENT_SHORT_SIDE`, so two profiles bound the
    activation memory at 64 x 98 cells where one square profile would need 98 x 98."""
    short = (MIN_LATENT_SIDE, DEFAULT_LATENT_SIDE, MAX_LATENT_SHORT_SIDE)
    long = (MIN_LATENT_SIDE, DEFAULT_LATENT_SIDE, MAX_LATENT_SIDE)
    return Profile("landscape", {"h": short, "w": long}), Profile("portrait", {"h": long, "w": short})


def vae_encode_spec(*, latent_channels: int, image_channels: int, spatial_factor: int) -> EngineSpec:
    """Image -> sampled latent (runtime.models.vae: ``encode_image`` then ``sample_posterior``). The
    reparameterisation noise is an input, so a seed reproduces the sample. I/O is fp32 in every precision (upstream
    casts the VAE's outputs to float); the bf16 graph computes in bf16 inside."""
    pixels = (1, "C", scaled("h", spatial_factor), scaled("w", spatial_factor))
    latent = (1, "Z", "h", "w")
    return EngineSpec(
        name="vae_encode",
        inputs=(
            TensorSpec("image", DType.FP32, pixels, "RGB in [-1, 1]"),
            TensorSpec("noise", DType.FP32, latent, "standard normal reparameterisation noise"),
        ),
        outputs=(
            TensorSpec("latent", DType.FP32, latent, "mean + exp(log_var / 2) * noise (normalised latent)"),
            TensorSpec("mean", DType.FP32, latent, "normalised posterior mean"),
            TensorSpec("log_var", DType.FP32, latent, "raw posterior log-variance"),
        ),
        profiles=_latent_profiles(),
        sizes={"C": image_channels, "Z": latent_channels},
    )


def vae_decode_spec(*, latent_channels: int, image_channels: int, spatial_factor: int) -> EngineSpec:
    """Normalised latent -> image in [-1, 1] (runtime.models.vae ``decode_image``). I/O is fp32 in every precision."""
    return EngineSpec(
        name="vae_decode",
        inputs=(TensorSpec("latent", DType.FP32, (1, "Z", "h", "w"), "normalised latent"),),
        outputs=(TensorSpec("image", DType.FP32, (1, "C", scaled("h", spatial_factor), scaled("w", spatial_factor)),
                            "RGB in [-1, 1]"),),
        profiles=_latent_profiles(),
        sizes={"C": image_channels, "Z": latent_channels},
    )


def _side(name: str, scale: int) -> Dim:
    return name if scale == 1 else scaled(name, scale)


def _cache_spec(prefix: str, slot: Any, what: str) -> TensorSpec:
    """One causal cache of a chunk engine: ``(1, channels, frames, scale * h, scale * w)``."""
    shape = (1, slot.channels, slot.frames, _side("h", slot.scale), _side("w", slot.scale))
    return TensorSpec(f"{prefix}.{slot.name}", DType.FP32, shape, f"{what} of {slot.name}")


def _chunk_steps(name: str, inputs: tuple[Callable[[int], TensorSpec], ...], outputs: tuple[Callable[[int], TensorSpec], ...],
                 temporal_factor: int, caches: Sequence[Any], sizes: Mapping[str, int]) -> tuple[EngineSpec, EngineSpec]:
    """``<name>_first`` (one frame, starts the caches) and ``<name>_chunk`` (``temporal_factor`` frames of pixels, or
    one latent frame, and the caches): each tensor factory takes the chunk's pixel-frame count."""
    nexts = tuple(_cache_spec("next", slot, "causal cache after this chunk") for slot in caches)
    first = EngineSpec(name=f"{name}_first", inputs=tuple(make(1) for make in inputs),
                       outputs=(*(make(1) for make in outputs), *nexts), profiles=_latent_profiles(), sizes=sizes)
    chunk = EngineSpec(name=f"{name}_chunk",
                       inputs=(*(make(temporal_factor) for make in inputs),
                               *(_cache_spec("past", slot, "causal cache before this chunk") for slot in caches)),
                       outputs=(*(make(temporal_factor) for make in outputs), *nexts),
                       profiles=_latent_profiles(), sizes=sizes)
    return first, chunk


def vae_video_specs(*, latent_channels: int, image_channels: int, spatial_factor: int, temporal_factor: int,
                    encoder_caches: Sequence[Any], decoder_caches: Sequence[Any]) -> tuple[EngineSpec, ...]:
    """The video VAE's chunk steps (runtime.models.vae ``encode_first_chunk`` / ``encode_chunk``,
    ``decode_first_chunk`` / ``decode_chunk``): frame 0 (latent frame 0) alone starts the causal caches; each later
    step takes ``temporal_factor`` frames (one latent frame) and the caches and returns them updated. The caches are
    engine inputs and outputs (``past.<conv>`` / ``next.<conv>``, one per causal convolution), so one chunk's
    activations are all a call holds: 121 frames take the memory of one chunk. The encoder samples its latent frame
    with the noise input, as ``vae_encode`` does for one image; I/O is fp32 in every precision, as the image engines'.

    Args:
        encoder_caches, decoder_caches: cache slots in call order (``WanVAEConfig.encoder_cache_slots`` /
            ``decoder_cache_slots``): ``name``, ``channels``, ``frames`` and ``scale`` (cache side over latent
            side) each.
    Returns:
        ``vae_encode_first``, ``vae_encode_chunk``, ``vae_decode_first``, ``vae_decode_chunk``.
    """
    def pixels(name: str, what: str) -> Callable[[int], TensorSpec]:
        return lambda count: TensorSpec(name, DType.FP32, (1, "C", count, scaled("h", spatial_factor),
                                                            scaled("w", spatial_factor)), what)

    def latent(name: str, what: str) -> Callable[[int], TensorSpec]:
        return lambda count: TensorSpec(name, DType.FP32, (1, "Z", 1, "h", "w"), what)

    sizes = {"C": image_channels, "Z": latent_channels}
    encode = _chunk_steps("vae_encode", (pixels("video", "the chunk's frames, RGB in [-1, 1]"),
                                         latent("noise", "standard normal reparameterisation noise")),
                          (latent("latent", "mean + exp(log_var / 2) * noise (normalised latent frame)"),
                           latent("mean", "normalised posterior mean"), latent("log_var", "raw posterior log-variance")),
                          temporal_factor, encoder_caches, sizes)
    decode = _chunk_steps("vae_decode", (latent("latent", "the chunk's normalised latent frame"),),
                          (pixels("video", "the chunk's frames, RGB in [-1, 1]"),), temporal_factor, decoder_caches,
                          sizes)
    return (*encode, *decode)


def engine_specs(llm_config: Any, vision_config: Any, vae_config: Any) -> dict[str, EngineSpec]:
    """Every engine's spec with the fixed sizes read from the configs.

    Args:
        llm_config: ``runtime.models.mot.LanceLLMConfig``.
        vision_config: ``runtime.models.vit.VisionConfig``.
        vae_config: ``runtime.models.vae.WanVAEConfig`` (its ``encoder_cache_slots()`` and ``decoder_cache_slots()``
            shape the video VAE's caches).
    Returns:
        ``{name: spec}`` in `ENGINES` order.
    Raises:
        ValueError: the configs disagree (ViT output width vs LLM width, a merge unit other than `VIT_MERGE_UNIT`).
    """
    if vision_config.out_hidden_size != llm_config.hidden_size:
        raise ValueError(f"ViT out_hidden_size {vision_config.out_hidden_size} != LLM hidden_size "
                         f"{llm_config.hidden_size}")
    if vision_config.merge_unit != VIT_MERGE_UNIT:
        raise ValueError(f"the ViT profiles assume {VIT_MERGE_UNIT} patches per merged row, the config has "
                         f"{vision_config.merge_unit}")
    vae = {"latent_channels": vae_config.z_dim, "image_channels": vae_config.image_channels,
           "spatial_factor": vae_config.spatial_factor}
    specs = (
        vit_spec(patch_dim=vision_config.patch_dim, head_dim=vision_config.head_dim,
                 out_hidden=vision_config.out_hidden_size, merge_unit=vision_config.merge_unit),
        mot_spec(hidden=llm_config.hidden_size, layers=llm_config.num_hidden_layers,
                 kv_heads=llm_config.num_key_value_heads, head_dim=llm_config.head_dim, vocab=llm_config.vocab_size,
                 latent_channels=vae_config.z_dim),
        vae_encode_spec(**vae),
        vae_decode_spec(**vae),
        *vae_video_specs(**vae, temporal_factor=vae_config.temporal_factor,
                         encoder_caches=vae_config.encoder_cache_slots(),
                         decoder_caches=vae_config.decoder_cache_slots()),
    )
    by_name = {spec.name: spec for spec in specs}
    assert tuple(by_name) == ENGINES, f"contract {tuple(by_name)} != registry {ENGINES}"
    return by_name


# --- Views ---------------------------------------------------------------------------------------------------------


def dynamic_axes(spec: EngineSpec) -> dict[str, dict[int, str]]:
    """``{tensor: {axis: dim spelling}}`` for every non-fixed axis of every input and output: the ONNX graph's
    ``dim_param`` names (``torch.onnx.export``'s legacy ``dynamic_axes`` form)."""
    axes: dict[str, dict[int, str]] = {}
    for t in spec.tensors:
        named = {i: str(d) for i, d in enumerate(t.shape)
                 if not isinstance(d, int) and not (isinstance(d, str) and d in spec.sizes)}
        if named:
            axes[t.name] = named
    return axes


def torch_dynamic_shapes(spec: EngineSpec) -> dict[str, dict[int, Any]]:
    """``dynamic_shapes`` for ``torch.export`` / ``torch.onnx.export(dynamo=True)``, keyed by input name.

    A dynamic dim becomes a named ``torch.export.Dim`` over its range across profiles (so the graph holds readable
    names and no 0/1 specialisation); ``factor * name`` becomes the derived Dim; a sum of dims becomes ``Dim.AUTO``
    (torch.export cannot declare it and infers the relation from the graph).
    """
    from torch.export import Dim as TorchDim

    roots = {name: TorchDim(name, min=spec.dim_range(name)[0]) for name in sorted(spec.dynamic_dims)}
    shapes: dict[str, dict[int, Any]] = {}
    for t in spec.inputs:
        axes: dict[int, Any] = {}
        for i, d in enumerate(t.shape):
            if isinstance(d, str) and d in roots:
                axes[i] = roots[d]
            elif isinstance(d, DimExpr):
                if len(d.terms) == 1:
                    (name, coef), = d.terms
                    axes[i] = coef * roots[name] + d.offset
                else:
                    axes[i] = TorchDim.AUTO
        shapes[t.name] = axes
    return shapes


_EXPORT_VALUES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def export_dims(spec: EngineSpec) -> dict[str, int]:
    """Small, pairwise different values >= 2 (and >= each dim's minimum) for tracing: torch.export specialises
    dims traced at 0 or 1, and equal example sizes invite spurious equalities between dims."""
    values: dict[str, int] = {}
    taken: set[int] = set()
    for name in sorted(spec.dynamic_dims):
        low = max(2, spec.dim_range(name)[0])
        value = next(v for v in (*_EXPORT_VALUES, *range(low, low + 64)) if v >= low and v not in taken)
        values[name] = value
        taken.add(value)
    return values


def torch_dtype(dtype: DType, precision: str) -> Any:
    """The torch dtype of an engine tensor in a graph of ``precision``."""
    import torch

    return {DType.FP32: torch.float32, DType.BF16: torch.bfloat16, DType.INT64: torch.int64, DType.BOOL: torch.bool,
            DType.UINT8: torch.uint8}[dtype.concrete(precision)]


def sample_inputs(spec: EngineSpec, precision: str = "fp32", *, seed: int = 0, **dims: int) -> dict[str, Any]:
    """Random inputs of the shapes ``dims`` give: floats ~ N(0, 1), integers uniform within their ``bounds``, booleans
    fair coins; one seeded CPU generator, so a seed reproduces them.

    Raises:
        KeyError: a dynamic dim without a value.
        ValueError: ``precision`` is not one of `PRECISIONS`.
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    missing = spec.dynamic_dims - set(dims)
    if missing:
        raise KeyError(f"engine {spec.name!r}: no value for dims {sorted(missing)}")
    generator = torch.Generator().manual_seed(seed)
    values = {**spec.sizes, **dims}
    feed: dict[str, Any] = {}
    for t in spec.inputs:
        shape = spec.shape(t, **dims)
        dtype = torch_dtype(t.dtype, precision)
        if dtype.is_floating_point:
            feed[t.name] = torch.randn(shape, generator=generator).to(dtype)
        elif dtype == torch.bool:
            feed[t.name] = torch.randint(0, 2, shape, generator=generator).bool()
        else:
            low, high = (resolve(b, values) for b in t.bounds) if t.bounds else (0, 0)
            feed[t.name] = torch.randint(low, high + 1, shape, generator=generator, dtype=dtype)
    return feed


def triton_io(spec: EngineSpec, precision: str) -> str:
    """The ``input [...]`` and ``output [...]`` blocks of a ``config.pbtxt`` with ``max_batch_size: 0`` (shapes are
    whole, dynamic axes are -1; a scalar is sent as ``[1]`` and reshaped to ``[]``)."""

    def block(kind: str, tensors: tuple[TensorSpec, ...]) -> str:
        entries = []
        for t in tensors:
            dims = [spec.sizes[d] if isinstance(d, str) and d in spec.sizes else d if isinstance(d, int) else -1
                    for d in t.shape]
            lines = [f'    name: "{t.name}"', f"    data_type: {t.dtype.concrete(precision).triton}"]
            if dims:
                lines.append(f"    dims: [ {', '.join(str(d) for d in dims)} ]")
            else:
                lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
            entries.append("  {\n" + "\n".join(lines) + "\n  }")
        return f"{kind} [\n" + ",\n".join(entries) + "\n]"

    return block("input", spec.inputs) + "\n" + block("output", spec.outputs) + "\n"
