"""What the remote code needs from transformers, across the supported releases (5.13 to the newest): the
cache's name (`past_key_values` before 5.24, `cache` from 5.24 on), the standard forward / generate / loading
contracts that transformers' own common tests check, and one clear error on a release that is too old."""

from __future__ import annotations

import copy
import inspect
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, LlamaModel
from transformers.cache_utils import Cache

from llama_omni_hf.configuration_llama_omni import LlamaOmniConfig
from llama_omni_hf.modeling_llama_omni import LlamaOmniCausalLMOutput, LlamaOmniForConditionalGeneration
from llama_omni_hf.tiny import build_tiny_checkpoint, tiny_config_dict
from llama_omni_hf.transformers_compat import (
    CACHE_ARG,
    CACHE_FIELD,
    MIN_TRANSFORMERS_VERSION,
    check_transformers_version,
)


def test_cache_name_is_the_installed_releases():
    assert CACHE_ARG in inspect.signature(LlamaModel.forward).parameters
    assert CACHE_FIELD in LlamaOmniCausalLMOutput.__dataclass_fields__
    # the output class declares no cache field of its own: it inherits transformers' (both names would break one end)
    assert "past_key_values" not in LlamaOmniCausalLMOutput.__annotations__
    assert "cache" not in LlamaOmniCausalLMOutput.__annotations__


@torch.no_grad()
def test_forward_returns_the_cache_and_continues_from_it(model, france_inputs):
    out = model(**france_inputs, use_cache=True)
    cache = out[CACHE_FIELD]
    assert isinstance(cache, Cache) and cache.get_seq_length() == france_inputs["input_ids"].shape[1]
    # one more token from the cache equals the same token in a full recompute, whichever name the cache goes by
    next_id = out.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([france_inputs["attention_mask"], torch.ones_like(next_id)], 1)
    step = model(input_ids=next_id, attention_mask=mask, **{CACHE_ARG: cache})
    full = model(input_ids=torch.cat([france_inputs["input_ids"], next_id], 1), attention_mask=mask,
                 input_features=france_inputs["input_features"])
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="pass the cache once"):
        model(input_ids=next_id, cache=cache, past_key_values=cache)


@torch.no_grad()
def test_old_cache_name_warns_only_where_transformers_renamed_it(model, france_inputs):
    """As transformers' own models: `past_key_values` is deprecated from 5.24 on, and the only name before."""
    cache = model(**france_inputs, use_cache=True)[CACHE_FIELD]
    next_id = torch.tensor([[5]])
    mask = torch.cat([france_inputs["attention_mask"], torch.ones_like(next_id)], 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_name = model(input_ids=next_id, attention_mask=mask, past_key_values=copy.deepcopy(cache)).logits
    warned = any("`past_key_values` is deprecated" in str(w.message) for w in caught)
    assert warned == (CACHE_ARG == "cache")
    new_name = model(input_ids=next_id, attention_mask=mask, **{CACHE_ARG: copy.deepcopy(cache)}).logits
    torch.testing.assert_close(old_name, new_name, rtol=0, atol=0)


def test_too_old_transformers_is_one_clear_error():
    with pytest.raises(ImportError, match=rf"needs transformers >= {MIN_TRANSFORMERS_VERSION}.*5\.12\.1 is installed"):
        check_transformers_version("5.12.1")
    with pytest.raises(ImportError, match="pip install -U"):
        check_transformers_version("4.57.6")
    for version in (MIN_TRANSFORMERS_VERSION, "5.24.0", "6.0.0.dev0"):
        check_transformers_version(version)


@torch.no_grad()
def test_return_dict_false_gives_the_tuple(model, france_inputs):
    as_dict = model(**france_inputs)
    as_tuple = model(**france_inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.logits, rtol=0, atol=0)  # loss is None, so logits come first
    assert len(as_tuple) == len(as_dict.to_tuple())


@pytest.fixture(scope="module")
def in_vocab_model(processor):
    """A model whose placeholder id lies inside the vocabulary, so it has an embedding (Qwen2-Audio's layout)."""
    config = LlamaOmniConfig(**tiny_config_dict(processor.tokenizer, vocoder=False), speech_token_id=7)
    torch.manual_seed(0)
    return LlamaOmniForConditionalGeneration(config).eval()


@torch.no_grad()
def test_inputs_embeds_with_audio_splices_it(in_vocab_model, processor, france_inputs):
    ids = france_inputs["input_ids"].masked_fill(france_inputs["input_ids"] == processor.speech_token_id, 7)
    inputs = dict(attention_mask=france_inputs["attention_mask"], input_features=france_inputs["input_features"])
    from_ids = in_vocab_model(input_ids=ids, **inputs).logits
    embeds = in_vocab_model.get_input_embeddings()(ids)
    from_embeds = in_vocab_model(inputs_embeds=embeds, **inputs).logits
    torch.testing.assert_close(from_embeds, from_ids, rtol=1e-5, atol=1e-5)
    # the audio matters: without the features the answer differs
    assert (in_vocab_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits - from_ids).abs().max() > 1e-3


@torch.no_grad()
def test_inputs_embeds_with_audio_and_an_out_of_vocab_placeholder_is_a_clear_error(model, france_inputs):
    embeds = model.get_input_embeddings()(france_inputs["input_ids"].clamp(max=model.config.text_config.vocab_size - 1))
    with pytest.raises(ValueError, match="placeholder .* lies after the vocabulary.*get_speech_features"):
        model(inputs_embeds=embeds, input_features=france_inputs["input_features"])


@torch.no_grad()
def test_generate_from_inputs_embeds_equals_generate_from_ids(model, processor):
    prompt = processor.tokenizer("Tell me about the sea", return_tensors="pt")
    options = dict(do_sample=False, max_new_tokens=5, eos_token_id=[1], return_dict_in_generate=True,
                   return_audio=False)
    from_ids = model.generate(**prompt, **options)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(prompt["input_ids"]),
                                 attention_mask=prompt["attention_mask"], **options)
    # from embeddings, transformers returns the new tokens only
    assert from_embeds.sequences.tolist() == from_ids.sequences[:, prompt["input_ids"].shape[1]:].tolist()
    assert [u.tolist() for u in from_embeds.units] == [u.tolist() for u in from_ids.units]


