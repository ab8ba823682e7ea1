"""LLaMA-Omni2 (arXiv 2505.02625) as transformers remote code.

Glossary (paper term -> attribute -> original checkpoint key):
    speech encoder -> `speech_encoder` (transformers WhisperEncoder) -> `model.speech_encoder.*` (openai-whisper)
    speech adaptor -> `speech_adaptor` (LLaMA-Omni's)                 -> `model.speech_projector.*`
    LLM            -> `model` + `lm_head` (Qwen2 names kept)          -> `model.*`, `lm_head`
    TTS LM         -> `tts` (Qwen2 + head, `input_proj`, `gate`)      -> `speech_generator.*`
    token-to-wave  -> `token2wav` (CosyVoice2 flow + HiFT, optional)  -> cosy2_decoder `flow.pt`, `hift.pt`

Data flow: 16 kHz audio -> 128x3000 log-mel -> encoder [B,1500,1280] -> adaptor [B,300,H] over the `<speech>`
placeholders -> Qwen2.5 -> text. Every R=3 text tokens the TTS reads, for each token y, the fusion
`r*g + e*(1-g)` of r = input_proj(the final-norm state that PREDICTED y) and e = its own embedding of y, and
writes up to W=10 speech tokens; after the last text token it reads `<sep>` and flushes up to 1024 more. Speech
tokens - 151666 are CosyVoice2 units -> flow (mel, 50 Hz) -> HiFT -> 24 kHz speech (spec section 2.4).

Unlike the original, which re-runs the TTS over its whole context at every write, the TTS keeps a KV cache and
continues its positions: the same distribution at a constant cost per write (`tts_reprefill=True` restores the
original's re-prefill, for parity checks).
"""

import queue
import re
import threading
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .transformers_compat import CACHE_FIELD, cache_kwargs, output_cache, resolve_cache  # first: checks the release

from transformers import DynamicCache, GenerationMixin, PreTrainedModel, Qwen2Model  # noqa: E402
from transformers import initialization as init  # noqa: E402
from transformers.cache_utils import Cache  # noqa: E402
from transformers.generation.stopping_criteria import StoppingCriteriaList  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402
from transformers.models.whisper.modeling_whisper import WhisperEncoder, sinusoids  # noqa: E402
from transformers.processing_utils import Unpack  # noqa: E402
from transformers.utils import TransformersKwargs  # noqa: E402

from .configuration_llama_omni2 import LlamaOmni2Config  # noqa: E402
from .modeling_llama_omni import (  # noqa: E402
    LlamaOmniForConditionalGeneration,
    LlamaOmniGenerateOutput,
    LlamaOmniSpeechAdaptor,
    _QueueStreamer,
    _StopEvent,
)

_TTS_OPTIONS = ("read_write", "tts_do_sample", "tts_generator", "seed", "tts_reprefill", "unit_parse", "tts_tokenizer")


@dataclass
class LlamaOmni2GenerateOutput(LlamaOmniGenerateOutput):
    """`generate(..., return_dict_in_generate=True)`: `sequences` (prompt + answer), and per batch item `units`
    (LongTensor [n], CosyVoice2 units 0..6560), `audio` (float32 [960 n] at `sampling_rate` 24000, when
    `return_audio`) and `tts_token_ids` (every id the TTS emitted, EOS included, before unit parsing)."""

    tts_token_ids: list[torch.LongTensor] | None = None


@dataclass
class _TTSRow:
    """The TTS of one answer: its cache (or, with re-prefill, its whole context) and the pairs not yet read."""

    cache: Cache | None = None
    context: torch.Tensor | None = None  # [L, D] inputs so far (re-prefill mode only)
    states: list = field(default_factory=list)  # final-norm LLM states [H] that predicted `tokens`
    tokens: list = field(default_factory=list)  # text ids not yet read
    last_tts_token: int | None = None  # emitted by the last write, not yet fed back
    count: int = 0  # text tokens seen (the original's `cur`)
    tts_token_ids: list = field(default_factory=list)
    write_ends: list = field(default_factory=list)  # len(tts_token_ids) after each write
    units: list = field(default_factory=list)
    finished: bool = False


