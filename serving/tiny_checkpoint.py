"""A tiny converted LLaMA-Omni checkpoint that vLLM's CPU attention can serve.

llama_omni_hf.tiny's checkpoint has head_dim 16; vLLM's CPU attention takes head_dim in {32, 64, ...}
(vllm/v1/attention/backends/cpu_attn.py). This one is the same tiny model with a wider LLM (hidden 128, 4 heads,
head_dim 32); everything else (encoder, adaptor, unit decoder, vocoder, tokenizer, processor, remote code) is
llama_omni_hf.tiny's.

    python -m serving.tiny_checkpoint DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

SERVING_TEXT_SIZES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def build_tiny_serving_model_and_processor(seed: int = 0):
    """(model, processor): llama_omni_hf.tiny's, with the LLM widened to head_dim 32."""
    from llama_omni_hf import tiny

    original = tiny.tiny_config_dict

    def wider(tokenizer, vocoder: bool = True) -> dict:
        config = original(tokenizer, vocoder=vocoder)
        config["text_config"] = {**config["text_config"], **SERVING_TEXT_SIZES}
        return config

    tiny.tiny_config_dict = wider
    try:
        return tiny.build_tiny_model_and_processor(vocoder=True, seed=seed)
    finally:
        tiny.tiny_config_dict = original


def build_tiny_serving_checkpoint(output_dir, seed: int = 0) -> Path:
    from llama_omni_hf.tiny import save_hub_repo

    model, processor = build_tiny_serving_model_and_processor(seed=seed)
    return save_hub_repo(model, processor, output_dir)


if __name__ == "__main__":
    print(build_tiny_serving_checkpoint(Path(sys.argv[1])))
