"""Configuration of LLaMA-Omni (arXiv 2409.06666) for transformers remote code.

Defaults are the released ICTNLP/Llama-3.1-8B-Omni numbers (spec sections 1, 3 and 5), so
`LlamaOmniConfig()` describes the real model; tiny test models override sizes only.
"""

from .transformers_compat import MIN_TRANSFORMERS_VERSION  # noqa: F401  (first: checks the installed release)

from transformers import LlamaConfig, PreTrainedConfig, WhisperConfig  # noqa: E402

# Whisper-large-v3 encoder (openai-whisper dims: n_mels 128, n_audio_ctx 1500, n_audio_state 1280,
# n_audio_head 20, n_audio_layer 32). Only the encoder half is used.
WHISPER_LARGE_V3_ENCODER = dict(
    num_mel_bins=128,
    d_model=1280,
    encoder_layers=32,
    encoder_attention_heads=20,
    encoder_ffn_dim=5120,
    max_source_positions=1500,
    # the decoder half is never built; keep it minimal so the sub-config stays honest about that
    decoder_layers=0,
    vocab_size=51866,
)

# Llama-3.1-8B-Instruct.
LLAMA_3_1_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    bos_token_id=128000,
    eos_token_id=[128001, 128008, 128009],
    tie_word_embeddings=False,
)


def _sub_config(cls, value, defaults):
    if value is None:
        return cls(**defaults)
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k != "model_type"}
        return cls(**value)
    if isinstance(value, cls):
        return value
    raise ValueError(f"expected a {cls.__name__} or a dict, got {type(value).__name__}")


def _check_positive_ints(config, names):
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


class LlamaOmniVocoderConfig(PreTrainedConfig):
    """fairseq's unit HiFi-GAN with duration predictor (CodeHiFiGAN), spec section 5.

    Field names follow the fairseq `config.json` (`model_in_dim` is derived: `embedding_dim`).
    Only `resblock "1"` exists in the released vocoder and is supported.
    """

    model_type = "llama_omni_vocoder"

    def __init__(
        self,
        num_embeddings=1000,
        embedding_dim=128,
        upsample_rates=(5, 4, 4, 2, 2),
        upsample_kernel_sizes=(11, 8, 8, 4, 4),
        upsample_initial_channel=512,
        resblock_kernel_sizes=(3, 7, 11),
        resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        duration_predictor_hidden_dim=128,
        duration_predictor_kernel_size=3,
        duration_predictor_dropout=0.5,
        leaky_relu_slope=0.1,
        sampling_rate=16000,
        code_hop_size=320,
        **kwargs,
    ):
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.upsample_rates = [int(r) for r in upsample_rates]
        self.upsample_kernel_sizes = [int(k) for k in upsample_kernel_sizes]
        self.upsample_initial_channel = upsample_initial_channel
        self.resblock_kernel_sizes = [int(k) for k in resblock_kernel_sizes]
        self.resblock_dilation_sizes = [[int(d) for d in ds] for ds in resblock_dilation_sizes]
        self.duration_predictor_hidden_dim = duration_predictor_hidden_dim
        self.duration_predictor_kernel_size = duration_predictor_kernel_size
        self.duration_predictor_dropout = duration_predictor_dropout
        self.leaky_relu_slope = leaky_relu_slope
        self.sampling_rate = sampling_rate
        self.code_hop_size = code_hop_size
        super().__init__(**kwargs)
        _check_positive_ints(
            self,
            ["num_embeddings", "embedding_dim", "upsample_initial_channel", "duration_predictor_hidden_dim",
             "duration_predictor_kernel_size", "sampling_rate", "code_hop_size"],
        )
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError(
                f"`upsample_rates` ({self.upsample_rates}) and `upsample_kernel_sizes` "
                f"({self.upsample_kernel_sizes}) must have the same length"
            )
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("`resblock_kernel_sizes` and `resblock_dilation_sizes` must have the same length")
        hop = 1
        for rate in self.upsample_rates:
            hop *= rate
        if hop != self.code_hop_size:
            # original: 5*4*4*2*2 = 320 samples per unit frame at 16 kHz (20 ms)
            raise ValueError(f"the product of `upsample_rates` is {hop}, but `code_hop_size` is {self.code_hop_size}")


