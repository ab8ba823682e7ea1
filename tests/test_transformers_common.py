"""transformers' own common suites against LLaMA-Omni: `ModelTesterMixin`, `GenerationTesterMixin`,
`ConfigTester`, `ProcessorTesterMixin` (issue #9, item 6), the bar every in-library model meets.

The suites are the installed transformers' own test sources, fetched and imported by
`transformers_test_sources` (the PyPI sdist, cached; or a checkout's tests/ via TRANSFORMERS_TESTS_DIR, the
only source of the real `GenerationTesterMixin`). The model tester follows transformers'
tests/models/qwen2_audio: a tiny config, one audio per row, its placeholders in `input_ids`.

Every test skipped here is listed in `SKIPPED` with its reason; anything else that fails is a real
incompatibility with transformers to fix in the model, not here.
"""

from __future__ import annotations

import tempfile
import unittest
from unittest import mock

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from transformers_test_sources import SuitesUnavailable, load_suites

try:
    suites = load_suites()
except SuitesUnavailable as error:
    pytest.skip(f"transformers' common test suites are unavailable: {error}", allow_module_level=True)

from llama_omni_hf.configuration_llama_omni import LlamaOmniConfig  # noqa: E402
from llama_omni_hf.modeling_llama_omni import LlamaOmniForConditionalGeneration  # noqa: E402
from llama_omni_hf.processing_llama_omni import LlamaOmniProcessor  # noqa: E402

GenerationTesterMixin = suites.generation_test_utils.GenerationTesterMixin
ConfigTester = suites.test_configuration_common.ConfigTester
ModelTesterMixin = suites.test_modeling_common.ModelTesterMixin
ProcessorTesterMixin = suites.test_processing_common.ProcessorTesterMixin
floats_tensor = suites.test_modeling_common.floats_tensor
ids_tensor = suites.test_modeling_common.ids_tensor


