"""Model configuration: the architecture as read from a Hugging Face `config.json`, and how to run it.

transformers parses and normalizes the JSON (defaults, the v4 `rope_theta`/`rope_scaling` and v5
`rope_parameters` forms); we read the architecture from it into frozen dataclasses and reject what we do
not implement with an error that names the field. An architecture config holds the architecture only
(two runs of one model compare equal); how a run executes it — dtypes, rematerialization, run-time
checks — is `RunSettings`, passed beside it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

TEXT_FAMILIES = ("llama", "qwen2", "qwen3")
# model_type of a text config inside a multimodal one -> the decoder family it is
TEXT_ALIASES = {"qwen2_5_vl_text": "qwen2"}
# model_type -> the transformers class (config.json's `architectures`, what vLLM picks the model by)
ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
MODEL_TYPES = tuple(ARCHITECTURES)
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
    # M-RoPE (Qwen2-VL family): head_dim/2 frequencies split in contiguous chunks of these sizes, chunk i
    # rotating by position row i % 3 (t, h, w); () = 1D RoPE
    mrope_section: tuple[int, ...] = ()


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
        """A run config's `model.param_dtype`, `dtype`, `remat`, `vocab_chunk`, `attention` and `scan_layers`; placeholders
        are checked on the host (ChatTokenizer), so that the compiled programs stay cacheable."""
        m = config.model
        return cls(param_dtype=DTYPES[m.param_dtype], dtype=DTYPES[m.dtype], remat=m.remat, vocab_chunk=m.vocab_chunk,
                   attention=m.attention, scan_layers=m.scan_layers, check_image_tokens=False)


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """The architecture of a LLaVA-style model."""
    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    projector_hidden_act: str
    projector_bias: bool
    vision_feature_layer: int | tuple[int, ...]
    vision_feature_select_strategy: str  # "default" drops the first token, "full" keeps all
    tie_word_embeddings: bool

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Indices into the vision tower's hidden states (0 = embeddings), made non-negative."""
        layers = self.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else layers
        n = self.vision.num_layers + 1
        return tuple(i % n for i in layers)

    @property
    def image_seq_len(self) -> int:
        """Number of placeholder tokens (= projected features) per image."""
        return self.vision.num_positions - (self.vision_feature_select_strategy == "default")

    @property
    def projector_in(self) -> int:
        return self.vision.hidden_size * len(self.feature_layers)


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    """The Qwen2.5-VL vision tower (`models/qwen_vision.py`)."""
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int  # spatial_merge_size
    window_size: int  # in pixels
    fullatt_block_indexes: tuple[int, ...]
    out_hidden_size: int
    in_channels: int = 3
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, vc) -> QwenVisionConfig:
        """A `transformers.Qwen2_5_VLVisionConfig`."""
        rope = dict(getattr(vc, "rope_parameters", None) or {})
        return cls(depth=vc.depth, hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                   num_heads=vc.num_heads, patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                   merge_size=vc.spatial_merge_size, window_size=vc.window_size,
                   fullatt_block_indexes=tuple(vc.fullatt_block_indexes), out_hidden_size=vc.out_hidden_size,
                   in_channels=vc.in_channels, hidden_act=vc.hidden_act, rope_theta=rope.get("rope_theta", 10000.0))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def window_tokens(self) -> int:
        """A window's side in merged tokens (transformers: window_size // merge // patch)."""
        return self.window_size // self.merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    """The architecture of a Qwen2.5-VL model (`models/qwen_vl.py`)."""
    vision: QwenVisionConfig
    text: TextConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    tie_word_embeddings: bool


def _require(cond: bool, field: str, msg: str):
    if not cond:
        raise UnsupportedConfigError(f"config.json: {field}: {msg}")


def _vision_from_hf(vc) -> VisionConfig:
    family = VISION_FAMILIES.get(vc.model_type)
    _require(family is not None, "vision_config.model_type",
             f"{vc.model_type!r} is not supported; supported: {sorted(VISION_FAMILIES)}")
    _require(vc.hidden_size % vc.num_attention_heads == 0, "vision_config.hidden_size",
             f"{vc.hidden_size} is not divisible by num_attention_heads={vc.num_attention_heads}")
    return VisionConfig(
        family=family, hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
        num_layers=vc.num_hidden_layers, num_heads=vc.num_attention_heads, image_size=vc.image_size,
        patch_size=vc.patch_size, num_channels=vc.num_channels, layer_norm_eps=vc.layer_norm_eps,
        hidden_act=vc.hidden_act, use_head=family == "siglip" and bool(getattr(vc, "vision_use_head", True)))