@dataclass
class LlamaOmni2TTSState:
    """The read/write loop of one `generate` call, owned by the caller; modules hold weights only.

    Each LLM step hands over the state that predicts the next token; when that token arrives it is paired with
    it (the original's `hs[i][-1]`/`input_ids` pairing). Every `read` tokens, and once when a row's text ends
    (EOS, which the TTS also reads, or any other stop), the TTS writes (spec 2.4).
    """

    rows: list
    eos_token_ids: set
    read: int = 3
    write: int = 10
    final_max_new_tokens: int = 1024
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    generator: torch.Generator | None = None
    reprefill: bool = False
    unit_parse: str = "offset"
    tts_tokenizer: object = None
    step: int = 0
    last_states: torch.Tensor | None = None  # [B, H] the states that predict the tokens fed next
    on_step: object = None  # optional callback(new_units: list[list[int]], state) after each write
    cancel: threading.Event | None = None  # set: generation was abandoned, no final flush

    @property
    def units(self) -> list[list[int]]:
        return [row.units for row in self.rows]


def sample_tts_token(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int = 50,
                     top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next TTS id from fp32 logits [V] as transformers 4.43's `_sample` drew it for the original: temperature,
    then top-k, then top-p (min one token kept), softmax, one `multinomial` draw; greedy = argmax."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        remove = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return torch.multinomial(scores.softmax(-1), num_samples=1, generator=generator)[..., 0]


class LlamaOmni2TextToUnit(nn.Module):
    """The TTS language model (the original's `LLMSpeechGenerator`): a Qwen2 over fused text inputs and its own
    speech tokens, `input_proj` (H -> 2H -> D) and the fusion `gate` (spec 1.4)."""

    def __init__(self, config: LlamaOmni2Config):
        super().__init__()
        tts, hidden = config.tts_config, config.text_config.hidden_size
        self.model = Qwen2Model(tts)
        self.lm_head = nn.Linear(tts.hidden_size, tts.vocab_size, bias=False)
        self.input_proj = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, tts.hidden_size))
        self.gate = nn.Linear(2 * tts.hidden_size, tts.hidden_size)

    def fuse(self, states: torch.Tensor, token_ids: torch.LongTensor) -> torch.Tensor:
        """r*g + e*(1-g) with r = input_proj(states), e = the TTS embedding of the text ids, g = sigmoid(gate([r;e]))."""
        r = self.input_proj(states.to(self.gate.weight.dtype))
        e = self.model.embed_tokens(token_ids)
        g = torch.sigmoid(self.gate(torch.cat([r, e], dim=-1)))
        return r * g + e * (1 - g)

    def embed(self, token_ids) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.lm_head.weight.device).reshape(-1)
        return self.model.embed_tokens(ids)


