"""Tiny random-weight LLaMA-Omni and LLaMA-Omni2 checkpoints, complete Hub-format repos built in seconds.

Used by the tests and as the demo's embedded default (no model can be downloaded here). The weights are
random: the pipeline runs end to end, the answers are noise.

    python -m llama_omni_hf.tiny OUT_DIR [--omni2] [--no-vocoder] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
REMOTE_CODE_FILES = (
    "configuration_llama_omni.py",
    "modeling_llama_omni.py",
    "processing_llama_omni.py",
    "vocoder_llama_omni.py",
    "transformers_compat.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_llama_omni.LlamaOmniConfig",
    "AutoModel": "modeling_llama_omni.LlamaOmniForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_llama_omni.LlamaOmniForConditionalGeneration",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_llama_omni.LlamaOmniProcessor"}
# LLaMA-Omni2 reuses LLaMA-Omni's speech input, stream helpers and processor, so its repos carry those files too
# (and the vocoder module, which LLaMA-Omni's modeling file names).
OMNI2_REMOTE_CODE_FILES = REMOTE_CODE_FILES + (
    "configuration_llama_omni2.py",
    "modeling_llama_omni2.py",
    "processing_llama_omni2.py",
    "token2wav_llama_omni2.py",
)
OMNI2_AUTO_MAP = {
    "AutoConfig": "configuration_llama_omni2.LlamaOmni2Config",
    "AutoModel": "modeling_llama_omni2.LlamaOmni2ForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_llama_omni2.LlamaOmni2ForConditionalGeneration",
}
OMNI2_PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_llama_omni2.LlamaOmni2Processor"}
TINY_OMNI2_VERSION = "1"
DEFAULT_CACHE = Path(os.environ.get("LLAMA_OMNI_CACHE", Path.home() / ".cache" / "llama-omni-hf"))
TINY_VERSION = "2"  # bump when the tiny layout changes, so cached copies are rebuilt


def tiny_config_dict(tokenizer, vocoder: bool = True) -> dict:
    """Sizes small enough for CPU tests; every structural feature of the release kept (128 mels, 1500
    positions, k=5, llama3 RoPE, GQA in the LLM, MHA in the unit decoder, x25 upsampling, 1000 units)."""
    special = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer) - (1 if "<speech>" in tokenizer.get_vocab() else 0),
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=special("<|begin_of_text|>"),
        eos_token_id=[special("<|end_of_text|>"), special("<|eom_id|>"), special("<|eot_id|>")],
        pad_token_id=special("<|finetune_right_pad_id|>"),
        tie_word_embeddings=False,
    )
    encoder = dict(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                   max_source_positions=1500, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64)
    config = dict(
        speech_encoder_config=encoder, text_config=text,
        speech_adaptor_hidden_size=48,
        unit_decoder_num_layers=2, unit_decoder_hidden_size=64, unit_decoder_num_attention_heads=4,
        unit_decoder_num_key_value_heads=4, unit_decoder_intermediate_size=96,
        unit_decoder_upsample_factor=25, unit_vocab_size=1000,
    )
    if vocoder:
        config["vocoder_config"] = dict(upsample_initial_channel=32, embedding_dim=32, duration_predictor_hidden_dim=32)
    return config


def tiny_token2wav_config_dict() -> dict:
    """LLaMA-Omni2's CosyVoice2 token-to-wave at test size: every structural feature of the release kept
    (6561 tokens, 80 mels, x2 upsampling, 3-token look-ahead, 50-token / 100-frame chunks, 10 Euler steps with
    CFG, HiFT's 8-5-3 upsampling and 16/4 iSTFT at 24 kHz), only widths and depths shrunk."""
    return dict(
        input_size=64, encoder_attention_heads=2, encoder_linear_units=64, encoder_num_blocks=2,
        encoder_num_up_blocks=2, estimator_channels=32, estimator_attention_head_dim=16, estimator_num_heads=2,
        estimator_n_blocks=1, estimator_num_mid_blocks=2, hift_base_channels=32, f0_predictor_channels=16,
    )


def write_remote_code(directory: Path, files=REMOTE_CODE_FILES, auto_map=AUTO_MAP,
                      processor_auto_map=PROCESSOR_AUTO_MAP) -> None:
    """Copy the remote-code files next to config.json and point every Auto class at them."""
    for name in files:
        shutil.copyfile(PACKAGE_DIR / name, directory / name)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = auto_map
    config["architectures"] = [auto_map["AutoModel"].split(".")[-1]]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor_class = processor_auto_map["AutoProcessor"].split(".")[-1]
    for name in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        path = directory / name
        if path.exists():
            data = json.loads(path.read_text())
            data["auto_map"] = {**data.get("auto_map", {}), **processor_auto_map}
            if name == "processor_config.json":
                data["processor_class"] = processor_class
            path.write_text(json.dumps(data, indent=2) + "\n")
    if not (directory / "processor_config.json").exists():
        (directory / "processor_config.json").write_text(
            json.dumps({"processor_class": processor_class, "auto_map": processor_auto_map}, indent=2) + "\n"
        )


def write_omni2_remote_code(directory: Path) -> None:
    """`write_remote_code` for a LLaMA-Omni2 repo."""
    write_remote_code(Path(directory), OMNI2_REMOTE_CODE_FILES, OMNI2_AUTO_MAP, OMNI2_PROCESSOR_AUTO_MAP)


def save_hub_repo(model, processor, output_dir, generation_config=None, max_shard_size="5GB",
                  write_code=write_remote_code, extra=None) -> Path:
    """Write model + processor + remote code into `output_dir` atomically (temp dir next to it, then rename).
    `extra(tmp_dir)` may add files (e.g. LLaMA-Omni2's `tts_tokenizer/`) before the rename."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        if generation_config is not None:
            model.generation_config = generation_config
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        processor.save_pretrained(tmp)
        write_code(tmp)
        if extra is not None:
            extra(tmp)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _make_tiny_vocoder_audible(vocoder, target_rms: float = 0.1) -> None:
    """Random weights at std 0.02 make a vocoder whose output is ~1e-10, digital silence in a 16-bit file.
    Use torch's fan-in init without biases, then scale conv_post so random units give speech-level audio."""
    for module in vocoder.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d, torch.nn.Linear, torch.nn.Embedding)):
            module.reset_parameters()
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)
    with torch.no_grad():
        probe = torch.randint(0, vocoder.config.num_embeddings, (1, 64))
        rms = vocoder(probe)[0].pow(2).mean().sqrt().clamp(min=1e-8)
        vocoder.conv_post.weight.mul_(torch.atanh(torch.tensor(target_rms)) / rms)


