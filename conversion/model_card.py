"""The converted repo's README.md (model card): what it is, usage, streaming, licence, citation, provenance."""

from __future__ import annotations

# Written into the card when --repo-id is not given; push_to_hub.py replaces it with the target repo id.
MODEL_ID_PLACEHOLDER = "YOUR-NAMESPACE/Llama-3.1-8B-Omni-hf"

CITATION = """\
@article{fang-etal-2024-llama-omni,
  title={LLaMA-Omni: Seamless Speech Interaction with Large Language Models},
  author={Fang, Qingkai and Guo, Shoutao and Zhou, Yan and Ma, Zhengrui and Zhang, Shaolei and Feng, Yang},
  journal={arXiv preprint arXiv:2409.06666},
  year={2024}
}"""

LICENCE_NOTICE = """\
**Non-commercial use only.** The LLaMA-Omni weights are released by their authors (ICTNLP) for academic
research only and **may NOT be used for commercial purposes**; for commercial licensing contact
`fengyang@ict.ac.cn`. If you use the model in research, cite the paper (below). The language model is
derived from Meta's Llama-3.1-8B-Instruct, so the Llama 3.1 Community License applies as well; the speech
encoder is OpenAI's Whisper-large-v3 (MIT) and the unit vocoder is fairseq's unit HiFi-GAN
(`mhubert_vp_en_es_fr_it3_400k_layer11_km1000_lj`), released under its own terms. This repository only
re-packages those weights; it grants no rights beyond theirs. The conversion code is Apache-2.0."""


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def render_model_card(model_id: str, config, summary: dict) -> str:
    """summary: facts of this conversion (source files, dtype, parameter count, whisper source, notes)."""
    # Imported here, not at the top: push_to_hub.py imports this module for its constants only and should not
    # load torch and transformers for them.
    from transformers import __version__ as converted_with

    from llama_omni_hf.transformers_compat import MIN_TRANSFORMERS_VERSION

    text = config.text_config
    vocoder = "included (speech out)" if config.vocoder_config is not None else "not included (text + units)"
    sources = "\n".join(f"- {name}: `{value}`" for name, value in summary["sources"].items())
    return f"""---
license: other
license_name: llama-omni-research-only
license_link: https://github.com/ictnlp/LLaMA-Omni#license
library_name: transformers
base_model: ICTNLP/Llama-3.1-8B-Omni
language:
- en
tags:
- llama-omni
- speech-to-speech
- spoken-dialogue
- custom_code
---

# LLaMA-Omni for 🤗 transformers

[LLaMA-Omni](https://arxiv.org/abs/2409.06666) (Fang et al., 2024) answers a spoken question with
**streaming text and speech at the same time**. This repository holds the released checkpoint
`ICTNLP/Llama-3.1-8B-Omni`, its Whisper-large-v3 speech encoder and fairseq's unit HiFi-GAN vocoder in one
place, as transformers remote code: one `from_pretrained` gives text, speech units and audio. No fairseq, no
flash-attention, no pinned transformers version, no relative paths.

| part | what | size here |
|---|---|---|
| speech encoder | Whisper-large-v3 encoder (`WhisperEncoder`) | {config.speech_encoder_config.encoder_layers} layers, d={config.speech_encoder_config.d_model} |
| speech adaptor | {config.speech_adaptor_downsample_rate} frames concatenated -> Linear -> ReLU -> Linear | {config.speech_adaptor_hidden_size} hidden |
| LLM | Llama-3.1-8B-Instruct layout (`model.*`, `lm_head`) | {text.num_hidden_layers} layers, d={text.hidden_size} |
| unit decoder | causal Llama layers + CTC over {config.unit_vocab_size} HuBERT units, x{config.unit_decoder_upsample_factor} upsampling | {config.unit_decoder_num_layers} layers, d={config.unit_decoder_hidden_size} |
| vocoder | unit HiFi-GAN with duration predictor, 16 kHz | {vocoder} |

Weights: `{summary["dtype"]}`, {_count(summary["parameters"])} parameters.

## Licence

{LICENCE_NOTICE}

## Usage

Needs `transformers>={MIN_TRANSFORMERS_VERSION}` (any newer release; this repository was converted with
{converted_with}) and `trust_remote_code=True`:

```bash
pip install "transformers>={MIN_TRANSFORMERS_VERSION}" accelerate soundfile torch
```

```python
import soundfile as sf
import torch
from transformers import AutoModel, AutoProcessor

model_id = "{model_id}"
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
model = AutoModel.from_pretrained(model_id, trust_remote_code=True, dtype=torch.float16, device_map="auto")

audio, sampling_rate = sf.read("question.wav", dtype="float32")  # any rate: resampled to 16 kHz
inputs = processor(audio=audio, sampling_rate=sampling_rate, return_tensors="pt").to(model.device)
out = model.generate(**inputs, do_sample=False, max_new_tokens=256, return_dict_in_generate=True)
answer = out.sequences[0, inputs["input_ids"].shape[1]:]
print(processor.tokenizer.decode(answer, skip_special_tokens=True))
sf.write("answer.wav", out.audio[0].cpu().numpy(), 16000)  # out.units[0]: the HuBERT units
```

The released `generation_config.json` keeps Llama-3.1-Instruct's sampling defaults (temperature 0.6,
top_p 0.9); pass `do_sample=False` for greedy answers. Audio longer than 30 s is cut to its first 30 s, as in
the original (Whisper's window); every spoken turn takes 300 LLM positions.

## Streaming text and speech

```python
for chunk in model.generate_stream(**inputs, tokenizer=processor.tokenizer, chunk_size=10, do_sample=False,
                                   max_new_tokens=256):
    print(chunk.text, end="", flush=True)  # new words
    play(chunk.audio)                       # new 16 kHz samples, every `chunk_size` units
```

`chunk_size` is the paper's Omega: smaller starts speaking sooner (226 ms at Omega=10 on an L40 in the
paper), larger calls the vocoder less often. Chunks are vocoded with left context, so unlike the original
they join without seams. A `TextIteratorStreamer` can be passed as `streamer=` too.

## How this repository was made

Converted with `conversion/convert_llama_omni.py` of the llama-omni-hf project from:

{sources}

Every original key was mapped by a table (openai-whisper names -> `WhisperEncoder` names,
`model.speech_projector` -> `speech_adaptor`, `speech_generator` -> `unit_decoder`, vocoder weight norm
folded into plain weights) and every shape checked; nothing was left randomly initialised. Whisper encoder
weights: {summary["whisper_source"]}.

## Citation

```bibtex
{CITATION}
```
"""


