"""The tiny Llama-3-shaped tokenizer: byte-level round-trips, Llama-3's special-token layout, BOS, save/reload."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llama_omni_hf.tiny_tokenizer import LLAMA3_SPECIAL_TOKENS, build_tiny_llama3_tokenizer

SYSTEM = (
    "You are a helpful language and speech assistant. You are able to understand the speech content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
# The rendered prompt of spec §2.
PROMPT = (
    f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n<speech>\nPlease directly answer the questions in the user's "
    "speech.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)
TEXTS = [
    "",
    "a",
    "What is the capital of France?",
    "héllo 日本 🙂 naïve café — “quotes” ½",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "numbers 1234567 3.14159 -42 0x1F",
    "they're we've I'm you'll she'd IT'S",
    "\x00\x01\x7f control bytes \ufeff",
    "Ünïcödé ελληνικά русский العربية हिन्दी 한국어",
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_llama3_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_any_text_round_trips(tok, text):
    ids = tok(text).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == "<|begin_of_text|>" + text
    assert all(0 <= i < 768 for i in ids[1:])  # only regular tokens, never an unknown


def test_byte_alphabet_is_llama3s():
    tok = build_tiny_llama3_tokenizer(num_merges=0)
    assert len(tok) == 256 + 256
    # Llama-3's byte order: "!" is id 0, byte 0x00 ("Ā") is 188, space ("Ġ") is 220, newline ("Ċ") is 198.
    assert tok.convert_tokens_to_ids(["!", "Ā", "Ġ", "Ċ"]) == [0, 188, 220, 198]
    assert tok("日本", add_special_tokens=False).input_ids == [162, 245, 98, 162, 250, 105]  # 6 UTF-8 bytes


def test_special_tokens_follow_regular_vocab_in_llama3_order(tok):
    assert len(LLAMA3_SPECIAL_TOKENS) == 256 == len(set(LLAMA3_SPECIAL_TOKENS))
    assert LLAMA3_SPECIAL_TOKENS[:11] == [
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
    ]
    assert LLAMA3_SPECIAL_TOKENS[11] == "<|reserved_special_token_3|>"
    assert LLAMA3_SPECIAL_TOKENS[-1] == "<|reserved_special_token_247|>"
    assert tok.convert_tokens_to_ids(LLAMA3_SPECIAL_TOKENS) == list(range(768, 1024))
    assert len(tok) == 1024
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (768, 777, 772)
    assert tok.model_max_length == 131072


def test_num_merges_sets_the_layout():
    tok = build_tiny_llama3_tokenizer(num_merges=100)
    assert len(tok) == 612 and tok.bos_token_id == 356 and tok.convert_tokens_to_ids("<|eot_id|>") == 365


@pytest.mark.parametrize("bad", [-1, 10**6, 2.5])
def test_bad_num_merges(bad):
    with pytest.raises(ValueError, match="num_merges"):
        build_tiny_llama3_tokenizer(num_merges=bad)


def test_bos_is_added_so_the_rendered_prompt_starts_with_two(tok):
    assert tok("hi").input_ids[0] == 768
    assert tok("hi", add_special_tokens=False).input_ids[0] != 768
    ids = tok(PROMPT).input_ids
    assert ids[:3] == [768, 768, 774]  # the original's double BOS (spec §2)


def test_chat_markup_stays_single_ids(tok):
    ids = tok(PROMPT, add_special_tokens=False).input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    for special, count in [
        ("<|begin_of_text|>", 1),
        ("<|start_header_id|>", 3),
        ("<|end_header_id|>", 3),
        ("<|eot_id|>", 2),
    ]:
        assert tokens.count(special) == count, special
    assert ids.count(777) == 2
    assert "ĊĊ" in tokens  # the "\n\n" after each header is one token, as in Llama-3
    assert tok.decode(ids) == PROMPT
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert "<|" not in decoded and decoded.startswith("system\n\n")
    # <speech> is NOT a token here: the processor adds it.
    assert "<speech>" not in tok.get_vocab()


def test_save_reload_keeps_ids(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.get_vocab() == tok.get_vocab()
    for text in [PROMPT, *TEXTS]:
        assert again(text).input_ids == tok(text).input_ids
    assert (again.bos_token, again.eos_token, again.pad_token) == (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    )
    assert again.model_max_length == 131072


def test_deterministic_across_builds_and_processes(tok):
    assert build_tiny_llama3_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    # Rust hash maps are seeded per process: a fresh interpreter must still give the same vocabulary.
    code = (
        "from llama_omni_hf.tiny_tokenizer import build_tiny_llama3_tokenizer as b\n"
        "print(b().backend_tokenizer.to_str())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    assert out.strip() == tok.backend_tokenizer.to_str()


# ----------------------------------------------------------------------------------------------------------
# Qwen2.5-shaped tokenizers of LLaMA-Omni2: the LLM's (with <speech>) and the TTS LM's (with <sep> and units)
# ----------------------------------------------------------------------------------------------------------

import re  # noqa: E402

from llama_omni_hf.tiny_tokenizer import (  # noqa: E402
    QWEN2_DEFAULT_SYSTEM_PROMPT,
    QWEN2_SPECIAL_TOKENS,
    build_tiny_qwen2_tokenizer,
    build_tiny_qwen2_tts_tokenizer,
)

# Qwen2.5's added tokens as in its tokenizer.json (151643..151664), and which of them are special.
QWEN_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_qwen2_tokenizer()


@pytest.fixture(scope="module")
def tts():
    return build_tiny_qwen2_tts_tokenizer()


def test_qwen_layout(qwen):
    assert QWEN2_SPECIAL_TOKENS == [name for name, _ in QWEN_ADDED]
    assert qwen.convert_tokens_to_ids(QWEN2_SPECIAL_TOKENS) == list(range(768, 790))
    assert qwen.convert_tokens_to_ids("<speech>") == 790 and len(qwen) == 791  # 151665 = first id after them
    assert (qwen.eos_token, qwen.eos_token_id, qwen.pad_token, qwen.pad_token_id) == (
        "<|im_end|>", 770, "<|endoftext|>", 768)
    assert qwen.bos_token is None and qwen.model_max_length == 131072
    special = {t.content: t.special for t in qwen.backend_tokenizer.get_added_tokens_decoder().values()}
    assert special == {**dict(QWEN_ADDED), "<speech>": True}
    small = build_tiny_qwen2_tokenizer(num_merges=100)
    assert small.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<speech>"]) == [356, 358, 378]


@pytest.mark.parametrize("text", TEXTS)
def test_qwen_any_text_round_trips_without_bos(qwen, text):
    ids = qwen(text).input_ids
    assert ids == qwen(text, add_special_tokens=False).input_ids  # Qwen adds no BOS (nor anything else)
    assert qwen.decode(ids) == text == qwen.decode(ids, skip_special_tokens=True)
    assert all(0 <= i < 768 for i in ids)


def test_qwen_merges_apply(qwen):
    assert len(qwen("What is the capital of France?").input_ids) < len("What is the capital of France?") // 2


def test_qwen_normalizes_to_nfc_as_qwen_does(qwen):
    assert qwen("cafe\u0301").input_ids == qwen("café").input_ids


def test_qwen_splits_numbers_one_digit_per_token(qwen, tok):
    tokens = qwen.convert_ids_to_tokens(qwen("in 2024 about 384,400 km").input_ids)
    assert [t for t in tokens if any(c.isdigit() for c in t)] == ["2", "0", "2", "4", "3", "8", "4", "4", "0", "0"]
    # from the same corpus Llama-3's split (runs of up to 3 digits) learns digit merges; Qwen's learns none
    assert any(len(t) > 1 for t in tok.convert_ids_to_tokens(tok("128000", add_special_tokens=False).input_ids))
    assert qwen.convert_ids_to_tokens(qwen("128000").input_ids) == list("128000")
    assert not [t for t in qwen.get_vocab() if len(t) > 1 and t.isdigit()]


def test_qwen_speech_and_chat_markup_are_single_ids(qwen):
    ids = qwen("<|im_start|>user\n<speech><|im_end|>\n").input_ids
    assert ids[0] == 769 and ids.count(790) == 1 and ids.count(770) == 1
    assert qwen.decode(ids, skip_special_tokens=True) == "user\n\n"


QWEN_ONE_TURN = (
    f"<|im_start|>system\n{QWEN2_DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
    "<|im_start|>user\n<speech><|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_qwen_chat_template_one_turn(qwen):
    assert QWEN2_DEFAULT_SYSTEM_PROMPT == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    messages = [{"role": "user", "content": "<speech>"}]
    assert qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == QWEN_ONE_TURN
    assert qwen.apply_chat_template(messages, tokenize=False) == QWEN_ONE_TURN.removesuffix("<|im_start|>assistant\n")


def test_qwen_chat_template_multi_turn(qwen):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<speech>"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "<speech>"},
    ]
    assert qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<speech><|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\n<speech><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # without a system turn the default one comes first
    rendered = qwen.apply_chat_template(messages[1:3], tokenize=False)
    assert rendered == QWEN_ONE_TURN.removesuffix("<|im_start|>assistant\n") + "<|im_start|>assistant\nParis.<|im_end|>\n"


def test_qwen_save_reload(qwen, tmp_path):
    qwen.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.get_vocab() == qwen.get_vocab()
    for text in [QWEN_ONE_TURN, *TEXTS]:
        assert again(text).input_ids == qwen(text).input_ids
    assert (again.eos_token, again.pad_token, again.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert again.chat_template == qwen.chat_template
    assert again.decode(again("<tool_call><speech>").input_ids, skip_special_tokens=True) == "<tool_call>"


def test_qwen_deterministic_across_processes(qwen):
    code = (
        "from llama_omni_hf.tiny_tokenizer import build_tiny_qwen2_tokenizer as b\n"
        "print(b().backend_tokenizer.to_str())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "321"}, cwd=Path(__file__).resolve().parents[1],
    ).stdout
    assert out.strip() == qwen.backend_tokenizer.to_str()


def test_tts_layout(tts, qwen):
    assert tts.convert_tokens_to_ids(QWEN2_SPECIAL_TOKENS) == list(range(768, 790))
    sep = tts.convert_tokens_to_ids("<sep>")
    assert sep == qwen.convert_tokens_to_ids("<speech>") == 790  # both 151665 in the released tokenizers
    assert tts.convert_tokens_to_ids(["<0>", "<1>", "<6560>"]) == [791, 792, 7351]
    assert len(tts) == 791 + 6561 == 7352
    assert tts.eos_token_id == tts.pad_token_id == 768 and tts.eos_token == "<|endoftext|>"
    special = {t.content: t.special for t in tts.backend_tokenizer.get_added_tokens_decoder().values()}
    assert special["<sep>"] is True and special["<|endoftext|>"] is True
    assert not any(special[f"<{unit}>"] for unit in range(6561))
    assert len(build_tiny_qwen2_tts_tokenizer(unit_vocab_size=10)) == 801


def test_tts_decode_and_regex_recovers_units(tts):
    units = [0, 5, 6560, 97, 1234, 5]
    ids = [u + 791 for u in units]
    text = tts.decode(ids + [790, 768], skip_special_tokens=True)  # <sep> and <|endoftext|> vanish
    assert text == "<0><5><6560><97><1234><5>"
    assert [int(d) for d in re.findall(r"\d+", text)] == units
    assert tts("".join(f"<{u}>" for u in units)).input_ids == ids  # each unit's text is its one token


def test_tts_digit_text_tokens_become_units_quirk_q3(tts):
    digits = tts("97", add_special_tokens=False).input_ids  # "9", "7": regular text tokens, one digit each
    assert len(digits) == 2 and all(i < 768 for i in digits)
    words = tts(" hello", add_special_tokens=False).input_ids
    ids = [791 + 3] + digits + [791 + 12] + words + [768, 791 + 40] + digits[:1] + [790]
    text = tts.decode(ids, skip_special_tokens=True)
    assert text == "<3>97<12> hello<40>9"
    assert [int(d) for d in re.findall(r"\d+", text)] == [3, 97, 12, 40, 9]  # the text "97" is read as unit 97


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_merges=-1), "num_merges"), (dict(num_merges=10**6), "num_merges"), (dict(num_merges=2.5), "num_merges"),
    (dict(unit_vocab_size=0), "unit_vocab_size"), (dict(unit_vocab_size=1.5), "unit_vocab_size"),
])
def test_qwen_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tiny_qwen2_tts_tokenizer(**kwargs)
    if "num_merges" in kwargs:
        with pytest.raises(ValueError, match=message):
            build_tiny_qwen2_tokenizer(**kwargs)
