"""A tiny but real Llama-3-shaped tokenizer for random-weight test checkpoints.

The released model uses Llama-3.1's tokenizer: 128000 byte-level BPE tokens, then 256 special tokens at
ids 128000..128255. Tests need the same *shape* at a size where embeddings are cheap, so
`build_tiny_llama3_tokenizer` trains a byte-level BPE on the small English corpus below (milliseconds) and
lays it out like Llama-3:

- ids 0..255: the 256 bytes, in the GPT-2 byte-to-unicode order Llama-3 uses (`"!"` is id 0), so any text
  round-trips, multi-byte UTF-8 included;
- ids 256..256+num_merges-1: one token per BPE merge, in merge order;
- then the 256 Llama-3 special tokens in Llama-3's order (`LLAMA3_SPECIAL_TOKENS`): with the default 512
  merges `<|begin_of_text|>` is 768, `<|eot_id|>` is 777 and the vocabulary is 1024.

Pre-tokenizer, decoder and post-processor are Llama-3's: the split regex below, then byte-level mapping;
the post-processor adds `<|begin_of_text|>` to every encoded text, which is what gives the original its
double BOS (spec §2). The `<speech>` token is not added here: the processor adds it.

LLaMA-Omni2 (spec llama-omni2 §1.1) uses Qwen2.5's shape: `build_tiny_qwen2_tokenizer` (the LLM's: Qwen2's
one-digit number split, NFC, no BOS, the 22 `QWEN2_SPECIAL_TOKENS`, then `<speech>`, and a Qwen2.5-Instruct
chat template) and `build_tiny_qwen2_tts_tokenizer` (the TTS LM's: the same, then `<sep>` and the speech-unit
tokens `<0>`, `<1>`, ... as non-special added tokens).
"""

from __future__ import annotations

import json

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

# Llama-3's 256 special tokens, in id order (128000..128255 in the released tokenizer).
LLAMA3_SPECIAL_TOKENS: list[str] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(3, 248)),
]

# Llama-3's pre-tokenizer split (tiktoken cl100k style): English contractions, letters with one leading
# non-letter, numbers in runs of at most 3 digits, punctuation runs, newlines, and whitespace that leaves
# its last space to the next word.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# What the BPE merges are learned from. Only its statistics matter; any text still encodes (as bytes).
_CORPUS = """\
How a speech assistant works

A speech assistant listens to what you say and answers you out loud. When you ask a question, the
assistant first turns the sound of your voice into features, then a language model reads those features
and writes an answer, one token at a time. While the answer is being written, a speech decoder turns the
text into discrete units, and a vocoder turns the units into a waveform that you can hear.

Why streaming matters

Latency matters for a spoken conversation. People expect a reply within a fraction of a second, so the
assistant does not wait for the whole answer before it starts to speak. It streams: every few units it
synthesizes a short chunk of audio and plays it, while the model keeps writing the rest of the sentence.
A smaller chunk starts the audio sooner, and a larger chunk usually sounds smoother.

What to ask

You can ask the assistant about the weather, the capital of France, how to make a cup of tea, or a fun
fact about the ocean. It should answer directly, in short and natural sentences, because long lists and
tables are hard to follow when they are read aloud. Numbers like 3, 14, 159, 2024 and 128000 are spoken
as words, and the assistant should say them clearly.

The model was trained on instructions and answers that were written for speech. The user's question is
given as audio, and the assistant's answer is given both as text and as speech. Training happens in two
stages: first the language model learns to answer the spoken question, and then the speech decoder learns
to predict the units of the answer from the hidden states of the language model.

"What is the capital of France?" she asked. "Paris," the assistant said. "It's the largest city in the
country, and it's been the capital for most of the last thousand years." They'd talked for an hour; we're
sure you'll like it too. I'm happy to help with anything else you'd like to know!

Noisy recordings

Recording quality varies a great deal. A microphone in a quiet kitchen gives clean audio, while a phone
held at arm's length on a busy street picks up traffic, wind and other voices. Good assistants cope with
accents, background music, hesitations such as "um" and "uh", and speakers who change their mind halfway
through a request. Each recording is resampled to sixteen kilohertz, padded or trimmed to thirty seconds,
and converted into a log-mel spectrogram with one hundred and twenty-eight frequency bins.

Developers evaluate such systems with several measurements: the word error rate of the transcribed
answer, the naturalness of the synthesized voice judged by listeners, and the delay between the end of
the question and the first audible sound. Privacy is important as well; recordings often contain names,
addresses, phone numbers or medical details, which should be protected, deleted quickly, or processed
entirely on the device whenever possible.

Example requests: set a timer for twelve minutes; translate "good morning" into Spanish; explain why the
sky looks blue; suggest a quick vegetarian recipe with beans, rice, garlic and spinach; summarize today's
news headlines; remind me to call grandma on Sunday evening; how far away is the moon (about 384,400 km)?
"""