class LlamaOmniConfig(PreTrainedConfig):
    r"""Configuration of [`LlamaOmniForConditionalGeneration`].

    Args:
        speech_encoder_config (`WhisperConfig` or dict): the Whisper encoder (default: large-v3's encoder).
        text_config (`LlamaConfig` or dict): the LLM (default: Llama-3.1-8B-Instruct).
        vocoder_config (`LlamaOmniVocoderConfig`, dict or None): the unit vocoder; None for a text+units model.
        speech_adaptor_downsample_rate (int): encoder frames concatenated per LLM position (k=5: 20 ms -> 100 ms).
        speech_adaptor_hidden_size (int): hidden width of the adaptor FFN (2048 in the release).
        unit_decoder_num_layers, unit_decoder_hidden_size, unit_decoder_num_attention_heads,
        unit_decoder_num_key_value_heads, unit_decoder_intermediate_size (int): the CTC unit decoder's Llama
            layers; the original's `ctc_decoder_config "(2,4096,32,11008)"` string, as integers.
        unit_decoder_upsample_factor (int): lambda, copies of each LLM state fed to the unit decoder (25).
        unit_vocab_size (int): number of HuBERT units K (1000); the CTC blank is id K.
        ctc_loss_weight (float): weight of the CTC loss added to the LM loss.
        speech_token_id (int): id of the `<speech>` placeholder; every audio turn expands to
            `speech_tokens_per_audio` of them. Defaults to the first id after the LLM vocabulary, so the
            placeholder never collides with (or can be generated as) a text token.
    """

    model_type = "llama_omni"
    sub_configs = {
        "speech_encoder_config": WhisperConfig,
        "text_config": LlamaConfig,
        "vocoder_config": LlamaOmniVocoderConfig,
    }

    def __init__(
        self,
        speech_encoder_config=None,
        text_config=None,
        vocoder_config=None,
        speech_adaptor_downsample_rate=5,
        speech_adaptor_hidden_size=2048,
        unit_decoder_num_layers=2,
        unit_decoder_hidden_size=4096,
        unit_decoder_num_attention_heads=32,
        unit_decoder_num_key_value_heads=32,
        unit_decoder_intermediate_size=11008,
        unit_decoder_upsample_factor=25,
        unit_vocab_size=1000,
        ctc_loss_weight=1.0,
        speech_token_id=None,
        **kwargs,
    ):
        if kwargs.get("model_type") == "omni_speech2s_llama" or "ctc_decoder_config" in kwargs:
            raise ValueError(
                "this is the ORIGINAL LLaMA-Omni release (model_type 'omni_speech2s_llama'), not a converted repo: "
                "convert it first with `python conversion/convert_llama_omni.py --checkpoint DIR ...`"
            )
        self.speech_encoder_config = _sub_config(WhisperConfig, speech_encoder_config, WHISPER_LARGE_V3_ENCODER)
        self.text_config = _sub_config(LlamaConfig, text_config, LLAMA_3_1_8B)
        self.vocoder_config = (
            None if vocoder_config is None else _sub_config(LlamaOmniVocoderConfig, vocoder_config, {})
        )
        self.speech_adaptor_downsample_rate = speech_adaptor_downsample_rate
        self.speech_adaptor_hidden_size = speech_adaptor_hidden_size
        self.unit_decoder_num_layers = unit_decoder_num_layers
        self.unit_decoder_hidden_size = unit_decoder_hidden_size
        self.unit_decoder_num_attention_heads = unit_decoder_num_attention_heads
        self.unit_decoder_num_key_value_heads = unit_decoder_num_key_value_heads
        self.unit_decoder_intermediate_size = unit_decoder_intermediate_size
        self.unit_decoder_upsample_factor = unit_decoder_upsample_factor
        self.unit_vocab_size = unit_vocab_size
        self.ctc_loss_weight = float(ctc_loss_weight)
        self.speech_token_id = self.text_config.vocab_size if speech_token_id is None else speech_token_id
        kwargs.setdefault("tie_word_embeddings", self.text_config.tie_word_embeddings)
        super().__init__(**kwargs)
        self._validate()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """A saved config (config.json) must describe its sub-models: the defaults are the release sizes
        (Llama-3.1-8B + whisper-large-v3, 35 GB in fp32), which a checkpoint of another size would silently
        build and then fail to load into, or exhaust memory on."""
        missing = [k for k in ("speech_encoder_config", "text_config") if not config_dict.get(k) and not kwargs.get(k)]
        if missing and config_dict.get("model_type") != "omni_speech2s_llama" and "ctc_decoder_config" not in config_dict:
            raise ValueError(
                f"this LLaMA-Omni config lacks {' and '.join(f'`{k}`' for k in missing)}: a converted checkpoint's "
                "config.json describes every sub-model (convert a release with conversion/convert_llama_omni.py); "
                "for the release sizes build LlamaOmniConfig() in code"
            )
        return super().from_dict(config_dict, **kwargs)

    def _validate(self):
        _check_positive_ints(
            self,
            ["speech_adaptor_downsample_rate", "speech_adaptor_hidden_size", "unit_decoder_num_layers",
             "unit_decoder_hidden_size", "unit_decoder_num_attention_heads", "unit_decoder_num_key_value_heads",
             "unit_decoder_intermediate_size", "unit_decoder_upsample_factor", "unit_vocab_size"],
        )
        if self.unit_decoder_hidden_size % self.unit_decoder_num_attention_heads:
            raise ValueError(
                f"`unit_decoder_hidden_size` ({self.unit_decoder_hidden_size}) must be divisible by "
                f"`unit_decoder_num_attention_heads` ({self.unit_decoder_num_attention_heads})"
            )
        if self.unit_decoder_num_attention_heads % self.unit_decoder_num_key_value_heads:
            raise ValueError("`unit_decoder_num_attention_heads` must be a multiple of `unit_decoder_num_key_value_heads`")
        if self.speech_encoder_config.max_source_positions % self.speech_adaptor_downsample_rate:
            raise ValueError(
                f"the encoder's {self.speech_encoder_config.max_source_positions} positions are not divisible by "
                f"`speech_adaptor_downsample_rate` ({self.speech_adaptor_downsample_rate})"
            )
        if self.vocoder_config is not None and self.vocoder_config.num_embeddings != self.unit_vocab_size:
            raise ValueError(
                f"the vocoder knows {self.vocoder_config.num_embeddings} units but `unit_vocab_size` is "
                f"{self.unit_vocab_size}"
            )

    @property
    def speech_tokens_per_audio(self) -> int:
        """LLM positions per audio turn: 30 s -> 3000 mel frames -> 1500 encoder frames -> 1500 / k (300)."""
        return self.speech_encoder_config.max_source_positions // self.speech_adaptor_downsample_rate

    @property
    def unit_decoder_config(self) -> LlamaConfig:
        """The Llama config of the unit decoder layers: its own sizes, the LLM's RoPE and norm (spec section 3)."""
        text = self.text_config
        config = LlamaConfig(
            vocab_size=1,
            hidden_size=self.unit_decoder_hidden_size,
            intermediate_size=self.unit_decoder_intermediate_size,
            num_hidden_layers=self.unit_decoder_num_layers,
            num_attention_heads=self.unit_decoder_num_attention_heads,
            num_key_value_heads=self.unit_decoder_num_key_value_heads,
            head_dim=self.unit_decoder_hidden_size // self.unit_decoder_num_attention_heads,
            max_position_embeddings=text.max_position_embeddings,
            rms_norm_eps=text.rms_norm_eps,
            hidden_act=text.hidden_act,
            # original: deep-copies the LLM config, so RoPE (theta 500000, llama3 scaling) is inherited
            rope_parameters=dict(text.rope_parameters) if getattr(text, "rope_parameters", None) else None,
            attention_bias=False,
            mlp_bias=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
        config._attn_implementation = self._attn_implementation or "sdpa"
        return config


__all__ = ["LlamaOmniConfig", "LlamaOmniVocoderConfig"]