class LlamaOmniModelTester:
    """Tiny LLaMA-Omni: Whisper encoder of 30 positions (60 mel frames) and k=5, so 6 `<speech>` placeholders
    per audio; a 2-layer Llama; a 1-layer unit decoder; no vocoder (text + units model)."""

    # batch 7: the eager-vs-SDPA test runs at batch 7 and pads a smaller batch with random rows (input_ids without
    # placeholders, input_features with audio), which would no longer match
    def __init__(self, parent, batch_size=7, seq_length=14, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.text_config = dict(
            vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            tie_word_embeddings=False,
        )
        self.speech_encoder_config = dict(
            num_mel_bins=16, d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
            max_source_positions=30, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32,
        )
        self.speech_adaptor_downsample_rate = 5
        self.speech_tokens_per_audio = self.speech_encoder_config["max_source_positions"] // 5  # 6
        self.num_mel_frames = 2 * self.speech_encoder_config["max_source_positions"]  # 60
        # what the mixins read
        self.vocab_size = self.text_config["vocab_size"]
        self.hidden_size = self.text_config["hidden_size"]
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.num_attention_heads = self.text_config["num_attention_heads"]
        self.encoder_seq_length = seq_length
        # Inside the vocabulary, as transformers' audio testers (qwen2_audio: audio_token_index=0): the suites
        # embed `input_ids` with `get_input_embeddings()` themselves and shrink the vocabulary with a clamp; the
        # released placeholder (vocab_size, outside) would not survive either. Random ids start above it.
        self.speech_token_id = 3
        # GenerationTesterMixin bans the `audio_token_id` it finds on the tester from being generated
        self.audio_token_id = self.speech_token_id

    def get_config(self) -> LlamaOmniConfig:
        return LlamaOmniConfig(
            speech_token_id=self.speech_token_id,
            speech_encoder_config=self.speech_encoder_config,
            text_config=self.text_config,
            vocoder_config=None,
            speech_adaptor_downsample_rate=self.speech_adaptor_downsample_rate,
            speech_adaptor_hidden_size=24,
            unit_decoder_num_layers=1,
            unit_decoder_hidden_size=32,
            unit_decoder_num_attention_heads=4,
            unit_decoder_num_key_value_heads=4,
            unit_decoder_intermediate_size=48,
            unit_decoder_upsample_factor=3,
            unit_vocab_size=20,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_features = floats_tensor(
            [self.batch_size, self.speech_encoder_config["num_mel_bins"], self.num_mel_frames]
        )
        # ids 4.. : never pad (0), BOS (1), EOS (2) or the placeholder (3)
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 4) + 4
        input_ids[:, 1 : 1 + self.speech_tokens_per_audio] = config.speech_token_id  # one audio per row
        attention_mask = torch.ones_like(input_ids)
        return config, {"input_ids": input_ids, "attention_mask": attention_mask, "input_features": input_features}


# Tests of the suites that cannot apply to this model, each with why; a name also covers its parameterized
# variants (`name_0_...`). Everything not listed must pass.
BEAM_SEARCH = (
    "by design: generate() rejects beam search (LlamaOmniForConditionalGeneration._check_decoding_mode); units "
    "are decoded step by step along one hypothesis per row"
)
CANDIDATES = (
    "by design: generate() rejects assisted and prompt-lookup decoding (_check_decoding_mode): they feed several "
    "candidate tokens per step and roll some back, while the unit decoder consumes each token's state once"
)
SKIPPED = {
    # --- GenerationTesterMixin (only with TRANSFORMERS_TESTS_DIR: the sdist has no tests/generation) ---
    "test_beam_search": BEAM_SEARCH,
    "test_beam_sample": BEAM_SEARCH,
    "test_group_beam_search": BEAM_SEARCH,
    "test_constrained_beam_search": BEAM_SEARCH,
    "test_model_parallel_beam_search": BEAM_SEARCH,
    "test_generate_from_inputs_embeds_1_beam_search": BEAM_SEARCH,
    "test_assisted_decoding": CANDIDATES,
    "test_prompt_lookup_decoding": CANDIDATES,
    "test_correct_missing_keys": (
        "by design: it saves the base model (a plain Llama config) and loads it as LlamaOmniForConditionalGeneration; "
        "a config without the speech encoder's and LLM's sub-configs is an error, not the release sizes "
        "(tests/test_transformers_range.py), and so is a checkpoint without the speech weights (tests/test_loading.py)"
    ),
    # --- the tester's placeholder, not the model ---
    "test_model_rope_scaling_from_config": (
        "feeds random ids over the whole vocabulary and no audio: the tester's in-vocabulary placeholder then "
        "appears as <speech> slots without input_features, a ValueError by design (the release's placeholder "
        "lies outside the vocabulary); the LLM's RoPE is LlamaModel's, which transformers tests"
    ),
}

# The suites choose labels and some checks by a class's place in transformers' auto mappings, which hold
# in-library classes only. Ours is the target of AutoModelForCausalLM and of AutoModel (tiny.AUTO_MAP): every
# test sees it as a causal LM, and these tests, which run only for base models (AutoModel), also as a base
# model (not all tests: the training tests skip base models).
BASE_MODEL_TESTS = (
    "test_inputs_embeds_matches_input_ids",
    "test_model_forward_default_config_values",
    "test_model_rope_scaling_frequencies",
    "test_model_rope_with_partial_rotation",
)


# from_pretrained raises on missing weights (a half-random LLaMA-Omni answers noise); these tests load checkpoints
# with weights removed on purpose, so they run with `allow_missing_weights=True` as the default: they check that
# the flag restores transformers' loading (initialisation of the missing weights, tied weights) on their paths.
MISSING_WEIGHTS_TESTS = ("test_can_init_all_missing_weights", "test_model_weights_reload_no_missing_tied_weights")


def _skip_listed(skipped: dict):
    """Class decorator: skip each listed test (and its parameterized variants) with its reason."""

    def decorate(cls):
        for name in dir(cls):
            for listed, reason in skipped.items():
                if name == listed or name.startswith(listed + "_"):
                    setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))
        return cls

    return decorate