# --------------------------------------------------------------------------- LLaMA-Omni2

OMNI2_CITATION = """\
@article{fang-etal-2025-llama-omni2,
  title={LLaMA-Omni2: LLM-based Real-time Spoken Chatbot with Autoregressive Streaming Speech Synthesis},
  author={Fang, Qingkai and Zhou, Yan and Guo, Shoutao and Zhang, Shaolei and Feng, Yang},
  journal={arXiv preprint arXiv:2505.02625},
  year={2025}
}"""

OMNI2_LICENCE_NOTICE = """\
**Non-commercial use only.** The LLaMA-Omni2 weights are released by their authors (ICTNLP) for academic
research only and **may NOT be used for commercial purposes**; for commercial licensing contact
`fengyang@ict.ac.cn`. If you use the model in research, cite the paper (below). The language and TTS models are
derived from Qwen2.5-Instruct (Alibaba Cloud; check the licence of the size you use), the speech encoder is
OpenAI's Whisper-large-v3 (MIT) and the speech decoder is CosyVoice 2's flow-matching model and HiFT vocoder
(FunAudioLLM), released under their own terms. This repository only re-packages those weights; it grants no
rights beyond theirs. The conversion code is Apache-2.0."""


def render_omni2_model_card(model_id: str, config, summary: dict) -> str:
    """The card of a converted LLaMA-Omni2 repo. summary: convert_llama_omni2's facts of this conversion."""
    from transformers import __version__ as converted_with

    from llama_omni_hf.transformers_compat import MIN_TRANSFORMERS_VERSION

    text, tts, enc, t2w = config.text_config, config.tts_config, config.speech_encoder_config, config.token2wav_config
    decoder = summary.get("token2wav")
    if t2w is None:
        decoder_row = "| token-to-wave | not included: this repo stops at speech units | - |"
        audio_usage = "# no token-to-wave decoder in this repo: out.units[0] are CosyVoice2 speech tokens"
    else:
        voices = ", ".join(f'`"{name}"`' for name in t2w.speakers)
        decoder_row = (f"| token-to-wave | CosyVoice2 flow matching + HiFT, 24 kHz, voices {voices} (float32) | "
                       f"{_count(decoder['flow_parameters'] + decoder['hift_parameters'])} |")
        audio_usage = 'sf.write("answer.wav", out.audio[0].float().cpu().numpy(), out.sampling_rate)  # 24 kHz'
    sources = "\n".join(f"- {name}: `{value}`" for name, value in summary["sources"].items())
    facts = [f"Whisper encoder: {summary['whisper_source']}.", f"Generation config: {summary['generation']}, with "
             "the original run script's settings applied (greedy, no temperature/top_p/top_k, 256 new tokens)."]
    if decoder is not None:
        facts.append(f"Flow noise (`token2wav.flow.noise`): {decoder['noise']}.")
        facts += [f"Voice `{name}`: {how}." for name, how in decoder["speakers"].items()]
        facts += [f"cosyvoice.yaml: {line}" for line in decoder["yaml"]]
    facts += [f"Dropped {line}." for line in summary["dropped"]]
    facts += [f"Note: {note}." for note in summary["notes"]]
    facts += [f"**WARNING:** {warning}." for warning in summary["warnings"]]
    fact_lines = "\n".join(f"- {fact}" for fact in facts)
    return f"""---
license: other
license_name: llama-omni2-research-only
license_link: https://github.com/ictnlp/LLaMA-Omni2#license
library_name: transformers
language:
- en
- zh
tags:
- llama-omni2
- speech-to-speech
- spoken-dialogue
- custom_code
---

# LLaMA-Omni2 for 🤗 transformers

[LLaMA-Omni2](https://arxiv.org/abs/2505.02625) (Fang et al., 2025) answers a spoken question with **streaming
text and speech at the same time**: a Qwen2.5 LLM reads the Whisper-encoded question and writes the answer, a
small Qwen2.5 TTS model reads the LLM's states every {config.tts_read} text tokens and writes up to
{config.tts_write} CosyVoice2 speech tokens, and CosyVoice2's decoder turns them into 24 kHz audio. This
repository holds the released checkpoint and its speech decoder in one place, as transformers remote code. No
CosyVoice, Matcha-TTS, onnxruntime or pinned transformers version needed.

| part | what | size here |
|---|---|---|
| speech encoder | Whisper-large-v3 encoder (`WhisperEncoder`) | {enc.encoder_layers} layers, d={enc.d_model} |
| speech adaptor | {config.speech_adaptor_downsample_rate} frames concatenated -> Linear -> ReLU -> Linear | {config.speech_adaptor_hidden_size} hidden |
| LLM | Qwen2.5-Instruct layout (`model.*`, `lm_head`) | {text.num_hidden_layers} layers, d={text.hidden_size} |
| TTS | Qwen2.5 over text + {config.unit_vocab_size} speech tokens, fused LLM states (`tts.*`) | {tts.num_hidden_layers} layers, d={tts.hidden_size} |
{decoder_row}

Weights: `{summary["dtype"]}` (the token-to-wave decoder float32, as the original runs it), {_count(summary["parameters"])} parameters.

## Licence

{OMNI2_LICENCE_NOTICE}

## Usage

Needs `transformers>={MIN_TRANSFORMERS_VERSION}` (converted with {converted_with}) and `trust_remote_code=True`:

```python
import soundfile as sf
import torch
from transformers import AutoModel, AutoProcessor

model_id = "{model_id}"
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
model = AutoModel.from_pretrained(model_id, trust_remote_code=True, dtype=torch.bfloat16, device_map="auto")

audio, sampling_rate = sf.read("question.wav", dtype="float32")  # any rate: resampled to 16 kHz
inputs = processor(audio=audio, sampling_rate=sampling_rate, return_tensors="pt").to(model.device)
out = model.generate(**inputs, return_dict_in_generate=True)  # greedy text, sampled speech (as the original)
answer = out.sequences[0, inputs["input_ids"].shape[1]:]
print(processor.tokenizer.decode(answer, skip_special_tokens=True))
{audio_usage}
```

`generation_config.json` is the release's with the original run script's settings (greedy, 256 new tokens);
its `repetition_penalty`, if any, applies to the answer only, as in the original. The TTS samples at T=1 with
top-k 50 like the original (`tts_do_sample=False` for greedy units, `seed=` for reproducible ones). Audio longer
than 30 s is cut to its first 30 s (Whisper's window); every spoken turn takes
{config.speech_tokens_per_audio} LLM positions and the prompt is cut to its last {config.max_prompt_length}
positions, as in the original.

## Streaming text and speech

```python
for chunk in model.generate_stream(**inputs, tokenizer=processor.tokenizer):
    print(chunk.text, end="", flush=True)  # new words
    play(chunk.audio, chunk.sampling_rate)  # new 24 kHz samples
```

## How this repository was made

Converted with `conversion/convert_llama_omni2.py` of the llama-omni-hf project from:

{sources}

Every original key was mapped by a table (openai-whisper names -> `WhisperEncoder` names,
`model.speech_projector` -> `speech_adaptor`, `speech_generator` -> `tts`, the decoder's weight norm folded)
and every shape checked; nothing was left randomly initialised.

{fact_lines}

## Citation

```bibtex
{OMNI2_CITATION}
```
"""