def _byte_alphabet() -> list[str]:
    """The 256 byte characters in GPT-2 byte-to-unicode order (Llama-3's ids 0..255)."""
    # Code point order of ByteLevel's characters is exactly that order: printable bytes map to themselves,
    # the other bytes to 256 + n in byte order.
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _learn_merges(num_merges: int, pre_tokenizer: pre_tokenizers.PreTokenizer | None = None) -> list[tuple[str, str]]:
    """Train byte-level BPE on `_CORPUS` (split by `pre_tokenizer`, default Llama-3's) and return its first
    `num_merges` merges, in merge order."""
    pre = _llama3_pre_tokenizer() if pre_tokenizer is None else pre_tokenizer
    scratch = Tokenizer(models.BPE())
    scratch.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(
        vocab_size=256 + num_merges,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    scratch.train_from_iterator([_CORPUS], trainer=trainer)
    merges = [tuple(m) for m in json.loads(scratch.to_str())["model"]["merges"]]
    if len(merges) < num_merges:
        raise ValueError(
            f"num_merges={num_merges} is more than the tiny corpus supports ({len(merges)}); use a smaller num_merges"
        )
    return merges[:num_merges]


def _llama3_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


def build_tiny_llama3_tokenizer(num_merges: int = 512) -> PreTrainedTokenizerFast:
    """Build a Llama-3-shaped byte-level BPE tokenizer with `256 + num_merges` regular tokens.

    The 256 `LLAMA3_SPECIAL_TOKENS` follow the regular tokens, so `<|begin_of_text|>` has id
    `256 + num_merges` (768 by default) and `len(tokenizer) == 512 + num_merges`. Deterministic: the same
    ids on every build. BOS is added to every encoded text, as Llama-3 does.
    """
    if not isinstance(num_merges, int) or num_merges < 0:
        raise ValueError(f"num_merges must be a non-negative int, got {num_merges!r}")
    merges = _learn_merges(num_merges)
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    for left, right in merges:
        vocab[left + right] = len(vocab)  # each merge makes one new token, so ids stay dense

    # Llama-3's tokenizer.json sets ignore_merges: a word that is itself in the vocab is one token.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = _llama3_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    bos = LLAMA3_SPECIAL_TOKENS[0]
    bos_id = tok.token_to_id(bos)
    if bos_id != len(vocab):  # guards the layout every test checkpoint relies on
        raise RuntimeError(f"{bos} got id {bos_id}, expected {len(vocab)}")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )


# ----------------------------------------------------------------------------------------------------------
# Qwen2.5 (LLaMA-Omni2's LLM and TTS LM)
# ----------------------------------------------------------------------------------------------------------

# Qwen2.5's 22 added tokens, in id order (151643..151664 in the released tokenizer). Eight of them are added
# tokens that are NOT special in the released tokenizer (`QWEN2_NON_SPECIAL_TOKENS`): `skip_special_tokens`
# keeps them.
QWEN2_SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
QWEN2_NON_SPECIAL_TOKENS = frozenset(QWEN2_SPECIAL_TOKENS[14:])

# Qwen2's split: Llama-3's, except that numbers are split one digit at a time.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

