"""Configuration of a Kyutai LM: Moshi (temporal transformer + depformer) or Kyutai STT
(temporal transformer only, `dep_q` 0, optional `extra_heads` = semantic VAD).

`LmConfig` mirrors the keys of the official lm `config.json`; `LmConfig.moshi_7b()` is the
released Moshiko/Moshika v0.1 model.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from moshi_mlx.errors import WeightsError

# Keys that official (and our converter's) config.json files carry beside the architecture;
# the quantization is read from the weight file itself.
_METADATA_KEYS = frozenset(
    {"model_type", "moshi_name", "mimi_name", "tokenizer_name", "lm_gen_config", "model_id",
     "quantization", "codec_config"}  # codec_config: the Mimi a converted folder carries
)

# Features of later official configs that this model does not have: accepted only with the
# value that switches them off.
_NEUTRAL_KEYS: dict[str, tuple] = {
    "cross_attention": (False, None),
    "demux_second_stream": (False, None),
    "conditioners": (None, {}),
    "fuser": (None, {}),
    "text_card_out": (None,),
    "depformer_weights_per_step_schedule": (None,),
    "depformer_low_rank_embeddings": (None,),
}

_DEFAULT_DELAYS = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)


@dataclass(frozen=True)
class SttConfig:
    """`stt_config` of a Kyutai STT config.json: the text stream is trained
    `audio_delay_seconds` behind the audio; inputs start with `audio_silence_prefix_seconds`
    of silence."""

    audio_delay_seconds: float = 0.5
    audio_silence_prefix_seconds: float = 0.0

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> SttConfig:
        if not isinstance(data, dict):
            raise WeightsError(f"{source}: stt_config must be a JSON object")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise WeightsError(f"{source}: unknown stt_config key(s): {', '.join(unknown)}")
        try:
            values = {k: float(v) for k, v in data.items()}
        except (TypeError, ValueError):
            raise WeightsError(f"{source}: stt_config values must be numbers") from None
        if any(v < 0 or v != v for v in values.values()):
            raise WeightsError(f"{source}: stt_config values must be >= 0")
        return cls(**values)


@dataclass(frozen=True)
class LmConfig:
    """Architecture of a Moshi LM, one field per key of the official config.json."""

    dim: int = 4096
    text_card: int = 32000
    existing_text_padding_id: int = 3
    n_q: int = 16
    dep_q: int = 8
    card: int = 2048
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    causal: bool = True
    layer_scale: float | None = None
    context: int = 3000
    max_period: float = 10000
    gating: str = "silu"
    norm: str = "rms_norm_f32"
    positional_embedding: str = "rope"
    depformer_dim: int = 1024
    depformer_dim_feedforward: int = 4224
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_layer_scale: float | None = None
    depformer_multi_linear: bool = True
    depformer_context: int = 8
    depformer_max_period: float = 10000
    depformer_gating: str = "silu"
    depformer_pos_emb: str = "none"
    depformer_weights_per_step: bool = True
    delays: tuple[int, ...] = field(default=_DEFAULT_DELAYS)
    # Kyutai STT: per-step classifier heads on the normed temporal output (semantic VAD).
    extra_heads_num_heads: int = 0
    extra_heads_dim: int = 6
    stt_config: SttConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "delays", tuple(int(d) for d in self.delays))
        if isinstance(self.stt_config, dict):
            object.__setattr__(self, "stt_config", SttConfig.from_dict(self.stt_config))
        self._validate()

    @property
    def is_stt(self) -> bool:
        """A speech-to-text model: no depformer, reads all n_q audio streams."""
        return self.dep_q == 0

    @property
    def model_type(self) -> str:
        """The loader's family name (config.json `model_type`)."""
        return "stt" if self.is_stt else "moshi"

    # ----------------------------------------------------------------- derived sizes
    @property
    def hidden_dim(self) -> int:
        """Gated MLP hidden size of the temporal transformer (2/3 of dim_feedforward)."""
        return _gating_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_hidden_dim(self) -> int:
        return _gating_hidden(self.depformer_dim, self.depformer_dim_feedforward)

    @property
    def norm_eps(self) -> float:
        return 1e-8 if self.norm == "rms_norm_f32" else 1e-5

    @property
    def norm_in_float32(self) -> bool:
        return self.norm == "rms_norm_f32"

    @property
    def text_initial_token(self) -> int:
        return self.text_card

    @property
    def audio_initial_token(self) -> int:
        return self.card

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def moshi_7b(cls) -> LmConfig:
        """Moshiko / Moshika v0.1 (7B)."""
        return cls()

    @classmethod
    def default(cls) -> LmConfig:
        """The config of a checkpoint that comes without one: the released 7B model."""
        return cls.moshi_7b()

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> LmConfig:
        """From an official lm config.json, or a transformers `MoshiConfig` one (recognised by
        its `depth_decoder_config`; see `from_transformers_moshi`) or
        `KyutaiSpeechToTextConfig` one (model_type kyutai_speech_to_text; see
        `from_transformers_stt`)."""
        if "depth_decoder_config" in data:
            return cls.from_dict(from_transformers_moshi(data, source), source)
        if data.get("model_type") == TRANSFORMERS_STT_MODEL_TYPE:
            return cls.from_dict(from_transformers_stt(data, source), source)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - _METADATA_KEYS - set(_NEUTRAL_KEYS))
        if unknown:
            raise WeightsError(f"{source}: unknown LM config key(s): {', '.join(unknown)}")
        for key in sorted(set(data) & set(_NEUTRAL_KEYS)):
            if not any(data[key] == off for off in _NEUTRAL_KEYS[key]):
                raise WeightsError(f"{source}: {key} = {data[key]!r} is not supported")
        values = {k: v for k, v in data.items() if k in known}
        if values.get("extra_heads_num_heads") is None:
            values.pop("extra_heads_num_heads", None)
        if values.get("extra_heads_dim") is None:
            values.pop("extra_heads_dim", None)
        if values.get("stt_config") is not None:
            values["stt_config"] = SttConfig.from_dict(values["stt_config"], source)
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LmConfig:
        from moshi_mlx.loading.config import read_config_json

        return cls.from_dict(read_config_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["delays"] = list(self.delays)
        if self.stt_config is None:
            del data["stt_config"]
        if self.extra_heads_num_heads == 0:
            del data["extra_heads_num_heads"], data["extra_heads_dim"]
        return data

    def with_overrides(self, **changes: Any) -> LmConfig:
        return replace(self, **changes)

    # ----------------------------------------------------------------- validation
    def _validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(len(self.delays) == self.n_q + 1, f"delays has {len(self.delays)} entries, "
             f"expected n_q + 1 = {self.n_q + 1}")
        need(all(d >= 0 for d in self.delays), "delays must be >= 0")
        need(0 <= self.dep_q <= self.n_q, f"dep_q {self.dep_q} must be in 0..n_q ({self.n_q})")
        need(self.extra_heads_num_heads >= 0 and self.extra_heads_dim >= 1,
             "extra_heads_num_heads must be >= 0 and extra_heads_dim >= 1")
        need(self.dim % self.num_heads == 0, f"dim {self.dim} not divisible by num_heads")
        need(self.depformer_dim % self.depformer_num_heads == 0,
             f"depformer_dim {self.depformer_dim} not divisible by depformer_num_heads")
        need(self.context >= 1 and self.depformer_context >= self.dep_q,
             "context must be >= 1 and depformer_context >= dep_q")
        need(self.causal, "only causal LMs are supported (causal: true)")
        need(self.gating == "silu" and self.depformer_gating == "silu",
             "only SiLU gating is supported")
        need(self.norm in ("rms_norm_f32", "rms_norm"),
             f"unsupported norm {self.norm!r} (rms_norm_f32 or rms_norm)")
        need(self.positional_embedding in ("rope", "none"),
             f"unsupported positional_embedding {self.positional_embedding!r}")
        need(self.depformer_pos_emb in ("rope", "none"),
             f"unsupported depformer_pos_emb {self.depformer_pos_emb!r}")
        need(self.layer_scale is None and self.depformer_layer_scale is None,
             "layer scale is not supported (layer_scale must be null)")
        need(self.depformer_multi_linear and self.depformer_weights_per_step,
             "only depformer_multi_linear and depformer_weights_per_step = true are supported")


def _gating_hidden(dim: int, dim_feedforward: int) -> int:
    # Official rule: 4·dim feed-forward uses 21/8·dim, anything else 2/3 of dim_feedforward.
    if dim_feedforward == 4 * dim:
        return 21 * dim // 8
    return 2 * dim_feedforward // 3


# ---------------------------------------------------------------------------- transformers

# Keys of a transformers config that carry no architecture (or only what is checked below).
_TRANSFORMERS_METADATA = frozenset(
    {"architectures", "dtype", "torch_dtype", "transformers_version", "initializer_range",
     "use_cache", "attention_dropout", "tie_word_embeddings", "pad_token_id", "bos_token_id",
     "eos_token_id", "max_position_embeddings", "audio_encoder_config", "model_type",
     "input_size", "audio_vocab_size", "vocab_size", "num_codebooks", "_name_or_path",
     "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder"}
)
_TRANSFORMERS_MAIN = frozenset(
    {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
     "head_dim", "ffn_dim", "hidden_act", "rms_norm_eps", "sliding_window", "rope_theta",
     "rope_parameters", "rope_scaling", "depth_decoder_config"}
)
_TRANSFORMERS_DEPTH = frozenset(
    {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
     "head_dim", "ffn_dim", "hidden_act", "rms_norm_eps", "sliding_window"}
)


def from_transformers_moshi(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """A transformers `MoshiConfig` config.json (kmhf/hf-moshiko) -> official lm config keys.

    transformers keeps the fused gated-MLP width (`ffn_dim` = 2 x hidden), a sliding window
    as the context, RoPE only in the temporal transformer, and no acoustic delays: Moshi's
    standard ones (0 for text and codebook 0, 1 for the others, for both audio streams) are
    used. `audio_encoder_config` describes the bundled Mimi and is not read here.
    """
    depth = data.get("depth_decoder_config")
    if not isinstance(depth, dict):
        raise WeightsError(f"{source}: depth_decoder_config must be a JSON object")
    for part, keys, where in ((data, _TRANSFORMERS_MAIN, ""), (depth, _TRANSFORMERS_DEPTH,
                                                                "depth_decoder_config.")):
        unknown = sorted(set(part) - keys - _TRANSFORMERS_METADATA)
        if unknown:
            raise WeightsError(f"{source}: unknown transformers Moshi config key(s): "
                               + ", ".join(where + key for key in unknown))

    def get(part: dict, key: str, default: Any = None) -> Any:
        value = part.get(key, default)
        if value is None:
            raise WeightsError(f"{source}: transformers Moshi config lacks {key}")
        return value

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise WeightsError(f"{source}: {message} (transformers Moshi layout)")

    dim, heads = int(get(data, "hidden_size")), int(get(data, "num_attention_heads"))
    depth_dim = int(get(depth, "hidden_size"))
    depth_heads = int(get(depth, "num_attention_heads"))
    for part, width, n, where in ((data, dim, heads, ""), (depth, depth_dim, depth_heads,
                                                           "depth_decoder_config.")):
        check(part.get("num_key_value_heads") in (None, n),
              f"{where}num_key_value_heads must equal num_attention_heads (no grouped queries)")
        check(part.get("head_dim") in (None, width // n), f"{where}head_dim must be hidden_size "
              "/ num_attention_heads")
        check(part.get("hidden_act", "silu") == "silu", f"{where}hidden_act must be silu")
        check(float(part.get("rms_norm_eps", 1e-8)) == 1e-8,
              f"{where}rms_norm_eps must be 1e-8 (float32 RMSNorm)")
        check(int(get(part, "ffn_dim")) % 2 == 0, f"{where}ffn_dim must be even")
    rope = data.get("rope_parameters") or {}
    check(data.get("rope_scaling") is None and rope.get("rope_type", "default") == "default",
          "only the default RoPE is supported")
    dep_q = int(get(data, "num_codebooks", 8))
    card = data.get("audio_vocab_size") or (data.get("audio_encoder_config") or {}).get(
        "codebook_size", 2048)
    hidden = int(data["ffn_dim"]) // 2
    depth_hidden = int(depth["ffn_dim"]) // 2
    mapped = {
        "dim": dim,
        "text_card": int(get(data, "vocab_size")),
        "n_q": 2 * dep_q,
        "dep_q": dep_q,
        "card": int(card),
        "num_heads": heads,
        "num_layers": int(get(data, "num_hidden_layers")),
        # hidden = 2/3 of int(hidden_scale * dim) (official rule): exact for official sizes
        "hidden_scale": 1.5 * hidden / dim,
        "context": int(get(data, "sliding_window", 3000)),
        "max_period": float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "depformer_dim": depth_dim,
        "depformer_dim_feedforward": 3 * depth_hidden // 2,
        "depformer_num_heads": depth_heads,
        "depformer_num_layers": int(get(depth, "num_hidden_layers")),
        "depformer_context": int(get(depth, "sliding_window", 8)),
        "depformer_pos_emb": "none",
        "delays": [0] + 2 * ([0] + [1] * (dep_q - 1)),
    }
    check(_gating_hidden(dim, int(mapped["hidden_scale"] * dim)) == hidden,
          f"ffn_dim {data['ffn_dim']} has no official hidden_scale")
    check(_gating_hidden(depth_dim, mapped["depformer_dim_feedforward"]) == depth_hidden,
          f"depth_decoder_config.ffn_dim {depth['ffn_dim']} has no official feed-forward size")
    return mapped


# ---------------------------------------------------------------------------- transformers STT

TRANSFORMERS_STT_MODEL_TYPE = "kyutai_speech_to_text"
# The feature extractor's config beside config.json in a -trfs repo: it holds the stt_config.
TRANSFORMERS_STT_PREPROCESSOR = "preprocessor_config.json"
_TRANSFORMERS_STT_KEYS = frozenset(
    {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
     "head_dim", "ffn_dim", "hidden_act", "rms_norm_eps", "sliding_window", "rope_theta",
     "rope_parameters", "rope_scaling", "codebook_vocab_size", "audio_bos_token_id",
     "audio_pad_token_id", "codec_config", "frame_size"}
)


def from_transformers_stt(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """A transformers `KyutaiSpeechToTextConfig` config.json (kyutai/stt-2.6b-en-trfs,
    kyutai/stt-1b-en_fr-trfs) -> official lm config keys.

    transformers counts the initial text token in `vocab_size` (text_card + 1: the rows of
    text_emb; its lm_head has a zero row for it) and the initial audio token in
    `codebook_vocab_size` (card + 1); the attention window is `sliding_window` (our context);
    the gated MLP width is fused (`ffn_dim` = 2 x hidden). It has no extra (VAD) heads and no
    acoustic delays (all 0 for STT). The stt_config (text delay, silence prefix) is not in
    config.json but in the feature extractor's preprocessor_config.json of the same repo: it
    is read when it lies beside `source` (a config.json path); otherwise stt_config stays
    unset and the transcriber uses SttConfig's defaults (stt-1b-en_fr's 0.5 s / 0 s; wrong
    for stt-2.6b-en, whose file says 2.5 s / 1 s). `codec_config` describes the bundled Mimi
    and is not read here.
    """
    unknown = sorted(set(data) - _TRANSFORMERS_STT_KEYS - _TRANSFORMERS_METADATA)
    if unknown:
        raise WeightsError(f"{source}: unknown transformers Kyutai STT config key(s): "
                           + ", ".join(unknown))

    def get(key: str, default: Any = None) -> Any:
        value = data.get(key, default)
        if value is None:
            raise WeightsError(f"{source}: transformers Kyutai STT config lacks {key}")
        return value

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise WeightsError(f"{source}: {message} (transformers Kyutai STT layout)")

    dim, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    check(data.get("num_key_value_heads") in (None, heads),
          "num_key_value_heads must equal num_attention_heads (no grouped queries)")
    check(data.get("head_dim") in (None, dim // heads),
          "head_dim must be hidden_size / num_attention_heads")
    check(data.get("hidden_act", "silu") == "silu", "hidden_act must be silu")
    check(float(data.get("rms_norm_eps", 1e-8)) == 1e-8,
          "rms_norm_eps must be 1e-8 (float32 RMSNorm)")
    check(int(get("ffn_dim")) % 2 == 0, "ffn_dim must be even")
    rope = data.get("rope_parameters") or {}
    check(data.get("rope_scaling") is None and rope.get("rope_type", "default") == "default",
          "only the default RoPE is supported")
    text_card = int(get("vocab_size")) - 1
    card = int(get("codebook_vocab_size", 2049)) - 1
    n_q = int(get("num_codebooks", 32))
    check(data.get("audio_bos_token_id") in (None, card),
          f"audio_bos_token_id must be the initial audio token {card}")
    pad = text_card + 1 + n_q * (card + 1)  # the zero row closing the embedding table
    check(data.get("audio_pad_token_id") in (None, pad), f"audio_pad_token_id must be {pad}")
    # bos_token_id (the initial text token, text_card in our files) is not checked: the
    # class default 48000 lies outside the vocab; the model always starts from text_card.
    text_pad = 3 if data.get("pad_token_id") is None else data["pad_token_id"]
    hidden = int(data["ffn_dim"]) // 2
    mapped: dict[str, Any] = {
        "dim": dim,
        "text_card": text_card,
        "existing_text_padding_id": int(text_pad),
        "n_q": n_q,
        "dep_q": 0,
        "card": card,
        "num_heads": heads,
        "num_layers": int(get("num_hidden_layers")),
        "hidden_scale": 1.5 * hidden / dim,
        "context": int(get("sliding_window", 375)),
        "max_period": float(rope.get("rope_theta", data.get("rope_theta", 100000.0))),
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "delays": [0] * (n_q + 1),
    }
    check(_gating_hidden(dim, int(mapped["hidden_scale"] * dim)) == hidden,
          f"ffn_dim {data['ffn_dim']} has no official hidden_scale")
    stt = _feature_extractor_stt_config(source)
    if stt is not None:
        mapped["stt_config"] = stt
    return mapped


def _feature_extractor_stt_config(source: str) -> dict[str, float] | None:
    """audio_delay_seconds / audio_silence_prefix_seconds of the preprocessor_config.json
    beside the config.json `source`, if there is one."""
    import json
    from pathlib import Path

    path = Path(source).parent / TRANSFORMERS_STT_PREPROCESSOR
    if not Path(source).is_file() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    keys = ("audio_delay_seconds", "audio_silence_prefix_seconds")
    return {key: data[key] for key in keys if data.get(key) is not None} or None
