"""What every family's configuration shares: the text decoder's and the SigLIP/CLIP tower's architecture
as read from a Hugging Face `config.json`, and how a model runs (`RunSettings`).

transformers parses and normalizes the JSON (defaults, the v4 `rope_theta`/`rope_scaling` and v5
`rope_parameters` forms); each family (`models/<family>/config.py`) reads its architecture from it into
frozen dataclasses with `text_from_hf`, `vision_from_hf` and `require`, and rejects what we do not
implement with an error that names the field. An architecture config holds the architecture only (two
runs of one model compare equal); how a run executes it — dtypes, rematerialization, run-time checks —
is `RunSettings`, passed beside it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from rdpo_jax.models.lora import LoRASettings

TEXT_FAMILIES = ("llama", "qwen2", "qwen3")
VISION_FAMILIES = {"siglip_vision_model": "siglip", "clip_vision_model": "clip"}
REMAT_POLICIES = ("none", "full", "dots_saveable")
SCAN_AUTO_LAYERS = 16  # scan_layers="auto" scans decoders at least this deep
ATTENTION = ("xla", "jax", "cudnn", "splash")  # layers.attention's implementations
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class UnsupportedConfigError(ValueError):
    """A `config.json` asks for an architecture or option rdpo_jax does not implement."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    family: str  # "siglip" | "clip"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str
    use_head: bool  # SigLIP's attention-pooling head (unused by LLaVA, kept for exact round trips)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + (self.family == "clip")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Sparse MoE feed-forward blocks (`models/moe.py`): a router picks `top_k` of `num_experts` SwiGLU
    experts per token, their outputs weighted by the renormalized router probabilities."""
    num_experts: int
    top_k: int  # num_experts_per_tok
    intermediate_size: int  # moe_intermediate_size, per expert
    layers: tuple[int, ...]  # the decoder layers whose MLP is sparse (the others are dense)
    aux_loss_coef: float  # router_aux_loss_coef: the load-balancing loss's weight in training
    # shared_expert_intermediate_size: a SwiGLU every token goes through, weighted by sigmoid(shared_expert_gate(x))
    # (Qwen3.5-MoE); 0 = none
    shared_intermediate_size: int = 0


@dataclasses.dataclass(frozen=True)
class DeltaNetConfig:
    """Gated DeltaNet mixers (`models/deltanet.py`; transformers' `linear_*` text-config fields)."""
    key_heads: int  # linear_num_key_heads
    value_heads: int  # linear_num_value_heads, a multiple of key_heads
    key_dim: int  # linear_key_head_dim
    value_dim: int  # linear_value_head_dim
    conv_kernel: int  # linear_conv_kernel_dim


@dataclasses.dataclass(frozen=True)
class TextConfig:
    family: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope: tuple[tuple[str, Any], ...]  # sorted items of the normalized rope parameters (without mrope_section)
    # M-RoPE (Qwen2-VL family): head_dim/2 frequencies rotating by position rows t, h, w in sections of these
    # sizes, contiguous or interleaved (Qwen3-VL): `layers.mrope_rows`; () = 1D RoPE
    mrope_section: tuple[int, ...] = ()
    mrope_interleaved: bool = False
    moe: MoEConfig | None = None  # sparse MLPs (Qwen3-VL-MoE); None = every MLP dense


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How a model runs, apart from what it is: the same for every family."""
    param_dtype: Any = jnp.float32
    dtype: Any = None  # compute dtype (activations, matmuls); None = param_dtype
    remat: str = "none"  # one of REMAT_POLICIES
    # The LM head over answer tokens runs over at most this many vocabulary columns at a time (0 = whole),
    # so that float32 logits [A, V] are never all alive (`layers.target_logps`).
    vocab_chunk: int = 16384
    # Raise (also under jit) if placeholders and image features disagree. Under jit this is a host callback,
    # which keeps the program out of JAX's persistent compilation cache; the trainer and the data_prep
    # commands turn it off because ChatTokenizer checks every example's placeholders on the host.
    check_image_tokens: bool = True
    # Attention kernel (`layers.attention`): "xla" (einsums), "cudnn" (jax.nn.dot_product_attention's cuDNN
    # flash attention: GPU, float16/bfloat16), "jax" (that call on XLA), "splash" (Pallas' TPU splash
    # kernel with the layout's mask as block mask, `models.splash`; interpret mode elsewhere), or "auto":
    # splash on TPU, cudnn on a GPU with a half-precision compute dtype, else xla (decided when the model
    # is traced, by backend and dtype).
    attention: str = "auto"
    # Decoder layers with stacked parameters run by one `jax.lax.scan` (compiled once whatever the depth):
    # "on", "off", or "auto": on for decoders of at least SCAN_AUTO_LAYERS layers.
    scan_layers: str = "auto"
    # Low-rank adapters on the frozen base, which may be stored quantized (`models/lora.py`); None = none
    lora: LoRASettings | None = None

    def scan(self, num_layers: int) -> bool:
        """Whether a stack of `num_layers` layers is scanned."""
        return self.scan_layers == "on" or (self.scan_layers == "auto" and num_layers >= SCAN_AUTO_LAYERS)

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise UnsupportedConfigError(f"remat: {self.remat!r} is not one of {REMAT_POLICIES}")
        if self.vocab_chunk < 0:
            raise UnsupportedConfigError(f"vocab_chunk: {self.vocab_chunk} (columns per chunk, 0 = whole) is negative")
        if self.dtype is None:
            object.__setattr__(self, "dtype", self.param_dtype)
        if self.attention not in ("auto",) + ATTENTION:
            raise UnsupportedConfigError(f"attention: {self.attention!r} is not 'auto' or one of {ATTENTION}")
        if self.scan_layers not in ("auto", "on", "off"):
            raise UnsupportedConfigError(f"scan_layers: {self.scan_layers!r} is not 'auto', 'on' or 'off'")

    @classmethod
    def from_config(cls, config) -> RunSettings:
        """A run config's `model.param_dtype`, `dtype`, `remat`, `vocab_chunk`, `attention`, `scan_layers` and `lora`; placeholders
        are checked on the host (ChatTokenizer), so that the compiled programs stay cacheable."""
        m = config.model
        return cls(param_dtype=DTYPES[m.param_dtype], dtype=DTYPES[m.dtype], remat=m.remat, vocab_chunk=m.vocab_chunk,
                   attention=m.attention, scan_layers=m.scan_layers, check_image_tokens=False,
                   lora=LoRASettings.from_config(config.lora) if "lora" in config else None)


def require(cond: bool, field: str, msg: str):
    if not cond:
        raise UnsupportedConfigError(f"config.json: {field}: {msg}")


def vision_from_hf(vc) -> VisionConfig:
    family = VISION_FAMILIES.get(vc.model_type)
    require(family is not None, "vision_config.model_type",
             f"{vc.model_type!r} is not supported; supported: {sorted(VISION_FAMILIES)}")
    require(vc.hidden_size % vc.num_attention_heads == 0, "vision_config.hidden_size",
             f"{vc.hidden_size} is not divisible by num_attention_heads={vc.num_attention_heads}")
    return VisionConfig(
        family=family, hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
        num_layers=vc.num_hidden_layers, num_heads=vc.num_attention_heads, image_size=vc.image_size,
        patch_size=vc.patch_size, num_channels=vc.num_channels, layer_norm_eps=vc.layer_norm_eps,
        hidden_act=vc.hidden_act, use_head=family == "siglip" and bool(getattr(vc, "vision_use_head", True)))


def rope_from_hf(tc, partial: bool = False) -> tuple[tuple[str, Any], ...]:
    """The normalized rope parameters; `partial`: a decoder that rotates part of each head (its
    `partial_rotary_factor` read apart: `rotary_dim`)."""
    params = dict(getattr(tc, "rope_parameters", None) or {})
    if not params:  # transformers < 5: rope_theta + rope_scaling
        params = dict(getattr(tc, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(tc, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    require(kind in ROPE_TYPES, "text_config.rope_parameters.rope_type",
             f"{kind!r} is not supported; supported: {ROPE_TYPES}")
    require(partial or params.get("partial_rotary_factor", 1.0) == 1.0,
            "text_config.rope_parameters.partial_rotary_factor", "only 1.0 (full rotary) is supported")
    params.pop("partial_rotary_factor", None)
    params["rope_type"] = kind
    params.pop("type", None)
    params.pop("mrope_section", None)  # TextConfig.mrope_section and mrope_interleaved
    params.pop("mrope_interleaved", None)
    if kind == "yarn" and params.get("factor") is None:
        params["factor"] = tc.max_position_embeddings / params["original_max_position_embeddings"]
    return tuple(sorted(params.items()))


def text_from_hf(tc, *, family: str | None = None, mrope: str | None = None) -> TextConfig:
    """A transformers text config; `family`: the decoder it is when its `model_type` does not say (the text
    config inside a Qwen2.5-VL is "qwen2_5_vl_text", a Qwen2); `mrope`: "contiguous" or "interleaved" to
    read its M-RoPE sections (None: 1D RoPE)."""
    family = family or tc.model_type
    require(family in TEXT_FAMILIES, "text_config.model_type",
            f"{family!r} is not supported; supported: {list(TEXT_FAMILIES)}")
    if family in ("qwen2", "qwen3"):
        require(not getattr(tc, "use_sliding_window", False), "text_config.use_sliding_window",
                "sliding-window attention is not supported")
    layer_types = getattr(tc, "layer_types", None) or []
    require(all(t == "full_attention" for t in layer_types), "text_config.layer_types",
            f"only full_attention layers are supported, got {sorted(set(layer_types))}")
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    num_kv = tc.num_key_value_heads or tc.num_attention_heads
    require(tc.num_attention_heads % num_kv == 0, "text_config.num_key_value_heads",
            f"{num_kv} does not divide num_attention_heads={tc.num_attention_heads}")
    attention_bias = bool(getattr(tc, "attention_bias", False))
    return TextConfig(
        family=family, vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size, num_layers=tc.num_hidden_layers,
        num_heads=tc.num_attention_heads, num_kv_heads=num_kv, head_dim=head_dim,
        rms_norm_eps=tc.rms_norm_eps, hidden_act=tc.hidden_act,
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(getattr(tc, "mlp_bias", False)), qk_norm=family == "qwen3",
        rope=rope_from_hf(tc), mrope_section=mrope_section_from_hf(tc, head_dim, mrope) if mrope else (),
        mrope_interleaved=mrope == "interleaved", moe=moe_from_hf(tc))


def moe_from_hf(tc) -> MoEConfig | None:
    """The MoE fields of a Qwen-MoE text config (`num_experts` > 0), else None. A layer is sparse unless
    it is in `mlp_only_layers` or (i + 1) is no multiple of `decoder_sparse_step`, as transformers builds it."""
    num = getattr(tc, "num_experts", 0) or 0
    if not num:
        return None
    k, inter, d = tc.num_experts_per_tok, tc.moe_intermediate_size, tc.hidden_size
    require(0 < k <= num, "text_config.num_experts_per_tok", f"{k} must be in 1…num_experts={num}")
    # Expert weights are stored [E, in, out] (Qwen3-VL-MoE's Hub files) or [E, out, in] (transformers 5's
    # Qwen3-VL-MoE, Qwen3.5-MoE's Hub files): told apart by shape, as transformers does, which square ones
    # would not allow.
    require(inter != d and 2 * inter != d, "text_config.moe_intermediate_size",
            f"{inter} (or twice it) equals hidden_size {d}: the two expert weight layouts are then indistinguishable")
    only, step = set(getattr(tc, "mlp_only_layers", None) or ()), getattr(tc, "decoder_sparse_step", 1) or 1
    layers = tuple(i for i in range(tc.num_hidden_layers) if i not in only and (i + 1) % step == 0)
    return MoEConfig(num_experts=num, top_k=k, intermediate_size=inter, layers=layers,
                     aux_loss_coef=float(getattr(tc, "router_aux_loss_coef", 0.0) or 0.0),
                     shared_intermediate_size=int(getattr(tc, "shared_expert_intermediate_size", 0) or 0))


def mrope_section_from_hf(tc, head_dim: int, kind: str) -> tuple[int, ...]:
    require(kind in ("contiguous", "interleaved"), "text_config.rope_parameters", f"M-RoPE kind {kind!r}")
    default = (24, 20, 20) if kind == "interleaved" else (16, 24, 24)  # transformers' defaults per class
    section = tuple(int(n) for n in (getattr(tc, "rope_parameters", None) or {}).get("mrope_section", default))
    require(len(section) == 3 and sum(section) == head_dim // 2, "text_config.rope_parameters.mrope_section",
            f"{list(section)} must be three chunks summing to head_dim/2 = {head_dim // 2}")
    return section