@_skip_listed(SKIPPED)
class LlamaOmniModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (LlamaOmniForConditionalGeneration,)
    additional_model_inputs = ["input_features"]  # passed along with input_ids where the suites build inputs
    _is_composite = True
    # the suite skips `test_can_init_all_missing_weights` for models without a copyright year >= 2023 in the
    # config file (old in-library models not yet fixed); ours must pass it
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = LlamaOmniModelTester(self)
        self.config_tester = ConfigTester(self, config_class=LlamaOmniConfig, has_text_modality=False)
        entry = {LlamaOmniConfig.model_type: LlamaOmniForConditionalGeneration.__name__}
        patches = [mock.patch.dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, entry)]
        if self._testMethodName.startswith(BASE_MODEL_TESTS):
            patches.append(mock.patch.dict(MODEL_MAPPING_NAMES, entry))
        if self._testMethodName.startswith(MISSING_WEIGHTS_TESTS):
            strict = LlamaOmniForConditionalGeneration.from_pretrained.__func__

            def lenient(cls, *args, allow_missing_weights=True, **kwargs):
                return strict(cls, *args, allow_missing_weights=allow_missing_weights, **kwargs)

            patches.append(mock.patch.object(LlamaOmniForConditionalGeneration, "from_pretrained", classmethod(lenient)))
        for patch in patches:
            patch.start()
            self.addCleanup(patch.stop)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if "labels" in inputs_dict:
            # a training batch of this model carries unit targets too (CTC loss of the unit decoder), so the
            # training tests reach every trainable parameter. Fixed values: tests compare the losses of two calls.
            units = torch.arange(self.model_tester.batch_size * 5).reshape(-1, 5)
            inputs_dict["unit_labels"] = units % self.model_tester.get_config().unit_vocab_size
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_sdpa_can_dispatch_composite_models(self):
        # the suite's version looks for a tower named audio_tower, vision_model, ...; ours is `speech_encoder`
        # (paper names), beside `model` (the LLM) and `unit_decoder` (Llama layers). As qwen2_audio's override.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = LlamaOmniForConditionalGeneration(config)
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            sdpa = LlamaOmniForConditionalGeneration.from_pretrained(directory)
            eager = LlamaOmniForConditionalGeneration.from_pretrained(directory, attn_implementation="eager")
        self.assertEqual(sdpa.config._attn_implementation, "sdpa")
        for name in ("speech_encoder", "model", "unit_decoder"):
            self.assertEqual(getattr(sdpa, name).config._attn_implementation, "sdpa", name)
            self.assertEqual(getattr(eager, name).config._attn_implementation, "eager", name)
        for name, module in eager.named_modules():
            implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
            if type(module).__name__.endswith("Attention") and implementation == "sdpa":
                raise ValueError(f"the eager model has an SDPA attention layer: {name}")


# Processor tests that cannot apply, each with why (matched as SKIPPED).
SAMPLING_RATE_REQUIRED = (
    "by design: the suite passes audio without sampling_rate; LlamaOmniProcessor requires the rate explicitly "
    "(a ValueError that says so) rather than assume 16 kHz, and resamples any rate (passes with sampling_rate)"
)
TYPED_KWARGS = (
    "by design: __call__ takes explicit keyword arguments (padding, max_length, ..., sampling_rate), not "
    "typed ProcessingKwargs merged by transformers' private _merge_kwargs (text_kwargs=/common_kwargs=, "
    "defaults from the tokenizer's init kwargs)"
)
PROCESSOR_SKIPPED = {
    "test_kwargs_overrides_default_subprocessor_kwargs_2_audio": SAMPLING_RATE_REQUIRED,
    "test_model_input_names": SAMPLING_RATE_REQUIRED,
    "test_processor_with_multiple_inputs": SAMPLING_RATE_REQUIRED,
    "test_unstructured_kwargs_2_audio": SAMPLING_RATE_REQUIRED,
    "test_unstructured_kwargs_batched_2_audio": SAMPLING_RATE_REQUIRED,
    "test_subprocessor_defaults_preserved_by_kwargs_2_audio": TYPED_KWARGS + "; and no sampling_rate is passed",
    "test_call_arguments_not_in_processor_kwargs": TYPED_KWARGS,
    "test_flat_kwarg_applied_when_modality_dict_lacks_it": TYPED_KWARGS,
    "test_overlapping_text_image_kwargs_handling_2_audio": TYPED_KWARGS,
    "test_structured_kwargs_nested_from_dict_2_audio": TYPED_KWARGS,
    "test_apply_chat_template_audio": (
        "by design: compares with the tokenizer's ids of the rendered text without a second BOS, while the "
        "original tokenizes the rendered <|begin_of_text|> WITH the tokenizer's BOS (double BOS, spec section 2, "
        "what the model was trained on); it also passes video options (num_frames, fps) that __call__ rejects. "
        "The rest of it (URL audio items, processor_kwargs, continue_final_message) passes without those two"
    ),
    "test_chat_template_message_objects": (
        "message objects are accepted (tests/test_processor.py); the expected text also needs OpenAI image_url "
        "blocks renamed to image blocks, an image feature a speech-only processor does not have"
    ),
}


@_skip_listed(PROCESSOR_SKIPPED)
class LlamaOmniProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    """The processor of the tiny checkpoints (llama_omni_hf.tiny): the tiny Llama-3 tokenizer and Whisper's
    128-bin feature extractor, with 6 placeholders per audio as the model tester."""

    processor_class = LlamaOmniProcessor

    @classmethod
    def _setup_tokenizer(cls):
        from llama_omni_hf.tiny_tokenizer import build_tiny_llama3_tokenizer

        return build_tiny_llama3_tokenizer()

    @classmethod
    def _setup_feature_extractor(cls):
        from transformers import WhisperFeatureExtractor

        return WhisperFeatureExtractor(feature_size=128)

    @staticmethod
    def prepare_processor_dict():
        return {"speech_tokens_per_audio": 6}
