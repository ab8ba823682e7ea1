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
