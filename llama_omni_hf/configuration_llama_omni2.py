"""Configuration of LLaMA-Omni2 (arXiv 2505.02625) for transformers remote code.

Defaults are the released numbers (spec `llama-omni2.md` sections 1.2 and 1.5), so `LlamaOmni2Config()`
describes ICTNLP/LLaMA-Omni2-0.5B and `LlamaOmni2Token2WavConfig()` the real ICTNLP/cosy2_decoder; tiny test
models override sizes only.
"""

from .transformers_compat import MIN_TRANSFORMERS_VERSION  # noqa: F401  (first: checks the installed release)

from transformers import PreTrainedConfig, Qwen2Config, WhisperConfig  # noqa: E402

from .configuration_llama_omni import WHISPER_LARGE_V3_ENCODER, _check_positive_ints, _sub_config  # noqa: E402

# Qwen2.5-0.5B-Instruct, the LLM of LLaMA-Omni2-0.5B (spec 1.2; larger sizes come from their config.json).
QWEN2_5_0_5B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, max_window_layers=21, rope_theta=1000000.0,
    rms_norm_eps=1e-6, sliding_window=None, use_sliding_window=False, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151645, hidden_act="silu", attention_dropout=0.0,
)
# The TTS language model: the Qwen2.5-0.5B shape at every size, with 6561 unit tokens and <sep> after the text
# vocabulary (spec 1.2 `speech_generator`). Its head is a weight of its own here (quirk Q1: the original loads it
# untied), so `tie_word_embeddings` is False.
QWEN2_5_0_5B_TTS = dict(
    QWEN2_5_0_5B, vocab_size=158227, max_window_layers=24, eos_token_id=151643, tie_word_embeddings=False,
)


