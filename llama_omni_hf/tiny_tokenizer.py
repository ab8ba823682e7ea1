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
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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


def _learn_merges(num_merges: int) -> list[tuple[str, str]]:
    """Train byte-level BPE on `_CORPUS` and return its first `num_merges` merges, in merge order."""
    pre = _llama3_pre_tokenizer()
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
