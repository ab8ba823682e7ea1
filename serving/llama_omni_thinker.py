"""Stage 0 of LLaMA-Omni on vLLM-Omni, the thinker (`LLM_AR`): speech in, text tokens and final-norm states out.

`LlamaOmniThinker` serves a converted LLaMA-Omni checkpoint (config `model_type` "llama_omni", our safetensors)
with vLLM's own Llama as the LLM (paged attention, continuous batching, tensor parallel come with it), in the
multimodal-audio pattern of vLLM's Qwen2-Audio / Ultravox (vllm/model_executor/models/qwen2_audio.py,
ultravox.py):

- the multimodal processor turns each audio (resampled to 16 kHz mono by vLLM's data parser) into the 128 x 3000
  log-mel `input_features` of the project's LlamaOmniProcessor (same resampling and feature extractor,
  so served features equal in-process ones; audio over 30 s is refused, where the in-process processor cuts it
  with a warning a server client would never see), and expands each `<speech>` id of the prompt to the 300 placeholder
  ids the model overwrites (`PromptReplacement`);
- `embed_multimodal` runs the Whisper encoder and the speech adaptor, one [300, H] tensor per audio; the `<speech>`
  id lies outside the LLM vocabulary (it is the first id after it), which `configure_mm_token_handling` tells vLLM
  so the text embedding never looks it up;
- `forward` returns the LLM's final-norm hidden states (what vllm-omni's AR runner hands, per request and in order,
  to the next stage: the rows BatchedUnit2Wav consumes), and `forward` takes the omni runners' extra keyword
  arguments (vllm_omni/worker/gpu_model_runner.py `_model_forward`), which vLLM's own models do not.

The Whisper encoder and adaptor are the transformers / project modules themselves (parameter names as in our
safetensors: `speech_encoder.*`, `speech_adaptor.*`), so their outputs equal the in-process model's; the LLM's
`model.*` / `lm_head.*` load into vLLM's Llama; `unit_decoder.*` / `vocoder.*` belong to stage 1 and are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
)
from vllm.v1.sample.logits_processor import LogitsProcessor

SAMPLING_RATE = 16000
MAX_SECONDS = 30  # Whisper's window (LlamaOmniProcessor's MAX_SECONDS)
SPEECH_TOKEN = "<speech>"


class LlamaOmniProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self):
        return self.ctx.get_hf_config()

    @cached_property
    def llama_omni_processor(self):
        """The project's processor (feature extractor + tokenizer) from the checkpoint: the in-process input path."""
        from llama_omni_hf.processing_llama_omni import LlamaOmniProcessor

        # the server was started with --trust-remote-code (serving/pipeline.py): say so, or transformers asks on
        # stdin whether to run the checkpoint's code
        return LlamaOmniProcessor.from_pretrained(self.ctx.model_config.model,
                                                  trust_remote_code=self.ctx.model_config.trust_remote_code)

    @property
    def speech_token_id(self) -> int:
        return int(self.get_hf_config().speech_token_id)

    @property
    def speech_tokens_per_audio(self) -> int:
        config = self.get_hf_config()
        return config.speech_encoder_config.max_source_positions // config.speech_adaptor_downsample_rate

    def get_data_parser(self):
        return MultiModalDataParser(target_sr=SAMPLING_RATE, target_channels=1,
                                    expected_hidden_size=self._get_expected_hidden_size())

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"audio": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int] | None = None):
        return {"audio": self.speech_tokens_per_audio}


