"""Configuration of a Kyutai LM: Moshi (temporal transformer + depformer) or Kyutai STT
(temporal transformer only, `dep_q` 0, optional `extra_heads` = semantic VAD).

`LmConfig` mirrors the keys of the official lm `config.json`; `LmConfig.moshi_7b()` is the
released Moshiko/Moshika v0.1 model, `LmConfig.personaplex_7b()` NVIDIA's PersonaPlex-7B (the
same model with `dep_q` 16: its depformer predicts Moshi's 8 codebooks, then the user's 8).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from moshi_mlx.errors import WeightsError
from moshi_mlx.models.lm_layouts import (
    TRANSFORMERS_STT_MODEL_TYPE,
    from_transformers_moshi,
    from_transformers_stt,
    gating_hidden,
)

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
    # PersonaPlex: a text prompt is wrapped in "<system>" tags (conversation.prompts).
    system_prompt_tags: bool = False

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

    # ----------------------------------------------------------------- streams
    @property
    def predicts_user(self) -> bool:
        """The depformer predicts every audio stream, the user's too (PersonaPlex, dep_q =
        n_q): Moshi's codebooks first, then the user's."""
        return self.dep_q == self.n_q and self.dep_q > 0

    @property
    def own_audio_q(self) -> int:
        """Moshi's own audio codebooks (its output stream)."""
        return self.n_q // 2 if self.predicts_user else self.dep_q

    @property
    def user_audio_q(self) -> int:
        """The user's audio codebooks, always an input (0 for STT, which reads all n_q as
        input; see is_stt)."""
        return self.n_q - self.own_audio_q if self.dep_q else 0

    # ----------------------------------------------------------------- derived sizes
    @property
    def hidden_dim(self) -> int:
        """Gated MLP hidden size of the temporal transformer (2/3 of dim_feedforward)."""
        return gating_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_hidden_dim(self) -> int:
        return gating_hidden(self.depformer_dim, self.depformer_dim_feedforward)

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
    def personaplex_7b(cls) -> LmConfig:
        """NVIDIA PersonaPlex-7B v1: Moshi 7B whose depformer has 16 slices (its own loader
        hard-codes these sizes; its depformer attends over all 16 steps of a frame)."""
        return cls.moshi_7b().as_personaplex()

    def as_personaplex(self) -> LmConfig:
        """This Moshi config with a depformer for both audio streams (dep_q = n_q) and system
        tags around text prompts, as PersonaPlex's loader builds it from Moshi's sizes.

        Its depformer window is n_q - 1 steps: NVIDIA's depformer cache holds the 16 steps of
        a frame, but its ring (their fork's transformer.py) labels the oldest entry as the
        newest once it is exactly full, so the 16th slice never sees the 1st. A window of 15
        gives the same attention (only the user's last codebook prediction depends on it)."""
        return replace(self, dep_q=self.n_q, depformer_context=self.n_q - 1,
                       system_prompt_tags=True)

    @classmethod
    def default(cls) -> LmConfig:
        """The config of a checkpoint that comes without one: the released 7B model."""
        return cls.moshi_7b()

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> LmConfig:
        """From an official lm config.json, or a transformers `MoshiConfig` one (recognised by
        its `depth_decoder_config`) or `KyutaiSpeechToTextConfig` one (model_type
        kyutai_speech_to_text), mapped by `moshi_mlx.models.lm_layouts`. A file is read by the
        loader (`moshi_mlx.loading.models.read_lm_config`)."""
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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["delays"] = list(self.delays)
        if self.stt_config is None:
            del data["stt_config"]
        if self.extra_heads_num_heads == 0:
            del data["extra_heads_num_heads"], data["extra_heads_dim"]
        if not self.system_prompt_tags:
            del data["system_prompt_tags"]
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
        need(not self.predicts_user or self.n_q % 2 == 0,
             "a depformer over every audio stream (dep_q = n_q) needs an even n_q")
        # PersonaPlex: one step less (see as_personaplex)
        least_window = self.dep_q - 1 if self.predicts_user else self.dep_q
        need(self.context >= 1 and self.depformer_context >= least_window,
             f"context must be >= 1 and depformer_context >= {least_window}")
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