@torch.no_grad()
def test_generate_without_a_prompt_starts_from_bos(model):
    out = model.generate(do_sample=False, max_new_tokens=3, eos_token_id=[1], return_dict_in_generate=True,
                         return_audio=False)
    bos = model.generation_config.bos_token_id
    assert out.sequences[0, 0].item() == bos and out.sequences.shape == (1, 4)
    expected = model.generate(input_ids=torch.tensor([[bos]]), do_sample=False, max_new_tokens=3, eos_token_id=[1],
                              return_dict_in_generate=True, return_audio=False)
    assert out.sequences.tolist() == expected.sequences.tolist() and len(out.units) == 1


@pytest.mark.parametrize("options", [
    {"num_beams": 2},
    {"num_beams": 2, "do_sample": True},
    {"prompt_lookup_num_tokens": 3},
    {"generation_config": GenerationConfig(num_beams=2, max_new_tokens=2)},
])
def test_multi_hypothesis_decoding_is_rejected_up_front(model, france_inputs, options, monkeypatch):
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="greedy decoding or sampling only"):
        model.generate(**france_inputs, max_new_tokens=2, **options)
    assert not calls  # nothing ran


def test_assisted_decoding_is_rejected_up_front(model, france_inputs):
    with pytest.raises(ValueError, match="greedy decoding or sampling only.*assistant_model"):
        model.generate(**france_inputs, max_new_tokens=2, assistant_model=model)


def test_vocoder_stays_fp32_when_built_in_half_precision(processor):
    config = LlamaOmniConfig(**tiny_config_dict(processor.tokenizer, vocoder=True))
    model = LlamaOmniForConditionalGeneration._from_config(config, dtype=torch.float16)
    assert {p.dtype for p in model.vocoder.parameters()} == {torch.float32}
    assert model.lm_head.weight.dtype == torch.float16
    assert "vocoder" in model._keep_in_fp32_modules_strict
    no_vocoder = LlamaOmniForConditionalGeneration._from_config(
        LlamaOmniConfig(**tiny_config_dict(processor.tokenizer, vocoder=False)), dtype=torch.float16)
    assert not no_vocoder._keep_in_fp32_modules_strict


def test_missing_whisper_positions_load_as_sinusoids(tmp_path):
    """openai-whisper's own sinusoids (an independent formula) fill positions a checkpoint lacks."""
    whisper = pytest.importorskip("whisper.model")
    checkpoint = build_tiny_checkpoint(tmp_path / "tiny", vocoder=False)
    weights = load_file(checkpoint / "model.safetensors")
    key = "speech_encoder.embed_positions.weight"
    shape = weights.pop(key).shape
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    loaded = LlamaOmniForConditionalGeneration.from_pretrained(checkpoint, allow_missing_weights=True)
    torch.testing.assert_close(loaded.speech_encoder.embed_positions.weight.detach(),
                               whisper.sinusoids(*shape).float(), rtol=1e-5, atol=1e-5)


def test_config_without_sub_models_is_an_error_not_the_release_sizes(tmp_path):
    checkpoint = build_tiny_checkpoint(tmp_path / "tiny", vocoder=False)
    config = json.loads((checkpoint / "config.json").read_text())
    del config["text_config"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks `text_config`.*convert_llama_omni"):
        LlamaOmniConfig.from_pretrained(checkpoint)
    assert LlamaOmniConfig().text_config.hidden_size == 4096  # in code, the release sizes stay the default