class LlamaOmni2Token2WavConfig(PreTrainedConfig):
    """CosyVoice2 token-to-wave: 6561-way speech tokens (25 Hz) -> 80-bin mel (50 Hz) -> 24 kHz waveform.

    Three parts, each field named after the original argument where it has one:
    - the flow's encoder, `CausalMaskedDiffWithXvec` + `UpsampleConformerEncoder` (`encoder_*`);
    - the flow matching decoder, `CausalConditionalCFM` + its `ConditionalDecoder` U-Net (`estimator_*`, `n_timesteps`,
      `inference_cfg_rate`, the persistent noise of `noise_frames`);
    - HiFT (`hift_*`, `nsf_*`, `istft_*`), and the streaming session of spec section 2.8 (`mel_cache_len`).
    """

    model_type = "llama_omni2_token2wav"

    def __init__(
        self,
        vocab_size=6561,
        input_size=512,
        num_mels=80,
        spk_embed_dim=192,
        token_frame_rate=25,
        token_mel_ratio=2,
        pre_lookahead_len=3,
        encoder_attention_heads=8,
        encoder_linear_units=2048,
        encoder_num_blocks=6,
        encoder_num_up_blocks=4,  # original: 4 hard-coded in UpsampleConformerEncoder
        # original: set from outside by run_cosy2_decoder.py/flow_inference.py as 2 * input_frame_rate tokens
        # (2 s); the up-layers and the estimator use it times token_mel_ratio (100 mel frames)
        encoder_chunk_size=50,
        encoder_layer_norm_eps=1e-12,  # ConformerEncoderLayer's norm_mha / norm_ff
        encoder_embed_layer_norm_eps=1e-5,  # LinearNoSubsampling and after_norm
        estimator_channels=256,
        estimator_attention_head_dim=64,
        estimator_num_heads=8,
        estimator_n_blocks=4,
        estimator_num_mid_blocks=12,
        estimator_ff_mult=4,  # diffusers FeedForward's default
        n_timesteps=10,
        inference_cfg_rate=0.7,
        noise_frames=15000,  # original: rand_noise [1, 80, 50 * 300], so answers are capped at 300 s
        hift_base_channels=512,
        nb_harmonics=8,
        sampling_rate=24000,
        nsf_alpha=0.1,
        nsf_sigma=0.003,
        nsf_voiced_threshold=10.0,
        upsample_rates=(8, 5, 3),
        upsample_kernel_sizes=(16, 11, 7),
        istft_n_fft=16,
        istft_hop_length=4,
        resblock_kernel_sizes=(3, 7, 11),
        resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        source_resblock_kernel_sizes=(7, 7, 11),
        source_resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        lrelu_slope=0.1,
        audio_limit=0.99,
        f0_predictor_channels=512,
        mel_cache_len=8,  # original session: 8 mel frames (3840 samples) withheld and cross-faded per chunk
        speakers=("en", "zh"),
        default_speaker="en",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.input_size = input_size
        self.num_mels = num_mels
        self.spk_embed_dim = spk_embed_dim
        self.token_frame_rate = token_frame_rate
        self.token_mel_ratio = token_mel_ratio
        self.pre_lookahead_len = pre_lookahead_len
        self.encoder_attention_heads = encoder_attention_heads
        self.encoder_linear_units = encoder_linear_units
        self.encoder_num_blocks = encoder_num_blocks
        self.encoder_num_up_blocks = encoder_num_up_blocks
        self.encoder_chunk_size = encoder_chunk_size
        self.encoder_layer_norm_eps = float(encoder_layer_norm_eps)
        self.encoder_embed_layer_norm_eps = float(encoder_embed_layer_norm_eps)
        self.estimator_channels = estimator_channels
        self.estimator_attention_head_dim = estimator_attention_head_dim
        self.estimator_num_heads = estimator_num_heads
        self.estimator_n_blocks = estimator_n_blocks
        self.estimator_num_mid_blocks = estimator_num_mid_blocks
        self.estimator_ff_mult = estimator_ff_mult
        self.n_timesteps = n_timesteps
        self.inference_cfg_rate = float(inference_cfg_rate)
        self.noise_frames = noise_frames
        self.hift_base_channels = hift_base_channels
        self.nb_harmonics = nb_harmonics
        self.sampling_rate = sampling_rate
        self.nsf_alpha = float(nsf_alpha)
        self.nsf_sigma = float(nsf_sigma)
        self.nsf_voiced_threshold = float(nsf_voiced_threshold)
        self.upsample_rates = [int(r) for r in upsample_rates]
        self.upsample_kernel_sizes = [int(k) for k in upsample_kernel_sizes]
        self.istft_n_fft = istft_n_fft
        self.istft_hop_length = istft_hop_length
        self.resblock_kernel_sizes = [int(k) for k in resblock_kernel_sizes]
        self.resblock_dilation_sizes = [[int(d) for d in ds] for ds in resblock_dilation_sizes]
        self.source_resblock_kernel_sizes = [int(k) for k in source_resblock_kernel_sizes]
        self.source_resblock_dilation_sizes = [[int(d) for d in ds] for ds in source_resblock_dilation_sizes]
        self.lrelu_slope = float(lrelu_slope)
        self.audio_limit = float(audio_limit)
        self.f0_predictor_channels = f0_predictor_channels
        self.mel_cache_len = mel_cache_len
        self.speakers = [str(s) for s in speakers]
        self.default_speaker = default_speaker
        super().__init__(**kwargs)
        self._check()

    # derived sizes, each the original's expression
    @property
    def estimator_in_channels(self) -> int:
        """x, mu, speaker and cond stacked: 4 * 80 = 320 (ConditionalDecoder in_channels)."""
        return 4 * self.num_mels

    @property
    def estimator_chunk_size(self) -> int:
        """Mel frames per attention chunk of the up-layers and the estimator: 50 tokens * 2 = 100."""
        return self.encoder_chunk_size * self.token_mel_ratio

    @property
    def samples_per_frame(self) -> int:
        """Waveform samples per mel frame: prod(upsample_rates) * istft hop = 8 * 5 * 3 * 4 = 480."""
        hop = self.istft_hop_length
        for rate in self.upsample_rates:
            hop *= rate
        return hop

    @property
    def samples_per_token(self) -> int:
        """960 at 24 kHz: 40 ms per speech token."""
        return self.samples_per_frame * self.token_mel_ratio

    @property
    def source_cache_len(self) -> int:
        """Samples of source (and of withheld speech) kept between chunks: mel_cache_len * 480 = 3840."""
        return self.mel_cache_len * self.samples_per_frame

    def _check(self):
        _check_positive_ints(self, [
            "vocab_size", "input_size", "num_mels", "spk_embed_dim", "token_frame_rate", "token_mel_ratio",
            "encoder_attention_heads", "encoder_linear_units", "encoder_num_blocks", "encoder_num_up_blocks",
            "encoder_chunk_size", "estimator_channels", "estimator_attention_head_dim", "estimator_num_heads",
            "estimator_n_blocks", "estimator_ff_mult", "n_timesteps", "noise_frames", "hift_base_channels",
            "sampling_rate", "istft_n_fft", "istft_hop_length", "f0_predictor_channels", "mel_cache_len",
        ])
        for name in ("pre_lookahead_len", "estimator_num_mid_blocks", "nb_harmonics"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}")
        if self.input_size % self.encoder_attention_heads:
            raise ValueError(f"`input_size` ({self.input_size}) must be divisible by `encoder_attention_heads` "
                             f"({self.encoder_attention_heads})")
        if self.input_size % 2:
            raise ValueError(f"`input_size` must be even (sinusoidal relative positions), got {self.input_size}")
        if self.token_mel_ratio != 2:
            # original: Upsample1D(stride=2) and the 2x chunk of the up-layers are written for this ratio
            raise ValueError(f"`token_mel_ratio` must be 2 (CosyVoice2's upsampling), got {self.token_mel_ratio}")
        if self.hift_base_channels % 2 ** len(self.upsample_rates):
            raise ValueError(f"`hift_base_channels` ({self.hift_base_channels}) must be divisible by "
                             f"2 ** {len(self.upsample_rates)} (channels halve at each upsampling)")
        lists = {
            "upsample_kernel_sizes": self.upsample_kernel_sizes,
            "resblock_dilation_sizes": self.resblock_dilation_sizes,
            "source_resblock_kernel_sizes": self.source_resblock_kernel_sizes,
            "source_resblock_dilation_sizes": self.source_resblock_dilation_sizes,
        }
        expected = {
            "upsample_kernel_sizes": len(self.upsample_rates),
            "resblock_dilation_sizes": len(self.resblock_kernel_sizes),
            "source_resblock_kernel_sizes": len(self.upsample_rates),
            "source_resblock_dilation_sizes": len(self.upsample_rates),
        }
        for name, value in lists.items():
            if len(value) != expected[name]:
                raise ValueError(f"`{name}` must have {expected[name]} entries, got {value}")
        for rate, kernel in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if kernel < rate or (kernel - rate) % 2:
                raise ValueError(f"`upsample_kernel_sizes` {kernel} with rate {rate}: kernel - rate must be even and "
                                 ">= 0 so each up-conv multiplies the length exactly by its rate")
        if not 0.0 < self.audio_limit <= 1.0:
            raise ValueError(f"`audio_limit` must be in (0, 1], got {self.audio_limit}")
        if not self.speakers or any(not s.isidentifier() for s in self.speakers):
            raise ValueError(f"`speakers` must be a non-empty list of identifiers (buffer names), got {self.speakers}")
        if self.default_speaker not in self.speakers:
            raise ValueError(f"`default_speaker` {self.default_speaker!r} is not one of `speakers` {self.speakers}")


class LlamaOmni2Config(PreTrainedConfig):
    r"""Configuration of [`LlamaOmni2ForConditionalGeneration`] (spec section 6).

    Args:
        speech_encoder_config (`WhisperConfig` or dict): the Whisper encoder (default: large-v3's).
        text_config (`Qwen2Config` or dict): the LLM (default: Qwen2.5-0.5B-Instruct).
        tts_config (`Qwen2Config` or dict): the TTS language model over text + unit tokens (the original's
            `speech_generator`).
        token2wav_config (`LlamaOmni2Token2WavConfig`, dict or None): the CosyVoice2 decoder; None for a
            text + units repo.
        speech_adaptor_downsample_rate, speech_adaptor_hidden_size (int): the adaptor (5 frames concatenated,
            FFN of 2048), as in LLaMA-Omni.
        speech_token_id (int): the `<speech>` placeholder (151665, inside the LLM's padded vocabulary).
        max_prompt_length (int): the spliced prompt is cut to its LAST `max_prompt_length` positions
            (`tokenizer_model_max_length`, quirk Q9).
        tts_read, tts_write (int): R and W of the read/write schedule: every R text tokens the TTS reads their
            fused states and writes up to W speech tokens (`stream_params "(3,10)"`).
        tts_final_max_new_tokens (int): speech tokens allowed after `<sep>` when the text ends (1024).
        tts_do_sample, tts_temperature, tts_top_k, tts_top_p: the TTS sampling; the original always samples at
            T=1, top_p=1 with the implicit top_k=50 of transformers' default GenerationConfig.
        tts_sep_token_id, tts_eos_token_id (int): `<sep>` (fed once after the last text) and the TTS's EOS.
        unit_token_offset, unit_vocab_size (int): TTS ids `offset .. offset+6560` are CosyVoice2 units 0..6560.
        unit_parse ("offset" or "regex"): units are `id - offset` for unit ids (other ids dropped), or, as the
            original does (quirk Q3), the digits of the TTS tokenizer's decoded text (a sampled text token "97"
            then becomes unit 97).
    """

    model_type = "llama_omni2"
    sub_configs = {
        "speech_encoder_config": WhisperConfig,
        "text_config": Qwen2Config,
        "tts_config": Qwen2Config,
        "token2wav_config": LlamaOmni2Token2WavConfig,
    }

    def __init__(
        self,
        speech_encoder_config=None,
        text_config=None,
        tts_config=None,
        token2wav_config=None,
        speech_adaptor_downsample_rate=5,
        speech_adaptor_hidden_size=2048,
        speech_token_id=151665,
        max_prompt_length=4096,
        tts_read=3,
        tts_write=10,
        tts_final_max_new_tokens=1024,
        tts_do_sample=True,
        tts_temperature=1.0,
        tts_top_k=50,
        tts_top_p=1.0,
        tts_sep_token_id=151665,
        tts_eos_token_id=151643,
        unit_token_offset=151666,
        unit_vocab_size=6561,
        unit_parse="offset",
        **kwargs,
    ):
        if kwargs.get("model_type") == "omni2_speech2s_qwen2" or "speech_generator" in kwargs or "stream_params" in kwargs:
            raise ValueError(
                "this is the ORIGINAL LLaMA-Omni2 release (model_type 'omni2_speech2s_qwen2'), not a converted repo: "
                "convert it first with `python -m conversion.convert_llama_omni2 --checkpoint DIR "
                "--decoder-dir COSY2_DECODER_DIR --output OUT`"
            )
        self.speech_encoder_config = _sub_config(WhisperConfig, speech_encoder_config, WHISPER_LARGE_V3_ENCODER)
        self.text_config = _sub_config(Qwen2Config, text_config, QWEN2_5_0_5B)
        self.tts_config = _sub_config(Qwen2Config, tts_config, QWEN2_5_0_5B_TTS)
        self.token2wav_config = (
            None if token2wav_config is None else _sub_config(LlamaOmni2Token2WavConfig, token2wav_config, {})
        )
        self.speech_adaptor_downsample_rate = speech_adaptor_downsample_rate
        self.speech_adaptor_hidden_size = speech_adaptor_hidden_size
        self.speech_token_id = speech_token_id
        self.max_prompt_length = max_prompt_length
        self.tts_read = tts_read
        self.tts_write = tts_write
        self.tts_final_max_new_tokens = tts_final_max_new_tokens
        self.tts_do_sample = tts_do_sample
        self.tts_temperature = float(tts_temperature)
        self.tts_top_k = tts_top_k
        self.tts_top_p = float(tts_top_p)
        self.tts_sep_token_id = tts_sep_token_id
        self.tts_eos_token_id = tts_eos_token_id
        self.unit_token_offset = unit_token_offset
        self.unit_vocab_size = unit_vocab_size
        self.unit_parse = unit_parse
        kwargs.setdefault("tie_word_embeddings", self.text_config.tie_word_embeddings)
        super().__init__(**kwargs)
        self._validate()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """A saved config must describe its sub-models (the defaults are the 0.5B release, 2 GB in fp32)."""
        original = config_dict.get("model_type") == "omni2_speech2s_qwen2" or "speech_generator" in config_dict
        missing = [k for k in ("speech_encoder_config", "text_config", "tts_config")
                   if not config_dict.get(k) and not kwargs.get(k)]
        if missing and not original:
            raise ValueError(
                f"this LLaMA-Omni2 config lacks {' and '.join(f'`{k}`' for k in missing)}: a converted checkpoint's "
                "config.json describes every sub-model (convert a release with conversion/convert_llama_omni2.py); "
                "for the release sizes build LlamaOmni2Config() in code"
            )
        return super().from_dict(config_dict, **kwargs)

    def _validate(self):
        _check_positive_ints(self, [
            "speech_adaptor_downsample_rate", "speech_adaptor_hidden_size", "max_prompt_length", "tts_read",
            "tts_write", "tts_final_max_new_tokens", "unit_vocab_size",
        ])
        for name in ("speech_token_id", "tts_sep_token_id", "tts_eos_token_id", "unit_token_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a token id (an integer >= 0), got {value!r}")
        tts_vocab = self.tts_config.vocab_size
        if self.unit_token_offset + self.unit_vocab_size > tts_vocab:
            raise ValueError(
                f"unit ids {self.unit_token_offset}..{self.unit_token_offset + self.unit_vocab_size - 1} lie beyond "
                f"the TTS vocabulary of {tts_vocab}"
            )
        for name in ("tts_sep_token_id", "tts_eos_token_id"):
            if getattr(self, name) >= tts_vocab:
                raise ValueError(f"`{name}` {getattr(self, name)} lies beyond the TTS vocabulary of {tts_vocab}")
        if self.speech_token_id >= self.text_config.vocab_size:
            raise ValueError(f"`speech_token_id` {self.speech_token_id} lies beyond the LLM vocabulary of "
                             f"{self.text_config.vocab_size} (LLaMA-Omni2's <speech> is an in-vocabulary id)")
        if self.unit_parse not in ("offset", "regex"):
            raise ValueError(f"`unit_parse` must be 'offset' or 'regex', got {self.unit_parse!r}")
        if not isinstance(self.tts_do_sample, bool):
            raise ValueError(f"`tts_do_sample` must be True or False, got {self.tts_do_sample!r}")
        if isinstance(self.tts_top_k, bool) or not isinstance(self.tts_top_k, int) or self.tts_top_k < 0:
            raise ValueError(f"`tts_top_k` must be an integer >= 0 (0: no top-k), got {self.tts_top_k!r}")
        if not self.tts_temperature > 0:
            raise ValueError(f"`tts_temperature` must be > 0 (use tts_do_sample=False for greedy), got "
                             f"{self.tts_temperature}")
        if not 0 < self.tts_top_p <= 1:
            raise ValueError(f"`tts_top_p` must be in (0, 1], got {self.tts_top_p}")
        if self.speech_encoder_config.max_source_positions % self.speech_adaptor_downsample_rate:
            raise ValueError(
                f"the encoder's {self.speech_encoder_config.max_source_positions} positions are not divisible by "
                f"`speech_adaptor_downsample_rate` ({self.speech_adaptor_downsample_rate})"
            )
        if self.token2wav_config is not None and self.token2wav_config.vocab_size != self.unit_vocab_size:
            raise ValueError(f"the token-to-wave decoder knows {self.token2wav_config.vocab_size} units but "
                             f"`unit_vocab_size` is {self.unit_vocab_size}")

    @property
    def speech_tokens_per_audio(self) -> int:
        """LLM positions per audio turn: 30 s -> 3000 mel frames -> 1500 encoder frames -> 1500 / 5 = 300."""
        return self.speech_encoder_config.max_source_positions // self.speech_adaptor_downsample_rate

    @property
    def read_write(self) -> tuple[int, int]:
        return self.tts_read, self.tts_write


__all__ = ["LlamaOmni2Config", "LlamaOmni2Token2WavConfig"]