class LlamaOmni2PreTrainedModel(PreTrainedModel):
    config_class = LlamaOmni2Config
    config: LlamaOmni2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "WhisperEncoderLayer", "LlamaOmni2Token2Wav"]
    _skip_keys_device_placement = ["past_key_values", "cache"]  # the cache's name before / from 5.24
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # original: flow_inference.py runs the flow (fp16 off) and HiFT in fp32 whatever the LLM's dtype
    _keep_in_fp32_modules_strict = ["token2wav"]

    @torch.no_grad()
    def initialize_weights(self):
        # Whisper's positions are fixed sinusoids (see LlamaOmniPreTrainedModel); the token-to-wave's buffers
        # (flow noise, voices) are filled by its own initializer. Both leave loaded tensors alone.
        super().initialize_weights()
        positions = self.speech_encoder.embed_positions.weight
        init.copy_(positions, sinusoids(*positions.shape).to(positions))
        if getattr(self, "token2wav", None) is not None:
            self.token2wav.initialize_weights()

    @classmethod
    def from_pretrained(cls, *args, allow_missing_weights: bool = False, **kwargs):
        """transformers' `from_pretrained`, but a checkpoint that lacks weights is an error (a half-random model
        answers noise without a hint why); `allow_missing_weights=True` restores the default."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys", ()))
        mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
        if (missing or mismatched) and not allow_missing_weights:
            shown = ", ".join(missing[:8] + mismatched[:8])
            raise ValueError(
                f"the checkpoint lacks {len(missing)} weights and has {len(mismatched)} of the wrong shape for "
                f"{cls.__name__}: {shown}. Is it a converted LLaMA-Omni2 repo? (convert the original release with "
                "conversion/convert_llama_omni2.py; allow_missing_weights=True loads anyway with random weights)"
            )
        return (model, info) if want_info else model


class LlamaOmni2ForConditionalGeneration(LlamaOmni2PreTrainedModel, GenerationMixin):
    """Speech in, text + speech units (+ 24 kHz audio with a token-to-wave decoder) out. The same API as
    `LlamaOmniForConditionalGeneration`: `generate`, `generate_stream`, `units_to_audio`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaOmni2Config):
        super().__init__(config)
        self.speech_encoder = WhisperEncoder(config.speech_encoder_config)
        self.speech_adaptor = LlamaOmniSpeechAdaptor(config)
        self.model = Qwen2Model(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.tts = LlamaOmni2TextToUnit(config)
        self.token2wav = None
        if config.token2wav_config is not None:
            from .token2wav_llama_omni2 import LlamaOmni2Token2Wav

            self.token2wav = LlamaOmni2Token2Wav(config.token2wav_config)
        else:
            self._keep_in_fp32_modules_strict = []
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @property
    def sampling_rate(self) -> int | None:
        return None if self.token2wav is None else self.token2wav.config.sampling_rate

    # the speech input is LLaMA-Omni's: the same encoder, adaptor and splicing over `<speech>`
    get_speech_features = LlamaOmniForConditionalGeneration.get_speech_features
    _embed_with_speech = LlamaOmniForConditionalGeneration._embed_with_speech
    _placeholders_in_embeds = LlamaOmniForConditionalGeneration._placeholders_in_embeds
    _check_decoding_mode = staticmethod(LlamaOmniForConditionalGeneration._check_decoding_mode)
    _stream_chunks = LlamaOmniForConditionalGeneration._stream_chunks

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        tts_stream: LlamaOmni2TTSState | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        input_features: [n_audio, 128, 3000] log-mel from the processor, one per `<speech>` slot.
        labels: [B, L] text targets (-100 = ignore), unshifted as in transformers.
        tts_stream: used by `generate` to run the TTS step by step; leave None.
        """
        past_key_values = resolve_cache(cache, past_key_values)
        loss_kwargs = {key: kwargs.pop(key) for key in ("num_items_in_batch", "shift_labels") if key in kwargs}
        return_dict = kwargs.pop("return_dict", None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        inputs_embeds = self._embed_with_speech(input_ids, input_features, inputs_embeds)
        outputs = self.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, **cache_kwargs(past_key_values), **kwargs,
        )
        hidden = outputs.last_hidden_state  # after the final RMSNorm: what lm_head and the TTS read (Q2)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=logits.shape[-1], **loss_kwargs)
        if tts_stream is not None:
            self._tts_stream_step(tts_stream, input_ids, hidden[:, -1])
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None), **{CACHE_FIELD: output_cache(outputs)},
        )
        return output if return_dict else output.to_tuple()

    # --- the TTS read/write loop ---
    def init_tts_stream(self, batch_size: int, eos_token_id, on_step=None, read_write=None, tts_do_sample=None,
                        tts_generator=None, seed=None, tts_reprefill: bool = False, unit_parse=None,
                        tts_tokenizer=None, cancel=None) -> LlamaOmni2TTSState:
        """The state `generate` steps; defaults from the config (R=3, W=10, sampling at T=1 with top-k 50)."""
        cfg = self.config
        read, write = cfg.read_write if read_write is None else read_write
        for name, value in (("read", read), ("write", write)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`read_write` must be two positive integers (R, W), got {read_write!r}")
        unit_parse = cfg.unit_parse if unit_parse is None else unit_parse
        if unit_parse not in ("offset", "regex"):
            raise ValueError(f"`unit_parse` must be 'offset' or 'regex', got {unit_parse!r}")
        if unit_parse == "regex" and tts_tokenizer is None:
            tts_tokenizer = self._load_tts_tokenizer()
        if tts_generator is not None and seed is not None:
            raise ValueError("pass `tts_generator` or `seed`, not both")
        if seed is not None:
            tts_generator = torch.Generator(device=self.tts.lm_head.weight.device).manual_seed(int(seed))
        eos = [] if eos_token_id is None else eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos)
        return LlamaOmni2TTSState(
            rows=[_TTSRow() for _ in range(batch_size)], eos_token_ids=eos, read=read, write=write,
            final_max_new_tokens=cfg.tts_final_max_new_tokens,
            do_sample=cfg.tts_do_sample if tts_do_sample is None else bool(tts_do_sample),
            temperature=cfg.tts_temperature, top_k=cfg.tts_top_k, top_p=cfg.tts_top_p, generator=tts_generator,
            reprefill=bool(tts_reprefill), unit_parse=unit_parse, tts_tokenizer=tts_tokenizer, on_step=on_step,
            cancel=cancel,
        )

    def _load_tts_tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.name_or_path, subfolder="tts_tokenizer")
        except Exception as error:  # noqa: BLE001  (any loading failure means the same thing to the user)
            raise ValueError(
                "unit_parse='regex' decodes the TTS ids with the release's TTS tokenizer, which was not found in "
                f"{self.name_or_path!r}/tts_tokenizer; pass `tts_tokenizer=` or use unit_parse='offset'"
            ) from error

    def _tts_stream_step(self, state: LlamaOmni2TTSState, input_ids, last_states: torch.Tensor):
        """One LLM step: pair the token fed now with the state that predicted it, write every R tokens."""
        if state.step > 0 and input_ids is not None:
            for index, row in enumerate(state.rows):
                if not row.finished:
                    token = int(input_ids[index, -1])
                    self._tts_read(state, index, state.last_states[index], token, token in state.eos_token_ids)
        state.step += 1
        state.last_states = last_states

    def _tts_read(self, state: LlamaOmni2TTSState, index: int, hidden: torch.Tensor, token: int, final: bool):
        row = state.rows[index]
        row.states.append(hidden)
        row.tokens.append(token)
        row.count += 1
        if row.count % state.read == 0 or final:
            self._tts_write(state, index, final)

    def finish_tts_stream(self, state: LlamaOmni2TTSState, answers: torch.LongTensor):
        """After generation: each row that has not read its EOS reads its last token (never fed to the LLM) and
        the final `<sep>` write; `answers` [B, T] are the generated ids (padding after an EOS)."""
        if state.cancel is not None and state.cancel.is_set() or state.last_states is None:
            return
        for index, row in enumerate(state.rows):
            if not row.finished and answers.shape[1]:
                self._tts_read(state, index, state.last_states[index], int(answers[index, -1]), True)

    @torch.no_grad()
    def _tts_write(self, state: LlamaOmni2TTSState, index: int, final: bool):
        """Read the pending (state, token) pairs (and `<sep>` at the end), then write up to W speech tokens
        (up to 1024 at the end), stopping at the TTS's EOS, which stays in the context (spec 2.4)."""
        tts, row, cfg = self.tts, state.rows[index], self.config
        fused = tts.fuse(torch.stack(row.states), torch.tensor(row.tokens, device=tts.lm_head.weight.device))
        parts = [] if row.last_tts_token is None else [tts.embed(row.last_tts_token)]
        parts.append(fused)
        if final:
            parts.append(tts.embed(cfg.tts_sep_token_id))
            row.finished = True
        row.states, row.tokens, row.last_tts_token = [], [], None
        inputs = torch.cat(parts)
        if state.reprefill:  # the original: a fresh pass over the whole context at every write
            row.context = inputs if row.context is None else torch.cat([row.context, inputs])
            inputs, row.cache = row.context, DynamicCache()
        elif row.cache is None:
            row.cache = DynamicCache()
        limit = state.final_max_new_tokens if final else state.write
        written, emitted = [], 0
        for _ in range(limit):
            out = tts.model(inputs_embeds=inputs[None], use_cache=True, **cache_kwargs(row.cache))
            row.cache = output_cache(out)
            logits = tts.lm_head(out.last_hidden_state[0, -1]).float()
            token = int(sample_tts_token(logits, state.do_sample, state.temperature, state.top_k, state.top_p,
                                         state.generator))
            written.append(token)
            if state.reprefill:
                row.context = torch.cat([row.context, tts.embed(token)])
            if token == cfg.tts_eos_token_id:
                break
            if final and len(written) - emitted == state.write:  # the long final flush streams W at a time
                self._emit(state, index, written[emitted:])
                emitted = len(written)
            inputs = tts.embed(token)
        if not state.reprefill:
            row.last_tts_token = written[-1]  # fed back at the next write, as the original's context holds it
        self._emit(state, index, written[emitted:])
        row.write_ends.append(len(row.tts_token_ids))

    def _emit(self, state: LlamaOmni2TTSState, index: int, tts_ids: list[int]):
        if not tts_ids:
            return
        row = state.rows[index]
        row.tts_token_ids.extend(tts_ids)
        units = self.tts_ids_to_units(tts_ids, state.unit_parse, state.tts_tokenizer)
        row.units.extend(units)
        if state.on_step is not None:
            new = [[] for _ in state.rows]
            new[index] = units
            state.on_step(new, state)

    def tts_ids_to_units(self, tts_ids: list[int], unit_parse: str = "offset", tts_tokenizer=None) -> list[int]:
        """TTS ids -> CosyVoice2 units: `id - 151666` for unit ids (others dropped), or (`"regex"`, the original's
        way, Q3) the numbers in the TTS tokenizer's decoded text, so a sampled text token "97" becomes unit 97."""
        cfg = self.config
        if unit_parse == "offset":
            return [t - cfg.unit_token_offset for t in tts_ids
                    if cfg.unit_token_offset <= t < cfg.unit_token_offset + cfg.unit_vocab_size]
        return self._numbers_to_units(tts_tokenizer.decode(tts_ids, skip_special_tokens=True))

    def _offline_units(self, state: LlamaOmni2TTSState, row: _TTSRow) -> list[int]:
        """A row's units as the original returns them offline: with the regex, it joins every write's decoded
        text and parses the whole string once (Q15), so digit text tokens on both sides of a write boundary make
        one number, where the per-write stream sees two."""
        if state.unit_parse != "regex":
            return row.units
        bounds = zip([0] + row.write_ends[:-1], row.write_ends)
        return self._numbers_to_units("".join(
            state.tts_tokenizer.decode(row.tts_token_ids[a:b], skip_special_tokens=True) for a, b in bounds))

    def _numbers_to_units(self, text: str) -> list[int]:
        cfg = self.config
        numbers = [int(n) for n in re.findall(r"\d+", text)]
        invalid = [n for n in numbers if n >= cfg.unit_vocab_size]
        if invalid:  # the original would index past the flow's embedding and crash
            warnings.warn(f"unit_parse='regex' read numbers beyond the {cfg.unit_vocab_size} units from sampled text "
                          f"tokens ({invalid[:5]}); they are dropped", stacklevel=3)
        return [n for n in numbers if n < cfg.unit_vocab_size]

    # --- generation ---
    @torch.no_grad()
    def generate(self, input_ids=None, input_features=None, attention_mask=None, return_audio=None,
                 return_units: bool = True, tts_stream: LlamaOmni2TTSState | None = None, speaker=None,
                 hift_generator: torch.Generator | None = None, nsf_noise: bool = True, **kwargs):
        """transformers' `generate` (greedy or sampling, any of its arguments, `streamer=`) with the TTS run
        step by step. With `return_dict_in_generate=True` returns a [`LlamaOmni2GenerateOutput`]: `.sequences`
        (prompt + answer), `.units`, `.tts_token_ids` and, when `return_audio` (default: True if the checkpoint
        has a token-to-wave decoder), `.audio` at `.sampling_rate` (24 kHz).

        LLaMA-Omni2's own keywords: `read_write=(3, 10)`; `tts_do_sample` (False: greedy TTS); `tts_generator` or
        `seed` (seeded TTS sampling; `seed` also seeds HiFT unless `hift_generator` is given); `tts_reprefill`
        (the original's full re-prefill per write); `unit_parse` ("offset" or "regex") and `tts_tokenizer`;
        `speaker` ("en", "zh" or an x-vector [192]); `hift_generator` and `nsf_noise` (HiFT's draws).
        `return_units=False` runs the LLM alone. The prompt (with its audio) is cut to its last
        `config.max_prompt_length` positions, as the original (Q9), and only answer tokens count for a
        `repetition_penalty` (the original generates from embeddings, Q13).
        """
        options = {key: kwargs.pop(key) for key in _TTS_OPTIONS if key in kwargs}
        generation_config = kwargs.get("generation_config") or self.generation_config
        self._check_decoding_mode(generation_config, kwargs)
        if return_audio and self.token2wav is None:
            raise ValueError("this checkpoint has no token-to-wave decoder (config.token2wav_config is None), so it "
                             "cannot return audio; use return_audio=False to get text and units")
        if return_audio and not return_units:
            raise ValueError("return_audio=True needs the units: do not pass return_units=False")
        if return_audio and not kwargs.get("return_dict_in_generate", generation_config.return_dict_in_generate):
            raise ValueError("return_audio=True needs return_dict_in_generate=True: a tensor of ids has no room "
                             "for the audio")
        if tts_stream is not None and options:
            raise ValueError(f"{sorted(options)} configure the TTS state; pass them to init_tts_stream instead")
        if options.get("seed") is not None and hift_generator is None and self.token2wav is not None:
            hift_generator = torch.Generator(device=self.token2wav.flow.noise.device).manual_seed(int(options["seed"]))
        if "inputs_embeds" in kwargs:
            embeds = self._embed_with_speech(None, input_features, kwargs.pop("inputs_embeds"))
        elif input_ids is not None:
            embeds = self._embed_with_speech(input_ids, input_features)
        else:
            raise ValueError("pass `input_ids` (and `input_features`) from the LlamaOmni2Processor")
        embeds, attention_mask = self._truncate_prompt(embeds, attention_mask)
        if return_units and tts_stream is None:
            copies = kwargs.get("num_return_sequences") or generation_config.num_return_sequences or 1
            eos = kwargs.get("eos_token_id", generation_config.eos_token_id)
            tts_stream = self.init_tts_stream(embeds.shape[0] * copies, eos, **options)
        output = super().generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                  tts_stream=tts_stream if return_units else None, **kwargs)
        answers = output if isinstance(output, torch.Tensor) else output.sequences
        if return_units:
            self.finish_tts_stream(tts_stream, answers)
        if input_ids is not None:  # the prompt as the caller gave it, then the answer (as LLaMA-Omni returns)
            prompt = input_ids.to(answers.device).repeat_interleave(answers.shape[0] // input_ids.shape[0], dim=0)
            answers = torch.cat([prompt, answers], dim=1)
        if isinstance(output, torch.Tensor):
            return answers
        fields = {**dict(output.items()), "sequences": answers}
        if not return_units:
            return LlamaOmni2GenerateOutput(**fields)
        device = answers.device
        units = [torch.tensor(self._offline_units(tts_stream, row), dtype=torch.long, device=device)
                 for row in tts_stream.rows]
        tts_ids = [torch.tensor(row.tts_token_ids, dtype=torch.long, device=device) for row in tts_stream.rows]
        if return_audio is None:
            return_audio = self.token2wav is not None
        audio = self.units_to_audio(units, speaker, hift_generator, nsf_noise) if return_audio else None
        return LlamaOmni2GenerateOutput(**fields, units=units, tts_token_ids=tts_ids, audio=audio,
                                        sampling_rate=self.sampling_rate if return_audio else None)

    def _truncate_prompt(self, embeds, attention_mask):
        """The original cuts the spliced prompt to its last `tokenizer_model_max_length` positions (Q9): a long
        chat loses its beginning (and, past ~13 turns, the original even loses the generation prompt's start)."""
        limit = self.config.max_prompt_length
        if embeds.shape[1] <= limit:
            return embeds, attention_mask
        warnings.warn(f"the prompt has {embeds.shape[1]} positions ({self.config.speech_tokens_per_audio} per audio); "
                      f"only its last {limit} are used, as the original (max_prompt_length)", stacklevel=3)
        return embeds[:, -limit:], None if attention_mask is None else attention_mask[:, -limit:]

    def generate_stream(self, input_ids=None, input_features=None, attention_mask=None, tokenizer=None,
                        speaker=None, token2wav_mode: str = "incremental", hift_generator=None,
                        nsf_noise: bool = True, streamer=None, **kwargs):
        """Generate one answer and yield `LlamaOmniStreamChunk`s (`.text`, `.token_ids`, `.units`, `.audio` at
        `.sampling_rate` 24000, `is_final`) as soon as they exist. The same arguments as `generate`;
        `token2wav_mode` "incremental" (cached flow, constant cost per chunk) or "original" (the original's
        full re-run per chunk). Audio starts once the first write has brought 7 units (the flow's 3-token
        look-ahead and HiFT's 8-frame cache). Closing the iterator stops generation."""
        if input_ids is None or input_ids.shape[0] != 1:
            raise ValueError("generate_stream takes one conversation (batch size 1); use generate() for batches")
        if (kwargs.get("num_return_sequences") or 1) != 1 or (kwargs.get("num_beams") or 1) != 1:
            raise ValueError("generate_stream yields one answer: num_return_sequences and num_beams must be 1")
        options = {key: kwargs.pop(key) for key in _TTS_OPTIONS if key in kwargs}
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        generation_config = kwargs.get("generation_config") or self.generation_config
        state = self.init_tts_stream(1, kwargs.get("eos_token_id", generation_config.eos_token_id),
                                     on_step=lambda new, _: new[0] and events.put(("units", list(new[0]))),
                                     cancel=stop, **options)
        if options.get("seed") is not None and hift_generator is None and self.token2wav is not None:
            hift_generator = torch.Generator(device=self.token2wav.flow.noise.device).manual_seed(int(options["seed"]))
        stopping = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        stopping.append(_StopEvent(stop))

        def run():
            try:
                output = self.generate(
                    input_ids=input_ids, input_features=input_features, attention_mask=attention_mask,
                    tts_stream=state, streamer=_QueueStreamer(events, streamer), stopping_criteria=stopping,
                    return_audio=False, return_dict_in_generate=True, **kwargs,
                )
                events.put(("done", output))
            except BaseException as error:  # surfaced in the consumer's thread
                events.put(("error", error))

        decoder_state = None
        if self.token2wav is not None:
            decoder_state = self.token2wav.init_stream(speaker, mode=token2wav_mode, generator=hift_generator,
                                                       nsf_noise=nsf_noise)
        thread = threading.Thread(target=run, name="llama-omni2-generate", daemon=True)
        return self._stream_chunks(events, stop, thread, self.token2wav, decoder_state, tokenizer)

    @torch.no_grad()
    def units_to_audio(self, units: list[torch.LongTensor], speaker=None, generator: torch.Generator | None = None,
                       nsf_noise: bool = True) -> list[torch.FloatTensor]:
        """Each answer's units offline: list of [n] -> list of float32 [960 n] at 24 kHz (empty for no units)."""
        if self.token2wav is None:
            raise ValueError("this checkpoint has no token-to-wave decoder (config.token2wav_config is None)")
        device = self.token2wav.flow.noise.device
        return [self.token2wav.token2wav(u, speaker, generator=generator, nsf_noise=nsf_noise) if len(u)
                else torch.zeros(0, dtype=torch.float32, device=device) for u in units]


__all__ = [
    "LlamaOmni2ForConditionalGeneration",
    "LlamaOmni2PreTrainedModel",
    "LlamaOmni2TextToUnit",
    "LlamaOmni2TTSState",
    "LlamaOmni2GenerateOutput",
    "sample_tts_token",
]
