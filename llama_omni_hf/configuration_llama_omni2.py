"""Configuration of LLaMA-Omni2 (arXiv 2505.02625) for transformers remote code.

Defaults are the released numbers (spec `llama-omni2.md` section 1.5 for the decoder), so
`LlamaOmni2Token2WavConfig()` describes the real ICTNLP/cosy2_decoder; tiny test models override sizes only.
"""

from .transformers_compat import MIN_TRANSFORMERS_VERSION  # noqa: F401  (first: checks the installed release)

from transformers import PreTrainedConfig  # noqa: E402

from .configuration_llama_omni import _check_positive_ints  # noqa: E402


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


__all__ = ["LlamaOmni2Token2WavConfig"]
