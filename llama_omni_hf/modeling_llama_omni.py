"""LLaMA-Omni (arXiv 2409.06666) as transformers remote code.

Glossary (paper term -> attribute -> original checkpoint key):
    speech encoder  -> `speech_encoder` (transformers WhisperEncoder) -> `model.speech_encoder.*` (openai-whisper names)
    speech adaptor  -> `speech_adaptor`                               -> `model.speech_projector.*`
    LLM             -> `model` + `lm_head` (Llama names kept)         -> `model.*`, `lm_head`
    speech decoder  -> `unit_decoder` (CTC, non-autoregressive)       -> `speech_generator.*`
    vocoder         -> `vocoder` (unit HiFi-GAN, optional)            -> fairseq `g_00500000` `generator.*`

Data flow: 16 kHz audio -> 128x3000 log-mel -> encoder [B,1500,1280] -> adaptor (5 frames concatenated,
FFN) [B,300,4096] spliced over the `<speech>` placeholders -> Llama -> text; the final-norm hidden state that
predicted each text token -> upsampled x25 -> causal unit decoder -> CTC argmax -> collapsed HuBERT units ->
vocoder -> 16 kHz speech.
"""

import copy
import queue
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .transformers_compat import CACHE_FIELD, cache_kwargs, output_cache, resolve_cache  # first: checks the release

from transformers import GenerationMixin, LlamaModel, PreTrainedModel  # noqa: E402
from transformers import initialization as init  # noqa: E402
from transformers.cache_utils import Cache  # noqa: E402
from transformers.generation.configuration_utils import GenerationMode  # noqa: E402
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402
from transformers.generation.utils import GenerateDecoderOnlyOutput  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402
from transformers.processing_utils import Unpack  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding  # noqa: E402
from transformers.models.whisper.modeling_whisper import WhisperEncoder, sinusoids  # noqa: E402
from transformers.utils import TransformersKwargs  # noqa: E402

from .configuration_llama_omni import LlamaOmniConfig  # noqa: E402

IGNORE_INDEX = -100


@dataclass
class LlamaOmniCausalLMOutput(CausalLMOutputWithPast):
    """Output of [`LlamaOmniForConditionalGeneration.forward`]: transformers' causal-LM output (whose cache field
    is `past_key_values` before 5.24 and `cache` from 5.24 on: inherited, not redeclared) plus:

    loss: `lm_loss + ctc_loss_weight * ctc_loss` over the terms whose targets were given (stage 2: CTC only).
    logits: [B, L, vocab] text logits. unit_logits: [B, N*lambda, unit_vocab_size + 1] when unit targets are given.
    """

    lm_loss: torch.FloatTensor | None = None
    ctc_loss: torch.FloatTensor | None = None
    unit_logits: torch.FloatTensor | None = None