def build_tiny_model_and_processor(vocoder: bool = True, seed: int = 0):
    from transformers import GenerationConfig, WhisperFeatureExtractor

    from .configuration_llama_omni import LlamaOmniConfig
    from .modeling_llama_omni import LlamaOmniForConditionalGeneration
    from .processing_llama_omni import LlamaOmniProcessor
    from .tiny_tokenizer import build_tiny_llama3_tokenizer

    tokenizer = build_tiny_llama3_tokenizer()
    tokenizer.model_max_length = 2048  # the original's tokenizer_model_max_length: the trained context
    base_vocab = len(tokenizer)
    config = LlamaOmniConfig(**tiny_config_dict(tokenizer, vocoder=vocoder))
    processor = LlamaOmniProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tokenizer,
        speech_tokens_per_audio=config.speech_tokens_per_audio,
    )
    if processor.speech_token_id != base_vocab or config.speech_token_id != base_vocab:
        raise RuntimeError("the <speech> placeholder must be the first id after the LLM vocabulary")
    torch.manual_seed(seed)
    model = LlamaOmniForConditionalGeneration(config).eval()
    if model.vocoder is not None:
        _make_tiny_vocoder_audible(model.vocoder)
    text = config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
        do_sample=False, max_new_tokens=64,
    )
    return model, processor


def build_tiny_checkpoint(output_dir, vocoder: bool = True, seed: int = 0) -> Path:
    """Write a complete tiny checkpoint repo (config with auto_map, remote code, safetensors, processor,
    tokenizer, generation config) to `output_dir` and return its path."""
    model, processor = build_tiny_model_and_processor(vocoder=vocoder, seed=seed)
    return save_hub_repo(model, processor, output_dir)


def default_tiny_checkpoint() -> Path:
    """The demo's embedded default: built once into the cache directory, reused afterwards."""
    return _cached_checkpoint(DEFAULT_CACHE / f"tiny-random-v{TINY_VERSION}", build_tiny_checkpoint, REMOTE_CODE_FILES)


