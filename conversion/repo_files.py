"""The repo's files besides the weights: processor + tokenizer, generation config, config, remote code, card."""

from __future__ import annotations

import json
from pathlib import Path

from conversion.original_formats import ConversionError


def build_processor(checkpoint_dir: Path, n_mels: int, n_audio_ctx: int, ds_rate: int):
    from transformers import AutoTokenizer, LlamaConfig, WhisperFeatureExtractor

    from llama_omni_hf.processing_llama_omni import LlamaOmniProcessor

    try:
        # config= : the released config.json has a model_type transformers does not know; the tokenizer is Llama-3's
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir), config=LlamaConfig())
    except Exception as err:
        raise ConversionError(f"cannot load the tokenizer files in {checkpoint_dir}: {err}") from None
    if tokenizer.pad_token is None and "<|finetune_right_pad_id|>" in tokenizer.get_vocab():
        tokenizer.pad_token = "<|finetune_right_pad_id|>"  # Llama-3.1's reserved pad token; batches need one
    # the release says True (transformers 4.43 default); transformers 5 ignores it for BPE and warns at every load
    tokenizer.clean_up_tokenization_spaces = False
    released = json.loads((checkpoint_dir / "config.json").read_text()) if (checkpoint_dir / "config.json").exists() else {}
    # the context the model was trained on (inputs were cut there): the app counts conversation turns against it
    tokenizer.model_max_length = int(released.get("tokenizer_model_max_length", 2048))
    seconds = n_audio_ctx * 2 * 160 / 16000  # encoder positions -> mel frames (stride 2) -> samples (hop 160)
    if seconds != int(seconds):
        raise ConversionError(f"the Whisper encoder's {n_audio_ctx} positions are not a whole number of seconds")
    extractor = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=int(seconds))
    return LlamaOmniProcessor(feature_extractor=extractor, tokenizer=tokenizer,
                              speech_tokens_per_audio=n_audio_ctx // ds_rate)


def build_generation_config(checkpoint: Path, config, tokenizer):
    """The released sampling defaults (Llama-3.1-Instruct's), kept as released, plus a pad token."""
    from transformers import GenerationConfig

    text = config.text_config
    if (checkpoint / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(str(checkpoint))
    else:
        generation = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id)
    if generation.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    return generation


def write_repo_files(directory: Path, config, processor, generation, card: str):
    from llama_omni_hf.tiny import write_remote_code  # copies the remote files, sets every auto_map

    config.architectures = ["LlamaOmniForConditionalGeneration"]
    config.save_pretrained(directory)
    generation.save_pretrained(directory)
    processor.save_pretrained(directory)
    write_remote_code(directory)
    (directory / "README.md").write_text(card)