@dataclass
class LlamaOmniGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate(..., return_dict_in_generate=True)`: the usual fields plus, per batch item,
    `units` (LongTensor [n_units], collapsed CTC units of the answer) and `audio`
    (FloatTensor [n_samples], 16 kHz, when `return_audio`; empty tensors for an answer without units)."""

    units: list[torch.LongTensor] | None = None
    audio: list[torch.FloatTensor] | None = None
    sampling_rate: int | None = None  # of `audio` (16000 here, 24000 for LLaMA-Omni2)


@dataclass
class LlamaOmniStreamChunk:
    """One update of [`LlamaOmniForConditionalGeneration.generate_stream`] (batch size 1).

    text: new text since the previous chunk (whole words; "" while a word is incomplete).
    token_ids: LongTensor [n] new answer token ids. units: LongTensor [n] new collapsed units.
    audio: FloatTensor [n] new samples at `sampling_rate` (empty until `chunk_size` units are ready).
    sampling_rate: the rate of `audio` (16000 for LLaMA-Omni, 24000 for LLaMA-Omni2; None without a vocoder).
    is_final: True on the last chunk, which also carries `sequences` (prompt + answer ids) and all `units`.
    """

    text: str = ""
    token_ids: torch.LongTensor | None = None
    units: torch.LongTensor | None = None
    audio: torch.FloatTensor | None = None
    sampling_rate: int | None = None
    is_final: bool = False
    sequences: torch.LongTensor | None = None
    all_units: torch.LongTensor | None = None


class _QueueStreamer(BaseStreamer):
    """Forwards generated token ids to the stream's queue and to the caller's own streamer, if any."""

    def __init__(self, events: queue.Queue, user_streamer=None):
        self.events, self.user_streamer, self.prompt_seen = events, user_streamer, False

    def put(self, value):
        if self.user_streamer is not None:
            self.user_streamer.put(value)
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.events.put(("tokens", value.reshape(-1).tolist()))

    def end(self):
        if self.user_streamer is not None:
            self.user_streamer.end()


def _is_wide(character: str) -> bool:
    """CJK ideographs, kana, hangul and full-width forms: each is a word boundary of its own."""
    code = ord(character)
    return any(low <= code <= high for low, high in ((0x2E80, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF),
                                                      (0xFF00, 0xFFEF)))


class _IncrementalText:
    """Decodes a growing answer into whole words without re-decoding all of it at every token.

    Byte-level BPE (Llama-3) decodes token by token into bytes, so once the decoded text is complete (no
    partial UTF-8 character at its end) the tokens so far can be folded into a fixed prefix."""

    def __init__(self, tokenizer):
        self.tokenizer, self.prefix, self.pending, self.sent = tokenizer, "", [], 0

    def _text(self) -> str:
        tail = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if len(self.pending) >= 8 and not tail.endswith("\ufffd"):
            self.prefix, self.pending, tail = self.prefix + tail, [], ""
        return self.prefix + tail

    def add(self, ids: list[int]) -> str:
        """New whole words (up to the last space), or "" while a word or a character is incomplete."""
        self.pending.extend(ids)
        text = self._text()
        if text.endswith("\ufffd"):  # a multi-byte character still incomplete
            return ""
        # up to the last whitespace; scripts written without spaces (CJK) are whole at every character
        ready = len(text) if text and _is_wide(text[-1]) else max(text.rfind(" "), text.rfind("\n"))
        if ready <= self.sent:
            return ""
        new, self.sent = text[self.sent : ready], ready
        return new

    def flush(self) -> str:
        new, self.sent = self._text()[self.sent :], None
        return new


class _StopEvent(StoppingCriteria):
    """Ends generation when the stream's consumer has gone away (iterator closed)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class UnitDecoderCache:
    """Key/value cache of the unit decoder, grown by doubling.

    transformers' DynamicCache concatenates at every update, copying the whole cache: with 25 positions per
    text token that made a step 12x dearer at 1024 tokens than at 64. LlamaAttention needs only `update`;
    the decoder reads `get_seq_length` once per step, before its layers.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    @staticmethod
    def _write(store: list, layer_idx: int, states: torch.Tensor, start: int) -> torch.Tensor:
        end = start + states.shape[-2]
        if layer_idx == len(store):
            store.append(states.new_empty(*states.shape[:-2], max(256, 2 * end), states.shape[-1]))
        elif end > store[layer_idx].shape[-2]:
            grown = states.new_empty(*states.shape[:-2], 2 * end, states.shape[-1])
            grown[..., :start, :] = store[layer_idx][..., :start, :]
            store[layer_idx] = grown
        store[layer_idx][..., start:end, :] = states
        return store[layer_idx][..., :end, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys = self._write(self.keys, layer_idx, key_states, self.length)
        values = self._write(self.values, layer_idx, value_states, self.length)
        if layer_idx == self.num_layers - 1:  # the last layer closes the step
            self.length += key_states.shape[-2]
        return keys, values


@dataclass
class LlamaOmniUnitStreamState:
    """Incremental unit decoding during generation; owned by the caller, modules hold weights only.

    One LLM step yields one final-norm state per row; the unit decoder consumes it with its own KV cache,
    so the units of text token t are final in the same step (the decoder is causal, spec section 4).
    """

    eos_token_ids: torch.LongTensor
    cache: UnitDecoderCache
    step: int = 0
    finished: torch.BoolTensor | None = None  # [B] row emitted EOS: later states are not part of its answer
    last_frame: torch.LongTensor | None = None  # [B] last CTC frame class, to collapse across step boundaries
    num_states: torch.LongTensor | None = None  # [B] states consumed per row (= answer tokens incl. EOS)
    units: list[list[int]] = field(default_factory=list)
    on_step: object | None = None  # optional callback(new_units: list[list[int]], state) after each step


class LlamaOmniSpeechAdaptor(nn.Module):
    """Concatenate k consecutive encoder frames, then Linear -> ReLU -> Linear (paper section 2.2)."""

    def __init__(self, config: LlamaOmniConfig):
        super().__init__()
        self.k = config.speech_adaptor_downsample_rate
        encoder_dim = config.speech_encoder_config.d_model
        self.linear1 = nn.Linear(encoder_dim * self.k, config.speech_adaptor_hidden_size)
        self.linear2 = nn.Linear(config.speech_adaptor_hidden_size, config.text_config.hidden_size)

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        batch, frames, dim = encoder_states.shape
        frames -= frames % self.k  # original: trailing frames that do not fill a group are dropped
        x = encoder_states[:, :frames].reshape(batch, frames // self.k, dim * self.k)  # [B, T/k, k*C]
        return self.linear2(F.relu(self.linear1(x)))


def collapse_units(frames: list[int], blank: int, previous: int | None = None) -> list[int]:
    """CTC collapse: merge consecutive repeats FIRST, then drop blanks ("5 _ 5" -> "5 5"), as the original.
    `previous`: the frame before these (when collapsing step by step), so a repeat across steps merges too."""
    units = []
    for frame in frames:
        if frame != previous and frame != blank:
            units.append(frame)
        previous = frame
    return units


class LlamaOmniUnitDecoder(nn.Module):
    """Non-autoregressive CTC unit decoder ("speech decoder" in the paper, `speech_generator` originally).

    input_proj -> Llama decoder layers (causal, RoPE of the LLM) -> NO final norm -> output_proj over
    unit_vocab_size + 1 classes (blank = unit_vocab_size).
    """

    def __init__(self, config: LlamaOmniConfig):
        super().__init__()
        self.config = config.unit_decoder_config
        self.upsample_factor = config.unit_decoder_upsample_factor
        self.blank_id = config.unit_vocab_size
        self.input_proj = nn.Linear(config.text_config.hidden_size, self.config.hidden_size)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(self.config, i) for i in range(self.config.num_hidden_layers)]
        )
        self.rotary_emb = LlamaRotaryEmbedding(config=self.config)
        self.output_proj = nn.Linear(self.config.hidden_size, config.unit_vocab_size + 1)

    def _attention_mask(self, key_padding: torch.Tensor | None, q_len: int, kv_len: int, batch: int, dtype, device):
        # Explicit causal mask: eager attention with mask=None would NOT be causal (spec section 3).
        min_value = torch.finfo(dtype).min
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
        allowed = causal[None, None].expand(batch, 1, q_len, kv_len)
        if key_padding is not None:  # [B, kv_len], True = real position
            allowed = allowed & key_padding[:, None, None, :].bool()
            # padded query rows would attend to nothing: let them see themselves to avoid NaN
            query_positions = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
            allowed = allowed | (query_positions == torch.arange(kv_len, device=device))
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill(~allowed, min_value)

    def forward(
        self,
        upsampled_states: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        """upsampled_states: [B, T, H_llm] (already repeated lambda times) -> CTC logits [B, T, K+1]."""
        batch, q_len, _ = upsampled_states.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        hidden = self.input_proj(upsampled_states)
        # positions restart at 0 for the decoder and run on across steps when cached
        position_ids = torch.arange(past, past + q_len, device=hidden.device)[None].expand(batch, -1)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        mask = self._attention_mask(key_padding_mask, q_len, past + q_len, batch, hidden.dtype, hidden.device)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=past_key_values is not None,
                position_embeddings=position_embeddings,
                **cache_kwargs(past_key_values),
            )
        return self.output_proj(hidden)

    def upsample(self, states: list[torch.Tensor], target_lengths: torch.Tensor | None = None):
        """Repeat each state lambda times (training: stretch uniformly to the unit target length when that is
        longer, as the original `_uniform_assignment`). Returns [B, T, H] and a key padding mask [B, T]."""
        src_lengths = torch.tensor([len(s) for s in states], device=states[0].device)
        up_lengths = src_lengths * self.upsample_factor
        if target_lengths is not None:
            up_lengths = torch.maximum(up_lengths, target_lengths.to(up_lengths.device))
        padded = nn.utils.rnn.pad_sequence(states, batch_first=True)  # [B, N, H]
        positions = torch.arange(int(up_lengths.max()), device=padded.device)[None]
        key_padding = positions < up_lengths[:, None]  # [B, T]
        # float32 true division, as the original's `_uniform_assignment` (so rounding at boundaries matches)
        ratio = up_lengths / src_lengths.clamp(min=1)
        index = (positions / ratio[:, None]).long().masked_fill(~key_padding, 0)
        upsampled = padded.gather(1, index[..., None].expand(-1, -1, padded.shape[-1]))
        return upsampled.masked_fill(~key_padding[..., None], 0.0), key_padding

    def ctc_loss(self, states: list[torch.Tensor], unit_labels: torch.Tensor):
        """Stage-2 loss (original `SpeechGeneratorCTC.forward`): sum over the batch / total target length."""
        target_lengths = unit_labels.ne(IGNORE_INDEX).sum(-1)
        upsampled, key_padding = self.upsample(states, target_lengths)
        logits = self(upsampled, key_padding)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        targets = unit_labels[unit_labels.ne(IGNORE_INDEX)]
        loss = F.ctc_loss(
            log_probs.transpose(0, 1),
            targets,
            key_padding.sum(-1),
            target_lengths,
            blank=self.blank_id,
            reduction="sum",
            zero_infinity=True,
        )
        return loss / target_lengths.sum().clamp(min=1), logits

    @torch.no_grad()
    def predict(self, states: torch.Tensor) -> list[int]:
        """Offline prediction for one answer: states [N, H] -> collapsed units (the original's full recompute)."""
        if states.shape[0] == 0:
            return []
        upsampled = states.repeat_interleave(self.upsample_factor, dim=0)[None]
        frames = self(upsampled).float().argmax(-1)[0].tolist()
        return collapse_units(frames, self.blank_id)


class LlamaOmniPreTrainedModel(PreTrainedModel):
    config_class = LlamaOmniConfig
    config: LlamaOmniConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "WhisperEncoderLayer", "LlamaOmniVocoder"]
    _skip_keys_device_placement = ["past_key_values", "cache"]  # the cache's name before / from 5.24
    _supports_sdpa = True
    _supports_flash_attn = False  # the unit decoder needs an explicit 4D causal mask
    # original: the fairseq vocoder runs in fp32; in fp16 rounded durations flip and the waveform shifts
    _keep_in_fp32_modules_strict = ["vocoder"]
    _supports_attention_backend = True

    @torch.no_grad()
    def initialize_weights(self):
        # Whisper's positions are fixed sinusoids, never random. WhisperPreTrainedModel._init_weights sets them on
        # the WhisperEncoder module, which transformers skips in remote code (a module without parameters of its
        # own counts as initialized). `init.copy_` leaves loaded weights alone and fills only missing ones.
        super().initialize_weights()
        positions = self.speech_encoder.embed_positions.weight
        init.copy_(positions, sinusoids(*positions.shape).to(positions))

    @classmethod
    def from_pretrained(cls, *args, allow_missing_weights: bool = False, **kwargs):
        """transformers' `from_pretrained`, but a checkpoint that lacks weights is an error (a half-random
        LLaMA-Omni answers noise without a hint why); `allow_missing_weights=True` restores the default."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys", ()))
        mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
        if (missing or mismatched) and not allow_missing_weights:
            shown = ", ".join(missing[:8] + mismatched[:8])
            more = len(missing) + len(mismatched) - min(len(missing), 8) - min(len(mismatched), 8)
            raise ValueError(
                f"the checkpoint lacks {len(missing)} weights and has {len(mismatched)} of the wrong shape for "
                f"{cls.__name__}: {shown}{f' and {more} more' if more > 0 else ''}. Is it a converted LLaMA-Omni "
                "repo? (convert the original release with conversion/convert_llama_omni.py; pass "
                "allow_missing_weights=True to load anyway with random weights)"
            )
        return (model, info) if want_info else model


class LlamaOmniForConditionalGeneration(LlamaOmniPreTrainedModel, GenerationMixin):
    """Speech in, text + units (+ audio with a vocoder) out. See the module docstring for the glossary."""

    def __init__(self, config: LlamaOmniConfig):
        super().__init__(config)
        self.speech_encoder = WhisperEncoder(config.speech_encoder_config)
        self.speech_adaptor = LlamaOmniSpeechAdaptor(config)
        self.model = LlamaModel(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.unit_decoder = LlamaOmniUnitDecoder(config)
        self.vocoder = None
        if config.vocoder_config is not None:
            from .vocoder_llama_omni import LlamaOmniVocoder

            # fp32 even when built under another default dtype (`_from_config(dtype=torch.float16)`)
            self.vocoder = LlamaOmniVocoder(config.vocoder_config).float()
        else:
            self._keep_in_fp32_modules_strict = []  # no vocoder to keep
        self.training_stage = None
        self.post_init()

    # --- embeddings (so resize_token_embeddings and Llama tooling work) ---
    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # --- training stages (paper section 3.3) ---
    def set_training_stage(self, stage: int | None):
        """1: train adaptor + LLM (encoder and unit decoder frozen). 2: train only the unit decoder.
        None: everything trainable. The vocoder is never trained here."""
        if stage not in (1, 2, None):
            raise ValueError(f"training stage must be 1, 2 or None, got {stage!r}")
        trainable = {
            1: ("speech_adaptor", "model", "lm_head"),
            2: ("unit_decoder",),
            None: ("speech_encoder", "speech_adaptor", "model", "lm_head", "unit_decoder"),
        }[stage]
        for name, module in self.named_children():
            module.requires_grad_(name in trainable)
        self.training_stage = stage
        return self

    # --- speech input ---
    def get_speech_features(self, input_features: torch.Tensor) -> torch.Tensor:
        """[n_audio, 128, 3000] log-mel -> [n_audio, 300, hidden] adaptor outputs."""
        encoder_dtype = self.speech_encoder.conv1.weight.dtype
        encoder_states = self.speech_encoder(input_features.to(encoder_dtype)).last_hidden_state  # [n, 1500, 1280]
        return self.speech_adaptor(encoder_states.to(self.speech_adaptor.linear1.weight.dtype))

    def _embed_with_speech(self, input_ids, input_features, inputs_embeds=None):
        """Token embeddings with each audio's adaptor outputs over its `<speech>` placeholders."""
        if inputs_embeds is None:
            is_speech = input_ids == self.config.speech_token_id
            # the placeholder id may lie outside the vocabulary: embed a harmless id, then overwrite
            embeds = self.model.embed_tokens(input_ids.masked_fill(is_speech, 0))
        elif input_features is None:
            return inputs_embeds
        else:
            embeds, is_speech = inputs_embeds, self._placeholders_in_embeds(inputs_embeds)
        n_placeholders = int(is_speech.sum())
        if input_features is None:
            if n_placeholders:
                raise ValueError(
                    f"input_ids contain {n_placeholders} <speech> placeholders but no `input_features` were given; "
                    "build both with the LlamaOmniProcessor"
                )
            return embeds
        encoder = self.config.speech_encoder_config
        expected = (encoder.num_mel_bins, 2 * encoder.max_source_positions)  # 128 mels x 3000 frames (30 s)
        if input_features.ndim != 3 or tuple(input_features.shape[1:]) != expected:
            raise ValueError(
                f"input_features must be [n_audio, {expected[0]}, {expected[1]}] log-mel features, got "
                f"{list(input_features.shape)}; build them with the LlamaOmniProcessor"
            )
        features = self.get_speech_features(input_features)  # [n_audio, 300, H]
        if features.shape[0] * features.shape[1] != n_placeholders:
            raise ValueError(
                f"got {features.shape[0]} audio inputs ({features.shape[0] * features.shape[1]} speech positions) but "
                f"{n_placeholders} <speech> placeholders in input_ids; each audio needs exactly "
                f"{self.config.speech_tokens_per_audio} (use the LlamaOmniProcessor)"
            )
        # original splicing: the 300 vectors replace the placeholder, positions run straight through
        features = features.to(device=embeds.device, dtype=embeds.dtype).reshape(-1, embeds.shape[-1])
        return embeds.masked_scatter(is_speech[..., None], features)

    def _placeholders_in_embeds(self, inputs_embeds: torch.Tensor) -> torch.BoolTensor:
        """Where `inputs_embeds` holds the placeholder's embedding (as Qwen2-Audio finds its audio token)."""
        embed_tokens = self.get_input_embeddings()
        if self.config.speech_token_id >= embed_tokens.num_embeddings:
            raise ValueError(
                f"`inputs_embeds` with `input_features`: the <speech> placeholder (id {self.config.speech_token_id}) "
                "lies after the vocabulary and has no embedding, so the audio positions cannot be found in "
                "`inputs_embeds`. Pass the processor's `input_ids` instead, or splice "
                "`model.get_speech_features(input_features)` into your embeddings and pass them without features"
            )
        placeholder = embed_tokens.weight[self.config.speech_token_id].to(inputs_embeds)
        return (inputs_embeds == placeholder).all(-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        unit_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        unit_stream: LlamaOmniUnitStreamState | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> LlamaOmniCausalLMOutput:
        r"""
        input_features: [n_audio, 128, 3000] log-mel from the processor, one per `<speech>` slot.
        labels: [B, L] text targets (-100 = ignore), unshifted as in transformers; gives the LM loss (stage 1).
        unit_labels: [B, U] unit targets (-100 padded); with `labels`, gives the CTC loss (stage 2) on the
            final-norm states at the response positions (where labels != -100), as the original.
        unit_stream: used by `generate` to decode units incrementally; leave None.
        """
        past_key_values = resolve_cache(cache, past_key_values)  # `cache` from transformers 5.24 on
        loss_kwargs = {key: kwargs.pop(key) for key in ("num_items_in_batch", "shift_labels") if key in kwargs}
        return_dict = kwargs.pop("return_dict", None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        if unit_labels is not None and labels is None:
            raise ValueError("`unit_labels` need `labels`: the CTC loss reads the states at the response positions")
        inputs_embeds = self._embed_with_speech(input_ids, input_features, inputs_embeds)
        self.unit_decoder.config._attn_implementation = self.config._attn_implementation
        outputs = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **cache_kwargs(past_key_values),
            **kwargs,
        )
        hidden = outputs.last_hidden_state  # after the final RMSNorm: what lm_head and the unit decoder read
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.lm_head(hidden[:, keep])

        lm_loss = ctc_loss = unit_logits = None
        if labels is not None and self.training_stage != 2:
            # transformers' causal-LM loss: next-token cross-entropy over labels != -100 (as the original), and
            # the Trainer's `num_items_in_batch` / `shift_labels`
            lm_loss = self.loss_function(logits, labels, vocab_size=logits.shape[-1], **loss_kwargs)
        if unit_labels is not None:
            # original: states AT the label positions (not shifted), one per response token
            states = [h[l != IGNORE_INDEX] for h, l in zip(hidden, labels.to(hidden.device))]
            ctc_loss, unit_logits = self.unit_decoder.ctc_loss(states, unit_labels.to(hidden.device))
        loss = None
        if self.training_stage == 2:
            loss = ctc_loss  # original (tune_speech_generator_only): the plain CTC loss, no weight
        elif lm_loss is not None or ctc_loss is not None:
            loss = (lm_loss if lm_loss is not None else 0.0) + (
                self.config.ctc_loss_weight * ctc_loss if ctc_loss is not None else 0.0
            )
        if unit_stream is not None:
            self._unit_stream_step(unit_stream, input_ids, hidden[:, -1:])
        output = LlamaOmniCausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            ctc_loss=ctc_loss,
            logits=logits,
            unit_logits=unit_logits,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
            **{CACHE_FIELD: output_cache(outputs)},
        )
        return output if return_dict else output.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, *args, inputs_embeds=None, input_features=None,
                                      is_first_iteration=False, **kwargs):
        """transformers' own, with the audio passed at the prefill only (as Llava / Qwen2-Audio do): later steps
        feed one new token, which has no placeholders. transformers < 5.15 forwards every keyword at every step."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, *args, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        model_inputs.pop("input_features", None)
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["input_features"] = input_features
        return model_inputs

    # --- incremental units during generation ---
    def init_unit_stream(self, batch_size: int, eos_token_id, on_step=None) -> LlamaOmniUnitStreamState:
        eos = [] if eos_token_id is None else eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos)
        device = self.lm_head.weight.device
        return LlamaOmniUnitStreamState(
            eos_token_ids=torch.tensor(eos, dtype=torch.long, device=device),
            cache=UnitDecoderCache(self.config.unit_decoder_num_layers),
            finished=torch.zeros(batch_size, dtype=torch.bool, device=device),
            last_frame=torch.full((batch_size,), -1, dtype=torch.long, device=device),
            num_states=torch.zeros(batch_size, dtype=torch.long, device=device),
            units=[[] for _ in range(batch_size)],
            on_step=on_step,
        )

    def _unit_stream_step(self, state: LlamaOmniUnitStreamState, input_ids, last_state: torch.Tensor):
        """Consume this step's state [B, 1, H]: the one that predicts the next text token."""
        if state.step > 0 and input_ids is not None:
            # the token fed now was generated last step; after an EOS the row's answer is complete
            state.finished |= torch.isin(input_ids[:, -1], state.eos_token_ids)
        state.step += 1
        active = ~state.finished
        new_units = [[] for _ in range(last_state.shape[0])]
        if active.any():
            upsampled = last_state.repeat_interleave(self.unit_decoder.upsample_factor, dim=1)  # [B, lambda, H]
            frames = self.unit_decoder(upsampled, past_key_values=state.cache).float().argmax(-1)  # [B, lambda]
            state.num_states += active.long()
            for row in torch.nonzero(active).flatten().tolist():
                row_frames = frames[row].tolist()
                new_units[row] = collapse_units(row_frames, self.unit_decoder.blank_id, int(state.last_frame[row]))
                state.last_frame[row] = row_frames[-1]
                state.units[row].extend(new_units[row])
        if state.on_step is not None:
            state.on_step(new_units, state)

    # --- generation ---
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_audio: bool | None = None,
        return_units: bool = True,
        unit_stream: LlamaOmniUnitStreamState | None = None,
        **kwargs,
    ):
        """transformers' `generate` (any of its sampling arguments, `streamer=`, several EOS ids) that also
        decodes speech units step by step. With `return_dict_in_generate=True` returns a
        [`LlamaOmniGenerateOutput`] with `.sequences` (prompt + answer), `.units` and, when `return_audio`
        (default: True if the checkpoint has a vocoder), `.audio`. `return_units=False` runs the LLM alone
        (text only, as plain Llama generation; `.units` is then None)."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        self._check_decoding_mode(generation_config, kwargs)
        if return_audio and self.vocoder is None:
            raise ValueError(
                "this checkpoint has no vocoder (config.vocoder_config is None), so it cannot return audio; "
                "use return_audio=False to get text and units"
            )
        eos = kwargs.get("eos_token_id", generation_config.eos_token_id)
        if return_audio and not return_units:
            raise ValueError("return_audio=True needs the units: do not pass return_units=False")
        if return_audio and not kwargs.get("return_dict_in_generate", generation_config.return_dict_in_generate):
            raise ValueError("return_audio=True needs return_dict_in_generate=True: a tensor of ids has no room "
                             "for the audio")
        input_ids, input_features, placeholders = self._hide_placeholders(input_ids, input_features, kwargs)
        if return_units and unit_stream is None:
            # transformers repeats each prompt num_return_sequences times before the first step; without ids or
            # embeddings it starts one row from BOS
            prompts = kwargs.get("inputs_embeds", input_ids)
            copies = kwargs.get("num_return_sequences") or generation_config.num_return_sequences or 1
            unit_stream = self.init_unit_stream((1 if prompts is None else prompts.shape[0]) * copies, eos)
        if return_units:  # else plain Llama generation: text only
            kwargs["unit_stream"] = unit_stream
        output = super().generate(
            input_ids=input_ids, input_features=input_features, attention_mask=attention_mask, **kwargs
        )
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        if placeholders is not None:  # the prompt as the caller gave it
            rows = placeholders.repeat_interleave(sequences.shape[0] // placeholders.shape[0], dim=0)
            sequences[:, : rows.shape[1]][rows] = self.config.speech_token_id
        if isinstance(output, torch.Tensor):
            return output
        if not return_units:
            return LlamaOmniGenerateOutput(**dict(output.items()))
        device = output.sequences.device
        units = [torch.tensor(u, dtype=torch.long, device=device) for u in unit_stream.units]
        audio = None
        if return_audio is None:
            return_audio = self.vocoder is not None
        if return_audio:
            audio = self.units_to_audio(units)
        return LlamaOmniGenerateOutput(**{k: v for k, v in output.items()}, units=units, audio=audio,
                                       sampling_rate=self.vocoder.config.sampling_rate if return_audio else None)

    def _hide_placeholders(self, input_ids, input_features, kwargs):
        """Prefill from embeddings with the audio spliced in, and give transformers the prompt ids with an
        in-vocabulary filler over the placeholders. Its logits processors (repetition penalty, n-gram bans) index
        the scores with every id of the sequence, and the placeholder id lies after the vocabulary: an IndexError
        in transformers 5.13. The caller gets the placeholders back in `sequences`."""
        if input_ids is None or input_features is None or "inputs_embeds" in kwargs or kwargs.get("use_cache") is False:
            return input_ids, input_features, None  # (without a cache every step re-reads the ids: keep them)
        is_speech = input_ids == self.config.speech_token_id
        kwargs["inputs_embeds"] = self._embed_with_speech(input_ids, input_features)
        pad = self.generation_config.pad_token_id
        filler = pad if isinstance(pad, int) and 0 <= pad < self.config.text_config.vocab_size else 0
        return input_ids.masked_fill(is_speech, filler), None, is_speech

    @staticmethod
    def _check_decoding_mode(generation_config, kwargs):
        """Greedy or sampling only, one hypothesis per row, decided before any work. Beam search, assisted and
        prompt-lookup decoding feed the LLM several candidate tokens per step and roll some back, but the unit
        decoder consumes each accepted token's state once, as it is generated (and the assistant would not see
        the audio)."""
        config = copy.deepcopy(generation_config)
        config.update(**{key: value for key, value in kwargs.items() if hasattr(config, key)})
        mode = config.get_generation_mode(kwargs.get("assistant_model"))
        if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            raise ValueError(
                f"LLaMA-Omni generates with greedy decoding or sampling only, not {mode.value.replace('_', ' ')}: "
                "units are decoded step by step along one hypothesis per row (use num_beams=1, no assistant_model "
                "or prompt_lookup_num_tokens)"
            )

    def generate_stream(self, input_ids=None, input_features=None, attention_mask=None, tokenizer=None,
                        chunk_size: int = 10, vocoder_left_context: int | None = None,
                        vocoder_lookahead: int | None = None, streamer=None, **kwargs):
        """Generate one answer and yield [`LlamaOmniStreamChunk`]s as soon as text, units and audio exist.

        Same generation arguments as `generate` (greedy, sampling, temperature, top_p, ...). Audio is
        vocoded every `chunk_size` (Omega) units: smaller Omega = earlier first audio (paper: 226 ms at
        Omega=10) and more vocoder calls; chunks are vocoded with left context and a small look-ahead, so
        unlike the original there are no seams at small Omega. `tokenizer` (e.g. `processor.tokenizer`)
        is needed for `.text`. A transformers `streamer=` (e.g. `TextIteratorStreamer`) is fed too.
        Closing the iterator (or leaving a `for` loop) stops generation.
        """
        if input_ids is None or input_ids.shape[0] != 1:
            raise ValueError("generate_stream takes one conversation (batch size 1); use generate() for batches")
        if (kwargs.get("num_return_sequences") or 1) != 1 or (kwargs.get("num_beams") or 1) != 1:
            raise ValueError("generate_stream yields one answer: num_return_sequences and num_beams must be 1")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"`chunk_size` (Omega) must be a positive integer, got {chunk_size!r}")
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        generation_config = kwargs.get("generation_config") or self.generation_config
        state = self.init_unit_stream(1, kwargs.get("eos_token_id", generation_config.eos_token_id),
                                      on_step=lambda new, _: new[0] and events.put(("units", list(new[0]))))
        stopping = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        stopping.append(_StopEvent(stop))

        def run():
            try:
                output = self.generate(
                    input_ids=input_ids, input_features=input_features, attention_mask=attention_mask,
                    unit_stream=state, streamer=_QueueStreamer(events, streamer), stopping_criteria=stopping,
                    return_audio=False, return_dict_in_generate=True, **kwargs,
                )
                events.put(("done", output))
            except BaseException as error:  # surfaced in the consumer's thread
                events.put(("error", error))

        vocoder_state = None
        if self.vocoder is not None:
            options = {"chunk_size": chunk_size}
            if vocoder_left_context is not None:
                options["left_context"] = vocoder_left_context
            if vocoder_lookahead is not None:
                options["lookahead"] = vocoder_lookahead
            vocoder_state = self.vocoder.init_stream(**options)
        thread = threading.Thread(target=run, name="llama-omni-generate", daemon=True)
        return self._stream_chunks(events, stop, thread, self.vocoder, vocoder_state, tokenizer)

    def _stream_chunks(self, events, stop, thread, decoder, decoder_state, tokenizer):
        """Chunks from the generation thread's events; `decoder.stream(decoder_state, units, final=)` turns units
        into audio (LLaMA-Omni's vocoder, LLaMA-Omni2's token-to-wave)."""
        # generation starts at the first next(): an iterator closed before that never ran anything
        text = _IncrementalText(tokenizer) if tokenizer is not None else None
        rate = decoder.config.sampling_rate if decoder_state is not None else None
        empty_ids = torch.zeros(0, dtype=torch.long)
        thread.start()
        try:
            while True:
                kind, value = events.get()
                if kind == "error":
                    raise value
                chunk = LlamaOmniStreamChunk(token_ids=empty_ids, units=empty_ids, audio=torch.zeros(0),
                                             sampling_rate=rate)
                if kind == "tokens":
                    chunk.token_ids = torch.tensor(value, dtype=torch.long)
                    chunk.text = text.add(value) if text is not None else ""
                elif kind == "units":
                    chunk.units = torch.tensor(value, dtype=torch.long)
                    if decoder_state is not None:
                        chunk.audio = decoder.stream(decoder_state, value).float().cpu()
                elif kind == "done":
                    chunk.is_final = True
                    chunk.sequences = value.sequences
                    chunk.all_units = value.units[0].cpu()
                    chunk.text = text.flush() if text is not None else ""
                    if decoder_state is not None:
                        chunk.audio = decoder.stream(decoder_state, [], final=True).float().cpu()
                    yield chunk
                    return
                if chunk.text or len(chunk.token_ids) or len(chunk.units) or len(chunk.audio):
                    yield chunk
        finally:
            stop.set()  # the consumer left early: end generation at the next step
            thread.join()

    @torch.no_grad()
    def units_to_audio(self, units: list[torch.LongTensor]) -> list[torch.FloatTensor]:
        """Vocode each answer's units offline: list of [n_units] -> list of float32 [n_samples] at 16 kHz."""
        if self.vocoder is None:
            raise ValueError("this checkpoint has no vocoder (config.vocoder_config is None)")
        device = next(self.vocoder.parameters()).device
        result = [torch.zeros(0, dtype=torch.float32, device=device) for _ in units]
        nonempty = [i for i, u in enumerate(units) if len(u)]
        if not nonempty:
            return result
        lengths = torch.tensor([len(units[i]) for i in nonempty], device=device)
        padded = nn.utils.rnn.pad_sequence([units[i].to(device) for i in nonempty], batch_first=True)
        waveform, wave_lengths = self.vocoder(padded, lengths)
        for j, i in enumerate(nonempty):
            result[i] = waveform[j, : int(wave_lengths[j])].float()
        return result


__all__ = [
    "LlamaOmniForConditionalGeneration",
    "LlamaOmniPreTrainedModel",
    "LlamaOmniCausalLMOutput",
    "LlamaOmniGenerateOutput",
    "LlamaOmniUnitStreamState",
    "LlamaOmniStreamChunk",
    "collapse_units",
]