def tiny_omni2_config_dict(tokenizer, tts_tokenizer, token2wav: bool = True) -> dict:
    """LLaMA-Omni2 at test size: every structural feature of the release kept (128 mels, 1500 positions, k=5,
    GQA Qwen2 LLM with tied head and TTS with its own head, `<sep>` == `<speech>` id, 6561 unit ids after it,
    R=3 / W=10, sampling with top-k 50). One size is shrunk besides the widths: the final flush stops after 60
    speech tokens instead of 1024, as a random TTS rarely samples its EOS (41 s of noise per answer otherwise)."""
    ids = tokenizer.convert_tokens_to_ids
    tts_ids = tts_tokenizer.convert_tokens_to_ids
    endoftext, im_end = ids("<|endoftext|>"), ids("<|im_end|>")
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=endoftext, eos_token_id=im_end, use_sliding_window=False,
    )
    tts = dict(
        vocab_size=len(tts_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=endoftext, eos_token_id=endoftext,
        use_sliding_window=False,
    )
    encoder = dict(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                   max_source_positions=1500, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64)
    config = dict(
        speech_encoder_config=encoder, text_config=text, tts_config=tts, speech_adaptor_hidden_size=48,
        speech_token_id=ids("<speech>"), tts_sep_token_id=tts_ids("<sep>"), tts_eos_token_id=endoftext,
        unit_token_offset=tts_ids("<0>"), unit_vocab_size=6561, tts_final_max_new_tokens=60,
    )
    if token2wav:
        config["token2wav_config"] = tiny_token2wav_config_dict()
    return config


def build_tiny_omni2_model_and_processor(token2wav: bool = True, seed: int = 0):
    """A random LLaMA-Omni2 with its processor and TTS tokenizer: (model, processor, tts_tokenizer)."""
    from transformers import GenerationConfig, WhisperFeatureExtractor

    from .configuration_llama_omni2 import LlamaOmni2Config
    from .modeling_llama_omni2 import LlamaOmni2ForConditionalGeneration
    from .processing_llama_omni2 import LlamaOmni2Processor
    from .tiny_tokenizer import build_tiny_qwen2_tokenizer, build_tiny_qwen2_tts_tokenizer

    tokenizer, tts_tokenizer = build_tiny_qwen2_tokenizer(), build_tiny_qwen2_tts_tokenizer()
    tokenizer.model_max_length = 4096  # the original's tokenizer_model_max_length
    config = LlamaOmni2Config(**tiny_omni2_config_dict(tokenizer, tts_tokenizer, token2wav=token2wav))
    processor = LlamaOmni2Processor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer,
                                    speech_tokens_per_audio=config.speech_tokens_per_audio)
    torch.manual_seed(seed)
    model = LlamaOmni2ForConditionalGeneration(config).eval()
    text = config.text_config
    # what the original run script passes over a Qwen2.5 generation_config.json: greedy, eos <|im_end|> and
    # <|endoftext|> (spec 2.3)
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=[text.eos_token_id, text.bos_token_id],
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64,
    )
    return model, processor, tts_tokenizer


def build_tiny_omni2_checkpoint(output_dir, token2wav: bool = True, seed: int = 0) -> Path:
    """A complete tiny LLaMA-Omni2 repo: config with auto_map, remote code, safetensors, processor, tokenizer,
    `tts_tokenizer/` (for unit_parse="regex"), generation config."""
    model, processor, tts_tokenizer = build_tiny_omni2_model_and_processor(token2wav=token2wav, seed=seed)
    return save_hub_repo(model, processor, output_dir, write_code=write_omni2_remote_code,
                         extra=lambda directory: tts_tokenizer.save_pretrained(directory / "tts_tokenizer"))


def _cached_checkpoint(path: Path, build, files) -> Path:
    if not (path / "config.json").exists():
        return build(path)
    for name in files:  # the weights stay; the remote code follows the installed package
        source, cached = PACKAGE_DIR / name, path / name
        if not cached.exists() or cached.read_bytes() != source.read_bytes():
            shutil.copyfile(source, cached)
    return path


def default_tiny_omni2_checkpoint() -> Path:
    """The demo's LLaMA-Omni2 default (`app.py --model tiny-omni2`): built once into the cache directory."""
    return _cached_checkpoint(DEFAULT_CACHE / f"tiny-omni2-random-v{TINY_OMNI2_VERSION}", build_tiny_omni2_checkpoint,
                              OMNI2_REMOTE_CODE_FILES)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight LLaMA-Omni (or LLaMA-Omni2) checkpoint repo.")
    parser.add_argument("output_dir")
    parser.add_argument("--omni2", action="store_true", help="a LLaMA-Omni2 checkpoint (default: LLaMA-Omni)")
    parser.add_argument("--no-vocoder", action="store_true",
                        help="omit the vocoder / token-to-wave decoder (text + units only)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.omni2:
        path = build_tiny_omni2_checkpoint(args.output_dir, token2wav=not args.no_vocoder, seed=args.seed)
    else:
        path = build_tiny_checkpoint(args.output_dir, vocoder=not args.no_vocoder, seed=args.seed)
    print(f"tiny random-weight checkpoint written to {path}")


if __name__ == "__main__":
    main()