QWEN2_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's chat format without tools: a system turn first (the default text when the conversation
# has none), then `<|im_start|>role\ncontent<|im_end|>\n` per message. Contents are plain strings, as in the
# stock template (LlamaOmni2Processor turns audio/text item lists into strings). The `generation` block only
# marks the answers for `return_assistant_tokens_mask`; it renders nothing.
QWEN2_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\n" + QWEN2_DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>assistant\\n' }}\n"
    "        {%- generation %}\n"
    "            {{- message.content + '<|im_end|>' }}\n"
    "        {%- endgeneration %}\n"
    "        {{- '\\n' }}\n"
    "    {%- elif message.role == 'user' or (message.role == 'system' and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def _qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def _qwen2_base(num_merges: int, extra: list[AddedToken]) -> Tokenizer:
    """Qwen2-shaped byte-level BPE (`256 + num_merges` regular tokens), then `QWEN2_SPECIAL_TOKENS`, then `extra`."""
    if not isinstance(num_merges, int) or num_merges < 0:
        raise ValueError(f"num_merges must be a non-negative int, got {num_merges!r}")
    merges = _learn_merges(num_merges, _qwen2_pre_tokenizer())
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json
    tok.pre_tokenizer = _qwen2_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # no BOS: Qwen adds none
    tok.add_tokens(
        [AddedToken(t, special=t not in QWEN2_NON_SPECIAL_TOKENS, normalized=False) for t in QWEN2_SPECIAL_TOKENS]
    )
    tok.add_tokens(extra)
    expected = list(range(len(vocab), len(vocab) + len(QWEN2_SPECIAL_TOKENS) + len(extra)))
    names = QWEN2_SPECIAL_TOKENS + [t.content for t in extra]
    if [tok.token_to_id(t) for t in names] != expected:  # guards the layout every test checkpoint relies on
        raise RuntimeError("the Qwen2 added tokens did not get consecutive ids after the regular vocabulary")
    return tok


def build_tiny_qwen2_tokenizer(num_merges: int = 512) -> PreTrainedTokenizerFast:
    """Build LLaMA-Omni2's LLM tokenizer in Qwen2.5's shape, with `256 + num_merges` regular tokens.

    Then the 22 `QWEN2_SPECIAL_TOKENS` (`<|endoftext|>` = `256 + num_merges`, 768 by default; `<|im_end|>`
    = 770) and `<speech>` right after them (790 by default, as 151665 in the released one):
    `len(tokenizer) == 279 + num_merges`. No BOS is added; eos `<|im_end|>`, pad `<|endoftext|>`; the chat
    template is `QWEN2_CHAT_TEMPLATE` (Qwen2.5-Instruct's format, default system text
    `QWEN2_DEFAULT_SYSTEM_PROMPT`). Deterministic.
    """
    tok = _qwen2_base(num_merges, [AddedToken("<speech>", special=True, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in QWEN2_SPECIAL_TOKENS[1:14]] + ["<speech>"],
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        chat_template=QWEN2_CHAT_TEMPLATE,
    )


def build_tiny_qwen2_tts_tokenizer(num_merges: int = 512, unit_vocab_size: int = 6561) -> PreTrainedTokenizerFast:
    """Build LLaMA-Omni2's TTS tokenizer (`tts_tokenizer/`): `build_tiny_qwen2_tokenizer`'s base and specials,
    then `<sep>` where the LLM tokenizer has `<speech>` (790 by default, as 151665 in the released one), then
    `unit_vocab_size` NON-special added tokens `<0>` ... `<unit_vocab_size - 1>`: unit = id - (sep id + 1).
    eos = pad = `<|endoftext|>`. `decode(ids, skip_special_tokens=True)` keeps the unit tokens' text and drops
    the specials, so `re.findall(r"\\d+", text)` recovers the units as the original does (spec §2.5).
    """
    if not isinstance(unit_vocab_size, int) or unit_vocab_size < 1:
        raise ValueError(f"unit_vocab_size must be a positive int, got {unit_vocab_size!r}")
    units = [AddedToken(f"<{i}>", special=False, normalized=False) for i in range(unit_vocab_size)]
    tok = _qwen2_base(num_merges, [AddedToken("<sep>", special=True, normalized=False), *units])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in QWEN2_SPECIAL_TOKENS[1:14]] + ["<sep>"],
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