def _rope_from_hf(tc) -> tuple[tuple[str, Any], ...]:
    params = dict(getattr(tc, "rope_parameters", None) or {})
    if not params:  # transformers < 5: rope_theta + rope_scaling
        params = dict(getattr(tc, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(tc, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    _require(kind in ROPE_TYPES, "text_config.rope_parameters.rope_type",
             f"{kind!r} is not supported; supported: {ROPE_TYPES}")
    _require(params.get("partial_rotary_factor", 1.0) == 1.0, "text_config.rope_parameters.partial_rotary_factor",
             "only 1.0 (full rotary) is supported")
    params["rope_type"] = kind
    params.pop("type", None)
    params.pop("mrope_section", None)  # TextConfig.mrope_section
    if kind == "yarn" and params.get("factor") is None:
        params["factor"] = tc.max_position_embeddings / params["original_max_position_embeddings"]
    return tuple(sorted(params.items()))


def _text_from_hf(tc) -> TextConfig:
    family = TEXT_ALIASES.get(tc.model_type, tc.model_type)
    _require(family in TEXT_FAMILIES, "text_config.model_type",
             f"{family!r} is not supported; supported: {list(TEXT_FAMILIES)}")
    if family in ("qwen2", "qwen3"):
        _require(not getattr(tc, "use_sliding_window", False), "text_config.use_sliding_window",
                 "sliding-window attention is not supported")
    layer_types = getattr(tc, "layer_types", None) or []
    _require(all(t == "full_attention" for t in layer_types), "text_config.layer_types",
             f"only full_attention layers are supported, got {sorted(set(layer_types))}")
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    num_kv = tc.num_key_value_heads or tc.num_attention_heads
    _require(tc.num_attention_heads % num_kv == 0, "text_config.num_key_value_heads",
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
        rope=_rope_from_hf(tc), mrope_section=_mrope_section(tc, head_dim))


def _mrope_section(tc, head_dim: int) -> tuple[int, ...]:
    if tc.model_type not in TEXT_ALIASES:
        return ()
    section = tuple(int(n) for n in (getattr(tc, "rope_parameters", None) or {}).get("mrope_section", (16, 24, 24)))
    _require(len(section) == 3 and sum(section) == head_dim // 2, "text_config.rope_parameters.mrope_section",
             f"{list(section)} must be three chunks summing to head_dim/2 = {head_dim // 2}")
    return section


def from_hf(hf) -> LlavaConfig | QwenVLConfig:
    """Reads a transformers config (or a `config.json` dict) of a supported `model_type` into our
    architecture config: `LlavaConfig` or `QwenVLConfig`."""
    import transformers  # heavy import, only where configs are read

    model_type = hf.get("model_type") if isinstance(hf, dict) else hf.model_type
    _require(model_type in MODEL_TYPES, "model_type", f"{model_type!r} is not supported; supported: {list(MODEL_TYPES)}")
    if isinstance(hf, dict):
        hf = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in hf.items() if k != "model_type"})
    return _llava_from_hf(hf) if model_type == "llava" else _qwen_vl_from_hf(hf)


def _llava_from_hf(hf) -> LlavaConfig:
    vision, text = _vision_from_hf(hf.vision_config), _text_from_hf(hf.text_config)
    layer = hf.vision_feature_layer
    layer = int(layer) if isinstance(layer, (int, np.integer)) else tuple(int(i) for i in layer)
    for i in (layer,) if isinstance(layer, int) else layer:
        _require(-(vision.num_layers + 1) <= i <= vision.num_layers, "vision_feature_layer",
                 f"{i} is out of range for a vision tower with {vision.num_layers} layers")
    _require(hf.vision_feature_select_strategy in ("default", "full"), "vision_feature_select_strategy",
             f"{hf.vision_feature_select_strategy!r} is not 'default' or 'full'")
    return LlavaConfig(
        vision=vision, text=text, image_token_id=int(hf.image_token_id),
        projector_hidden_act=hf.projector_hidden_act,
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        vision_feature_layer=layer, vision_feature_select_strategy=hf.vision_feature_select_strategy,
        tie_word_embeddings=bool(hf.tie_word_embeddings))


def _qwen_vl_from_hf(hf) -> QwenVLConfig:
    vc = hf.vision_config
    rope = dict(getattr(vc, "rope_parameters", None) or {})
    _require(rope.get("rope_type", "axial") == "axial", "vision_config.rope_parameters.rope_type",
             f"{rope.get('rope_type')!r} is not supported; supported: ['axial']")
    _require(vc.hidden_size % vc.num_heads == 0 and (vc.hidden_size // vc.num_heads) % 4 == 0,
             "vision_config.num_heads", f"hidden_size {vc.hidden_size} / num_heads {vc.num_heads} must be a "
             "head_dim divisible by 4 (2D rotary embedding)")
    for i in vc.fullatt_block_indexes:
        _require(0 <= i < vc.depth, "vision_config.fullatt_block_indexes", f"{i} is outside the depth {vc.depth}")
    _require(vc.hidden_act in ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu", "relu"), "vision_config.hidden_act",
             f"{vc.hidden_act!r} is not supported")
    vision, text = QwenVisionConfig.from_hf(vc), _text_from_hf(hf.text_config)
    _require(vision.out_hidden_size == text.hidden_size, "vision_config.out_hidden_size",
             f"{vision.out_hidden_size} must equal the text hidden_size {text.hidden_size}")
    return QwenVLConfig(vision=vision, text=text, image_token_id=int(hf.image_token_id),
                        video_token_id=int(hf.video_token_id), vision_start_token_id=int(hf.vision_start_token_id),
                        vision_end_token_id=int(hf.vision_end_token_id),
                        tie_word_embeddings=bool(hf.tie_word_embeddings))