class LlamaOmniDummyInputsBuilder(BaseDummyInputsBuilder[LlamaOmniProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return SPEECH_TOKEN * mm_counts.get("audio", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        # A quiet 440 Hz tone for 30 s, not silence: the project's processor refuses silent audio.
        t = np.arange(30 * SAMPLING_RATE, dtype=np.float32) / SAMPLING_RATE
        tone = (0.1 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
        return {"audio": [tone] * mm_counts.get("audio", 0)}


class LlamaOmniMultiModalProcessor(BaseMultiModalProcessor[LlamaOmniProcessingInfo]):
    def _apply_hf_processor_main(self, mm_items, hf_processor_mm_kwargs) -> BatchFeature:
        """Audio -> input_features [n_audio, 128, 3000], as LlamaOmniProcessor computes them (vLLM tokenizes the
        prompt itself and applies `_get_prompt_updates`)."""
        processor_data, passthrough = self._get_hf_mm_data(
            mm_items.select({k for k, c in mm_items.get_all_counts().items() if c > 0}))
        audios = list(processor_data.get("audios") or processor_data.get("audio") or [])
        data = dict(passthrough)
        if audios:
            for i, audio in enumerate(audios):
                seconds = len(audio) / SAMPLING_RATE
                if seconds > MAX_SECONDS:
                    # In process, longer audio is cut to its first 30 s with a warning (as the original); a server
                    # cannot show that warning, so it refuses instead of silently answering part of the question.
                    raise ValueError(f"audio[{i}] lasts {seconds:.1f} s; LLaMA-Omni hears at most {MAX_SECONDS} s "
                                     "(Whisper's window): send a shorter question or cut it to its first 30 s")
            processor = self.info.llama_omni_processor
            wavs = processor._prepare_audio([np.asarray(a, dtype=np.float32) for a in audios], SAMPLING_RATE)
            features = processor.feature_extractor(wavs, sampling_rate=SAMPLING_RATE, padding="max_length",
                                                   return_tensors="pt")
            data["input_features"] = features["input_features"]
        return BatchFeature(data)

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        """The original tokenizes the rendered chat text (which starts with <|begin_of_text|>) WITH the tokenizer's
        BOS: two BOS ids (LlamaOmniProcessor `double_bos`). vLLM's chat path tokenizes without special tokens, so
        a prompt that starts with one BOS gets the second here; one that has both is left as it is."""
        processor = self.info.llama_omni_processor
        bos = processor.tokenizer.bos_token_id
        if getattr(processor, "double_bos", False) and bos is not None and prompt[:1] == [bos] and prompt[1:2] != [bos]:
            return [bos, *prompt]
        return prompt

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return dict(input_features=MultiModalFieldConfig.batched("audio"))

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        speech_id = self.info.speech_token_id
        return [PromptReplacement(modality="audio", target=[speech_id],
                                  replacement=[speech_id] * self.info.speech_tokens_per_audio)]


@MULTIMODAL_REGISTRY.register_processor(LlamaOmniMultiModalProcessor, info=LlamaOmniProcessingInfo,
                                        dummy_inputs=LlamaOmniDummyInputsBuilder)
class LlamaOmniThinker(nn.Module, SupportsMultiModal, SupportsPP):
    """Whisper encoder + speech adaptor + vLLM's Llama. See the module docstring."""

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
        "unit_decoder.": None,  # stage 1's (serving/llama_omni_unit2wav.py)
        "vocoder.": None,
    })
    # vllm-omni: the next stage gets this stage's hidden rows
    have_multimodal_outputs = False
    has_preprocess = False
    has_postprocess = False

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("audio"):
            return SPEECH_TOKEN
        raise ValueError("LLaMA-Omni takes audio only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        from llama_omni_hf.modeling_llama_omni import LlamaOmniSpeechAdaptor

        config = vllm_config.model_config.hf_config
        self.config = config
        encoder_config = config.speech_encoder_config
        if getattr(encoder_config, "_attn_implementation", None) is None:
            encoder_config._attn_implementation = "sdpa"  # what the in-process model uses by default
        self.configure_mm_token_handling(config.text_config.vocab_size, [config.speech_token_id])
        with self._mark_tower_model(vllm_config, "audio"):
            self.speech_encoder = WhisperEncoder(encoder_config)
            self.speech_adaptor = LlamaOmniSpeechAdaptor(config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"), architectures=["LlamaForCausalLM"],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object):
        features = kwargs.get("input_features")
        if features is None:
            return []
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features))
        encoder_dtype = self.speech_encoder.conv1.weight.dtype
        states = self.speech_encoder(features.to(encoder_dtype)).last_hidden_state  # [n, 1500, d]
        speech = self.speech_adaptor(states.to(self.speech_adaptor.linear1.weight.dtype))  # [n, 300, H]
        return tuple(speech.unbind(0))

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **omni_kwargs):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor):
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


class RefuseStopStrings(LogitsProcessor):
    """A request-validation hook for stage 0 (`logits_processors` in the deploy configs); it leaves logits alone.

    vLLM checks `stop` strings in the API server and, on a match, aborts the request in the engine that produced
    the text (vllm/v1/engine/output_processor.py `reqs_to_abort`, vllm_omni/engine/stage_pool.py
    `process_llm_raw_outputs`): with vllm-omni 0.30's async_chunk pipeline only stage 0 is aborted, stage 1 never
    gets the end of its rows, and the answer never completes (the stream stays open after the text has stopped).
    `validate_params` is vLLM's per-request check (SamplingParams.verify, run by the API server's input
    processor), so such a request is refused at once instead: vllm-omni runs that check after the stream has begun,
    so a streamed request gets an error event and a whole-answer one HTTP 500, both naming `stop_token_ids`, which
    are checked inside the engine and end an answer normally."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        if sampling_params.stop:
            raise ValueError(
                "`stop` strings are not supported by the LLaMA-Omni speech pipeline on vllm-omni 0.30 (the speech "
                "stage would never learn that the answer ended); use `stop_token_ids` instead")

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
