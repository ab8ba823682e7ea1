"""The released config.json (+ Whisper dims + fairseq vocoder config) -> a typed LlamaOmniConfig.

Every released field is either used (LLAMA_FIELDS, SPEECH_FIELDS), checked and dropped with a reason
(DROPPED_FIELDS), or reported as not carried over.
"""

from __future__ import annotations

from transformers import LlamaConfig, WhisperConfig

from conversion.original_formats import ConversionError, parse_ctc_decoder_config

# Llama-3.1 fields copied into text_config (names are transformers' LlamaConfig names).
LLAMA_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias", "attention_dropout", "mlp_bias",
    "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
]
REQUIRED_LLAMA = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
# Speech fields read by build_config.
SPEECH_FIELDS = [
    "speech_encoder_type", "speech_projector_type", "speech_generator_type", "speech_encoder_ds_rate",
    "speech_encoder_hidden_size", "ctc_decoder_config", "ctc_upsample_factor", "ctc_loss_weight", "unit_vocab_size",
]
DROPPED_FIELDS = {
    "architectures": "the original class; ours is LlamaOmniForConditionalGeneration",
    "model_type": "checked to be omni_speech2s_llama; ours is llama_omni",
    "_name_or_path": "a local path of the authors",
    "torch_dtype": "replaced by --dtype",
    "dtype": "replaced by --dtype",
    "transformers_version": "ours is written by the installed transformers",
    "use_cache": "a runtime choice",
    "pretraining_tp": "checked to be 1 (no tensor-parallel slicing)",
    "speech_encoder": "a path relative to the original's working directory; the weights are converted instead",
    "tokenizer_model_max_length": "kept as the tokenizer's model_max_length (the trained context), not in config",
    "tokenizer_padding_side": "training-time padding; the processor pads on the left for generation",
}


def _require(released: dict, names: list[str], path):
    missing = [n for n in names if n not in released]
    if missing:
        raise ConversionError(f"{path} lacks {', '.join(missing)}; is it LLaMA-Omni's released config.json?")


def check_released_config(released: dict, path) -> None:
    if released.get("model_type") != "omni_speech2s_llama":
        raise ConversionError(
            f"{path} has model_type {released.get('model_type')!r}, expected 'omni_speech2s_llama' "
            "(the speech-to-speech LLaMA-Omni release, e.g. ICTNLP/Llama-3.1-8B-Omni)"
        )
    _require(released, REQUIRED_LLAMA + SPEECH_FIELDS, path)
    for field, expected in (("speech_encoder_type", "whisper"), ("speech_projector_type", "linear"),
                            ("speech_generator_type", "ctc")):
        if str(released[field]).lower() != expected:
            raise ConversionError(f"{path}: {field} {released[field]!r} is not supported (only {expected!r})")
    if released.get("pretraining_tp", 1) != 1:
        raise ConversionError(f"{path}: pretraining_tp {released['pretraining_tp']} is not supported (only 1)")
    parse_ctc_decoder_config(released["ctc_decoder_config"])


def whisper_encoder_config(dims: dict) -> WhisperConfig:
    """openai-whisper dims -> a WhisperConfig for the encoder only (the decoder half is never built)."""
    from llama_omni_hf.configuration_llama_omni import WHISPER_LARGE_V3_ENCODER

    try:
        return WhisperConfig(**{
            **WHISPER_LARGE_V3_ENCODER,  # decoder fields stay large-v3's: the decoder is never built
            "num_mel_bins": int(dims["n_mels"]), "d_model": int(dims["n_audio_state"]),
            "encoder_layers": int(dims["n_audio_layer"]), "encoder_attention_heads": int(dims["n_audio_head"]),
            "encoder_ffn_dim": 4 * int(dims["n_audio_state"]), "max_source_positions": int(dims["n_audio_ctx"]),
        })
    except (KeyError, TypeError, ValueError) as err:
        raise ConversionError(f"the Whisper dims {dims} are incomplete or invalid ({err})") from None


def build_config(released: dict, path, whisper_dims: dict, adaptor_hidden: int, vocoder_kwargs: dict | None,
                 speech_token_id: int | None, dtype: str):
    """Returns (LlamaOmniConfig, notes). Raises ConversionError on anything inconsistent."""
    from llama_omni_hf.configuration_llama_omni import LlamaOmniConfig

    check_released_config(released, path)
    layers, dim, heads, intermediate = parse_ctc_decoder_config(released["ctc_decoder_config"])
    encoder = whisper_encoder_config(whisper_dims)
    if released["speech_encoder_hidden_size"] != encoder.d_model:
        raise ConversionError(
            f"{path}: speech_encoder_hidden_size {released['speech_encoder_hidden_size']} but the Whisper encoder "
            f"is {encoder.d_model} wide; is --whisper-checkpoint the right Whisper model (large-v3)?"
        )
    text = LlamaConfig(**{k: released[k] for k in LLAMA_FIELDS if k in released})
    try:
        config = LlamaOmniConfig(
            speech_encoder_config=encoder, text_config=text, vocoder_config=vocoder_kwargs,
            speech_adaptor_downsample_rate=int(released["speech_encoder_ds_rate"]),
            speech_adaptor_hidden_size=int(adaptor_hidden),
            unit_decoder_num_layers=layers, unit_decoder_hidden_size=dim, unit_decoder_num_attention_heads=heads,
            # original: num_key_value_heads = heads (no GQA in the unit decoder)
            unit_decoder_num_key_value_heads=heads, unit_decoder_intermediate_size=intermediate,
            unit_decoder_upsample_factor=int(released["ctc_upsample_factor"]),
            unit_vocab_size=int(released["unit_vocab_size"]), ctc_loss_weight=float(released["ctc_loss_weight"]),
            speech_token_id=speech_token_id,
        )
    except ValueError as err:
        raise ConversionError(f"the inputs give an invalid LlamaOmniConfig: {err}") from None
    config.dtype = dtype
    used = set(LLAMA_FIELDS) | set(SPEECH_FIELDS) | set(DROPPED_FIELDS)
    notes = [f"config field {k!r} not carried over (training-time or unknown)" for k in sorted(set(released) - used)]
    return config, notes
