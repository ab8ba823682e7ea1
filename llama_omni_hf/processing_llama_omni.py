"""Processor of LLaMA-Omni: audio -> Whisper log-mel features, conversation -> Llama-3 prompt ids.

Reproduces the original's input pipeline (spec section 2): mono 16 kHz float audio padded or cut to 30 s,
128-bin log-mel, the Llama-3 chat prompt with the original system text, and every `<speech>` slot
expanded to the 300 placeholder ids the model overwrites with adaptor outputs.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

SAMPLING_RATE = 16000
MAX_SECONDS = 30  # Whisper's window; the original silently cuts longer audio
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and speech assistant. You are able to understand the speech content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
DEFAULT_INSTRUCTION = "Please directly answer the questions in the user's speech."
# `__call__`'s tokenizer options that `apply_chat_template(tokenize=True)` passes on (the rest go to the template)
_PADDING_KWARGS = ("padding", "truncation", "max_length", "pad_to_multiple_of", "padding_side", "return_attention_mask")

# Llama-3 chat format. A user turn's content is a string or a list of {"type": "audio"|"text"} items; a turn
# with audio and no text gets the original's instruction. The rendered text starts with <|begin_of_text|>
# and is tokenized WITH the tokenizer's BOS, as the original did: two BOS ids (spec section 2).
CHAT_TEMPLATE = (
    "{%- set default_system = '" + DEFAULT_SYSTEM_PROMPT + "' -%}"
    "{%- set instruction = \"" + DEFAULT_INSTRUCTION + "\" -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\n') -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = default_system -%}{%- endif -%}"
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{{ system }}<|eot_id|>"
    "{%- for message in messages -%}"
    # `{% if` (no `-`): a left-stripping tag would eat the "\n\n" after the header
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- set parts = namespace(items=[], audio=false, text=false) -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'audio' -%}{%- set parts.items = parts.items + ['<speech>'] -%}{%- set parts.audio = true -%}"
    "{%- elif item['type'] == 'text' -%}{%- set parts.items = parts.items + [item['text']] -%}{%- set parts.text = true -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if parts.audio and not parts.text -%}{%- set parts.items = parts.items + [instruction] -%}{%- endif -%}"
    "{{ parts.items | join('\n') }}"
    "{%- endif -%}"
    "<|eot_id|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif -%}"
)


def resample(waveform: torch.Tensor, orig_freq: int, new_freq: int, zeros: int = 16, rolloff: float = 0.945,
             beta: float = 14.769656459379492) -> torch.Tensor:
    """Band-limited (Kaiser-windowed sinc) polyphase resampling of [..., T] float audio."""
    if orig_freq == new_freq:
        return waveform
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    cutoff = min(orig, new) * rolloff  # in units of the reduced rates
    width = math.ceil(zeros * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig  # [K]
    phases = -torch.arange(new, dtype=torch.float64)[:, None] / new  # [new, 1]
    t = ((phases + taps) * cutoff).clamp(-zeros, zeros)  # [new, K] in zero crossings
    window = torch.special.i0(beta * torch.sqrt(1 - (t / zeros) ** 2)) / torch.special.i0(torch.tensor(beta))
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(math.pi * t) / (math.pi * t))
    kernels = (sinc * window * cutoff / orig).to(waveform.dtype)[:, None, :]  # [new, 1, K]
    shape, length = waveform.shape[:-1], waveform.shape[-1]
    x = torch.nn.functional.pad(waveform.reshape(-1, 1, length), (width, width + orig))
    y = torch.nn.functional.conv1d(x, kernels, stride=orig)  # [B, new, frames]
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    return y[:, : math.ceil(new * length / orig)].reshape(*shape, -1)


def _read_audio_file(path) -> tuple[np.ndarray, int]:
    """[channels, samples] float32 and the rate of a wav/flac/ogg file (soundfile is optional here: the Hub copy
    of this file must load without it, so the import is guarded)."""
    try:
        import soundfile
    except ImportError as error:
        raise ValueError(
            f"reading the audio file {path!r} needs the soundfile package (pip install soundfile); "
            "or pass the samples as {'type': 'audio', 'audio': array, 'sampling_rate': rate}"
        ) from error
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # LibsndfileError for missing, empty or non-audio files
        raise ValueError(f"cannot read the audio file {path!r}: {error}") from None
    return samples.T, rate


def _plain(value):
    """Message objects (dataclasses, pydantic models) as dicts, without the keys whose value is None, as
    transformers' `apply_chat_template` takes them; arrays and other values are kept as they are."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items() if item is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain({field.name: getattr(value, field.name) for field in dataclasses.fields(value)})
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return value


def _to_mono_float(audio, index: int) -> np.ndarray:
    """Validate one audio input and return mono float32 [T]."""
    name = f"audio[{index}]"
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu()
        audio = (audio.float() if audio.is_floating_point() else audio).numpy()  # numpy has no bfloat16
    if isinstance(audio, (list, tuple)):
        audio = np.asarray(audio)
    if not isinstance(audio, np.ndarray):
        raise ValueError(
            f"{name} is a {type(audio).__name__}, not audio samples: pass a 1-D float array (or a "
            "[channels, samples] array) and its sampling_rate"
        )
    real = np.issubdtype(audio.dtype, np.floating) or np.issubdtype(audio.dtype, np.integer)
    if not real or audio.dtype == np.bool_:
        raise ValueError(
            f"{name} has dtype {audio.dtype}, not audio samples: pass real float samples in [-1, 1] "
            "(or integer PCM)"
        )
    if np.issubdtype(audio.dtype, np.integer):  # PCM integers -> [-1, 1]
        audio = audio.astype(np.float32) / float(np.iinfo(audio.dtype).max)
    audio = audio.astype(np.float32, copy=False)
    if audio.ndim == 2:  # stereo: channels are the short axis
        audio = audio.mean(axis=0 if audio.shape[0] <= audio.shape[1] else 1)
    if audio.ndim != 1:
        raise ValueError(f"{name} has shape {audio.shape}; expected [samples] or [channels, samples]")
    if audio.size == 0:
        raise ValueError(f"{name} is empty: there is no speech to answer")
    if not np.isfinite(audio).all():
        raise ValueError(f"{name} contains NaN or infinite samples")
    return audio


class LlamaOmniProcessor(ProcessorMixin):
    r"""Whisper feature extractor (128 mels) + Llama-3 tokenizer.

    `processor(audio=wav, sampling_rate=sr, return_tensors="pt")` builds the original's single-turn prompt for
    each audio; `processor.apply_chat_template(conversation, add_generation_prompt=True)` renders a multi-turn
    conversation whose user turns carry `{"type": "audio"}` items. `audio_token` / `audio_token_id` (transformers'
    names) are the `<speech>` placeholder. Audio at any rate is resampled to 16 kHz,
    stereo is averaged, audio over 30 s is cut to its first 30 s (as the original, with a warning).
    """


    def __init__(
        self,
        feature_extractor=None,
        tokenizer=None,
        chat_template=None,
        speech_token="<speech>",
        speech_tokens_per_audio=300,
        double_bos=True,
        **kwargs,
    ):
        self.speech_token = speech_token
        self.speech_tokens_per_audio = speech_tokens_per_audio
        self.double_bos = double_bos
        if tokenizer is not None and speech_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [speech_token]})
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # generation pads on the left so every answer starts at the end
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    @property
    def speech_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.speech_token)

    @property
    def audio_token(self) -> str:  # transformers' audio processors name the placeholder so
        return self.speech_token

    @property
    def audio_token_id(self) -> int:
        return self.speech_token_id

    def _prepare_audio(self, audio, sampling_rate) -> list[np.ndarray]:
        if isinstance(audio, np.ndarray) and audio.ndim == 1 or isinstance(audio, torch.Tensor) and audio.ndim == 1:
            audio = [audio]
        elif isinstance(audio, (np.ndarray, torch.Tensor)) or not isinstance(audio, (list, tuple)):
            audio = [audio]
        elif len(audio) and all(isinstance(a, (int, float)) for a in audio):
            audio = [audio]
        if len(audio) == 0:
            raise ValueError("no audio given")
        if sampling_rate is None:
            raise ValueError(
                f"pass `sampling_rate=` (the rate of your audio): the processor requires it explicitly and does not "
                f"assume {SAMPLING_RATE} Hz; audio at any rate is resampled to {SAMPLING_RATE} Hz"
            )
        # one rate for all, or one per audio (a conversation may mix recordings)
        rates = list(sampling_rate) if isinstance(sampling_rate, (list, tuple)) else [sampling_rate] * len(audio)
        if len(rates) != len(audio):
            raise ValueError(f"got {len(rates)} sampling rates for {len(audio)} audios")
        for rate in rates:
            if (isinstance(rate, bool) or not isinstance(rate, numbers.Real)
                    or rate < 1000 or rate != int(rate)):
                raise ValueError(f"sampling_rate={rate!r} is not a valid audio rate (a whole number of Hz)")
        result = []
        for i, (item, rate) in enumerate(zip(audio, rates)):
            wav = _to_mono_float(item, i)
            if int(rate) != SAMPLING_RATE:
                wav = resample(torch.from_numpy(wav.copy()), int(rate), SAMPLING_RATE).numpy()
            if wav.shape[0] > MAX_SECONDS * SAMPLING_RATE:
                logger.warning(
                    f"audio[{i}] lasts {wav.shape[0] / SAMPLING_RATE:.1f} s; only its first {MAX_SECONDS} s are used "
                    "(Whisper's window, as the original)"
                )
                wav = wav[: MAX_SECONDS * SAMPLING_RATE]
            if np.abs(wav).max() < 1e-4:
                raise ValueError(f"audio[{i}] is silent (peak below 1e-4): there is no speech to answer")
            result.append(wav)
        return result

    def __call__(self, audio=None, text=None, sampling_rate=None, return_tensors=None, padding=None,
                 truncation=None, max_length=None, pad_to_multiple_of=None, padding_side=None,
                 return_attention_mask=None) -> BatchFeature:
        """Returns `input_ids`, `attention_mask` and `input_features` [n_audio, 128, 3000] (lists unless
        `return_tensors="pt"`/"np", as every transformers processor). `sampling_rate`: the rate of every audio, or
        a list with one rate per audio. `padding` (default None: to the longest, on the left), `max_length`,
        `pad_to_multiple_of`, `padding_side`, `return_attention_mask` as in `tokenizer.pad`. Nothing is ever
        truncated: the model needs the whole conversation and every audio's placeholders, so `truncation=True`
        with a prompt over `max_length` (else `tokenizer.model_max_length`) raises a ValueError."""
        audios = [] if audio is None else self._prepare_audio(audio, sampling_rate)
        padding = True if padding is None else padding  # None (transformers' rule for __call__ defaults): longest
        if text is None:
            if not audios:
                raise ValueError("pass `audio=` (and optionally `text=`, e.g. from apply_chat_template)")
            conversation = [{"role": "user", "content": [{"type": "audio"}]}]
            prompt = self.apply_chat_template(conversation, add_generation_prompt=True)
            text = [prompt] * len(audios)
        elif isinstance(text, str):
            text = [text]
        n_slots = sum(t.count(self.speech_token) for t in text)
        if n_slots != len(audios):
            raise ValueError(f"the text has {n_slots} {self.speech_token} slots but {len(audios)} audios were given")
        encoded = self.tokenizer(list(text), add_special_tokens=self.double_bos, padding=False)["input_ids"]
        rows = [self._expand_slots(ids) for ids in encoded]
        truncate = truncation not in (None, False, "do_not_truncate")
        longest, limit = max(map(len, rows), default=0), max_length or self.tokenizer.model_max_length
        if truncate and longest > limit:
            raise ValueError(
                f"a prompt is {longest} tokens ({self.speech_tokens_per_audio} per audio) but truncation to {limit} "
                "was requested: LlamaOmniProcessor never truncates, as a cut prompt loses the question or part of "
                "an audio's placeholders; shorten the conversation or raise max_length"
            )
        padded = self.tokenizer.pad(
            {"input_ids": rows}, padding=padding, pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
            # a max_length that only bounded truncation is not a padding length (the tokenizer would warn)
            max_length=None if truncate and padding != "max_length" else max_length,
            return_attention_mask=return_attention_mask, return_tensors=return_tensors,
        )
        data = dict(padded)
        if audios:
            features = self.feature_extractor(
                audios, sampling_rate=SAMPLING_RATE, padding="max_length", return_tensors=return_tensors
            )
            data["input_features"] = features["input_features"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def apply_chat_template(self, conversation, chat_template=None, add_generation_prompt=False, tokenize=False,
                            return_tensors=None, return_dict=False, processor_kwargs=None,
                            return_assistant_tokens_mask=False, sampling_rate=None, **kwargs):
        """Render a conversation (Llama-3 format) or a list of them, with the defaults of transformers'
        `ProcessorMixin.apply_chat_template`: pass `add_generation_prompt=True` to prompt an answer. Messages are
        dicts, dataclasses or pydantic models. With `tokenize=True` audio items carry their samples
        (`{"type": "audio", "audio": array, "sampling_rate": rate}`) or a local file (`"path"`, or a `"url"`
        naming one) and the `input_ids` of the batch are returned, or with `return_dict=True` all `__call__`'s
        outputs. `processor_kwargs`: `__call__`'s options (its padding options may also come as keyword
        arguments). `return_assistant_tokens_mask=True` (with `return_dict=True`) adds `assistant_masks`: 1 on
        the tokens that the template's `{% generation %}` blocks render. Other keyword arguments go to the
        template."""
        options = {key: kwargs.pop(key) for key in _PADDING_KWARGS if key in kwargs}
        options.update(processor_kwargs or {})
        options.setdefault("return_tensors", return_tensors)
        if return_assistant_tokens_mask and not (tokenize and return_dict):
            raise ValueError("return_assistant_tokens_mask=True needs tokenize=True and return_dict=True")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = [_plain(messages) for messages in (conversation if batched else [conversation])]
        render = dict(chat_template=self.chat_template if chat_template is None else chat_template,
                      add_generation_prompt=add_generation_prompt, **kwargs)
        texts = [self.tokenizer.apply_chat_template(self._template_messages(messages), tokenize=False, **render)
                 for messages in conversations]
        if not tokenize:
            return texts if batched else texts[0]
        audios, rates = self._conversation_audio(conversations, options.pop("sampling_rate", sampling_rate))
        inputs = self(audio=audios or None, text=texts, sampling_rate=rates or None, **options)
        if return_assistant_tokens_mask:
            inputs["assistant_masks"] = self._assistant_masks(conversations, render, inputs["input_ids"],
                                                              options.get("padding_side"))
            inputs = BatchFeature(data=dict(inputs), tensor_type=options["return_tensors"])
        return inputs if return_dict else inputs["input_ids"]

    def _template_messages(self, messages: list[dict]) -> list[dict]:
        """The messages as the chat template gets them (here: unchanged, the template reads item lists)."""
        return messages

    def _expand_slots(self, ids: list[int], values: list | None = None) -> list:
        """Each `<speech>` slot of `ids` becomes the fixed number of positions the adaptor yields. `values`, one
        per id (default: the ids), are what fills the expanded row."""
        speech_id, count = self.speech_token_id, self.speech_tokens_per_audio
        row = []
        for token, value in zip(ids, ids if values is None else values):
            row.extend([value] * count if token == speech_id else [value])
        return row

    def _assistant_masks(self, conversations, render, input_ids, padding_side) -> list[list[int]]:
        """The tokenizer's assistant mask of each rendered conversation, laid over the processor's row: the
        double BOS's extra id and padding get 0, each slot's expansion its slot's value."""
        side = padding_side or self.tokenizer.padding_side
        masks = []
        for messages, row in zip(conversations, input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids):
            reference = self.tokenizer.apply_chat_template(
                self._template_messages(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                **render,
            )
            extra_bos = [self.tokenizer.bos_token_id] if self.double_bos else []
            ids = extra_bos + self._expand_slots(reference["input_ids"])
            mask = [0] * len(extra_bos) + self._expand_slots(reference["input_ids"], reference["assistant_masks"])
            pad = len(row) - len(ids)
            if pad < 0 or (row[pad:] if side == "left" else row[: len(ids)]) != ids:
                raise ValueError("the tokenizer's chat template tokenization differs from the processor's")
            masks.append([0] * pad + mask if side == "left" else mask + [0] * pad)
        return masks

    @staticmethod
    def _conversation_audio(conversations, sampling_rate) -> tuple[list, list]:
        """The samples and rate of every audio item, in order, across all conversations."""
        audios, rates = [], []
        for message in (message for messages in conversations for message in messages):
            for item in message.get("content") if isinstance(message.get("content"), list) else []:
                if item.get("type") == "text":
                    continue
                if item.get("type") != "audio":
                    raise ValueError(f"{item.get('type')!r} items are not supported: LLaMA-Omni takes audio and text "
                                     "items only")
                if "audio" in item:
                    rate = item.get("sampling_rate", sampling_rate)
                    if rate is None:
                        raise ValueError(
                            f"audio item {len(audios)} has samples but no rate: add 'sampling_rate' to the item "
                            f"or pass sampling_rate= (the processor requires it; it does not assume {SAMPLING_RATE} Hz)"
                        )
                    audios.append(item["audio"])
                    rates.append(rate)
                elif "path" in item or "url" in item:
                    location = str(item.get("path", item.get("url")))
                    if "://" in location and not location.startswith("file://"):
                        raise ValueError(f"the audio URL {location!r} is not downloaded by the processor: pass a local "
                                         "file as 'path' (or its samples as 'audio')")
                    samples, rate = _read_audio_file(location.removeprefix("file://"))
                    audios.append(samples)
                    rates.append(rate)
                else:
                    raise ValueError("an audio item needs its samples ('audio') or a file ('path') to tokenize")
        return audios, rates

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "input_features"]


__all__ = ["LlamaOmniProcessor", "resample", "CHAT_TEMPLATE", "DEFAULT_SYSTEM_PROMPT", "DEFAULT_INSTRUCTION"]
