"""LlamaOmni2Processor: the Qwen2.5 prompt of LLaMA-Omni2 (spec llama-omni2 §2.1), Whisper features, batching,
audio hygiene and save/load, checked against independent computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from llama_omni_hf.processing_llama_omni import CHAT_TEMPLATE, resample
from llama_omni_hf.processing_llama_omni2 import LlamaOmni2Processor
from llama_omni_hf.tiny_tokenizer import QWEN2_DEFAULT_SYSTEM_PROMPT, build_tiny_qwen2_tokenizer

SR = 16000
SPEECH_ID = 790  # the tiny Qwen tokenizer's <speech> (151665 in the released one)
PAD_ID = 768  # <|endoftext|>
SYSTEM = f"<|im_start|>system\n{QWEN2_DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
# the original's single-turn prompt: messages [{"role": "user", "content": "<speech>"}], add_generation_prompt
ONE_TURN = SYSTEM + "<|im_start|>user\n<speech><|im_end|>\n<|im_start|>assistant\n"


def tone(freq, seconds=1.0, sr=SR, amplitude=0.5):
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


A, B = tone(300.0, 1.5), tone(1100.0, 2.5, amplitude=0.3)


def audio(samples, sr=SR):
    return {"type": "audio", "audio": samples, "sampling_rate": sr}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_qwen2_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return LlamaOmni2Processor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer)


def whisper_features(*audios):
    """WhisperFeatureExtractor called directly on 16 kHz audio."""
    extractor = WhisperFeatureExtractor(feature_size=128)
    return extractor(list(audios), sampling_rate=SR, return_tensors="pt")["input_features"]


def expected_ids(tokenizer, prompt, per_audio=300):
    """The rendered prompt tokenized by the tokenizer alone, each <speech> expanded to `per_audio` copies."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer(prompt)["input_ids"] == ids  # Qwen adds nothing
    return [t for i in ids for t in ([i] * per_audio if i == SPEECH_ID else [i])]


def test_single_audio_gives_the_original_prompt(processor, tokenizer):
    assert processor.speech_token_id == SPEECH_ID and processor.speech_tokens_per_audio == 300
    assert processor.double_bos is False
    # the original passes the user turn as the string "<speech>": the same text as an audio item list
    original = tokenizer.apply_chat_template([{"role": "user", "content": "<speech>"}], tokenize=False,
                                             add_generation_prompt=True)
    assert original == ONE_TURN
    assert processor.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}],
                                         add_generation_prompt=True) == ONE_TURN
    inputs = processor(audio=A, sampling_rate=SR, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids == expected_ids(tokenizer, ONE_TURN)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS
    slots = [i for i, t in enumerate(ids) if t == SPEECH_ID]
    assert slots == list(range(slots[0], slots[0] + 300))
    assert inputs["attention_mask"].tolist() == [[1] * len(ids)]
    assert inputs["input_features"].shape == (1, 128, 3000) and inputs["input_features"].dtype == torch.float32
    torch.testing.assert_close(inputs["input_features"], whisper_features(A), rtol=0, atol=0)


def test_multi_turn_with_two_audios_and_an_answer(processor, tokenizer):
    conversation = [
        {"role": "user", "content": [audio(A)]},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": [audio(B), {"type": "text", "text": "And this one?"}]},
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == (
        SYSTEM + "<|im_start|>user\n<speech><|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\n<speech>\nAnd this one?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids == expected_ids(tokenizer, text) and ids.count(SPEECH_ID) == 600
    assert inputs["input_features"].shape == (2, 128, 3000)
    torch.testing.assert_close(inputs["input_features"], whisper_features(A, B), rtol=0, atol=0)  # order kept
    assert not torch.equal(inputs["input_features"][0], inputs["input_features"][1])
    # the answer's text is in the ids
    answer = tokenizer("Paris.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert any(ids[i:i + len(answer)] == answer for i in range(len(ids)))


def test_a_batch_of_conversations_is_left_padded(processor, tokenizer):
    conversations = [
        [{"role": "user", "content": [audio(A)]}],
        [{"role": "user", "content": [audio(B)]}, {"role": "assistant", "content": "It is a long answer, I think."},
         {"role": "user", "content": [audio(A)]}],
    ]
    texts = processor.apply_chat_template(conversations, add_generation_prompt=True)
    batch = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt")
    rows = [expected_ids(tokenizer, text) for text in texts]
    width = max(map(len, rows))
    assert len(rows[0]) < width == batch["input_ids"].shape[1]
    assert batch["input_ids"].tolist() == [[PAD_ID] * (width - len(row)) + row for row in rows]
    assert batch["attention_mask"].tolist() == [[0] * (width - len(row)) + [1] * len(row) for row in rows]
    torch.testing.assert_close(batch["input_features"], whisper_features(A, B, A), rtol=0, atol=0)
    # and a plain list of audios, each with the default prompt
    plain = processor(audio=[A, B], sampling_rate=SR)
    assert plain["input_ids"] == [expected_ids(tokenizer, ONE_TURN)] * 2


@pytest.mark.parametrize("content", ["Be brief.", [{"type": "text", "text": "Be brief."}]])
def test_a_system_turn_replaces_the_default_system_text(processor, tokenizer, content):
    conversation = [{"role": "system", "content": content}, {"role": "user", "content": [audio(A)]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == ONE_TURN.replace(SYSTEM, "<|im_start|>system\nBe brief.<|im_end|>\n")
    assert QWEN2_DEFAULT_SYSTEM_PROMPT not in text
    ids = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    assert ids == [expected_ids(tokenizer, text)]


def test_the_template_is_the_checkpoints_never_llama3s(tokenizer):
    extractor = WhisperFeatureExtractor(feature_size=128)
    processor = LlamaOmni2Processor(feature_extractor=extractor, tokenizer=tokenizer)
    assert processor.chat_template == tokenizer.chat_template != CHAT_TEMPLATE
    custom = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    own = LlamaOmni2Processor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=custom)
    turn = [{"role": "user", "content": [{"type": "text", "text": "Hi."}, {"type": "audio"}]}]
    assert own.apply_chat_template(turn) == "[user] Hi.\n<speech>\n"
    bare = build_tiny_qwen2_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="LlamaOmni2Processor needs the checkpoint's chat template"):
        LlamaOmni2Processor(feature_extractor=extractor, tokenizer=bare)


def test_other_item_types_are_an_error(processor):
    image = [{"role": "user", "content": [{"type": "image", "url": "cat.png"}]}]
    with pytest.raises(ValueError, match="'image' items are not supported: LLaMA-Omni2 takes audio and text"):
        processor.apply_chat_template(image)


def test_speech_tokens_per_audio_sets_the_expansion(tokenizer):
    processor = LlamaOmni2Processor(WhisperFeatureExtractor(feature_size=128), tokenizer, speech_tokens_per_audio=7)
    assert processor(audio=A, sampling_rate=SR)["input_ids"] == [expected_ids(tokenizer, ONE_TURN, per_audio=7)]


def test_assistant_tokens_mask_covers_the_answers(processor, tokenizer):
    conversation = [{"role": "user", "content": [audio(A)]}, {"role": "assistant", "content": "Paris."},
                    {"role": "user", "content": [audio(B)]}, {"role": "assistant", "content": "Rome, I think."}]
    inputs = processor.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True, return_tensors="pt")
    row, mask = inputs["input_ids"][0], inputs["assistant_masks"][0]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert row[mask.bool()].tolist() == encode("Paris.<|im_end|>") + encode("Rome, I think.<|im_end|>")


# ----------------------------------------------------------------------------------------------------------
# audio hygiene, inherited from LlamaOmniProcessor
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(audio=np.zeros(0, np.float32)), r"audio\[0\] is empty"),
        (dict(audio=np.full(1600, np.nan, np.float32)), r"audio\[0\] contains NaN or infinite samples"),
        (dict(audio=np.zeros(16000, np.float32)), r"audio\[0\] is silent \(peak below 1e-4\)"),
        (dict(audio=[A, np.zeros(16000, np.float32)]), r"audio\[1\] is silent"),
        (dict(audio=A, sampling_rate=None), r"pass `sampling_rate=` \(the rate of your audio\)"),
    ],
    ids=["empty", "nan", "silent", "second-silent", "no-rate"],
)
def test_bad_audio_is_a_clear_error(processor, kwargs, message):
    kwargs.setdefault("sampling_rate", SR)
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_conversation_audio_without_rate_is_an_error(processor):
    with pytest.raises(ValueError, match="audio item 0 has samples but no rate"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio": A}]}], tokenize=True)


def test_48k_stereo_equals_the_mono_16k_resample_path(processor):
    left, right = tone(300.0, 2.0, sr=48000), tone(1200.0, 2.0, sr=48000, amplitude=0.2)
    stereo = processor(audio=np.stack([left, right]), sampling_rate=48000, return_tensors="pt")
    mono_16k = resample(torch.from_numpy((left + right) / 2), 48000, SR).numpy()
    assert mono_16k.shape == (2 * SR,)
    torch.testing.assert_close(stereo["input_features"], whisper_features(mono_16k))
    assert stereo["input_ids"].tolist() == processor(audio=mono_16k, sampling_rate=SR, return_tensors="pt")[
        "input_ids"].tolist()


def test_audio_over_30_seconds_is_cut_to_its_first_30(processor):
    long = np.concatenate([tone(440.0, 30.0), tone(880.0, 5.0)])
    torch.testing.assert_close(processor(audio=long, sampling_rate=SR, return_tensors="pt")["input_features"],
                               whisper_features(long[: 30 * SR]), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["processor_class"] == "LlamaOmni2Processor"
    assert config["speech_tokens_per_audio"] == 300 and config["double_bos"] is False
    loaded = LlamaOmni2Processor.from_pretrained(tmp_path)
    assert type(loaded) is LlamaOmni2Processor and loaded.chat_template == processor.chat_template
    assert loaded.speech_token_id == SPEECH_ID and loaded.double_bos is False
    assert loaded.tokenizer.padding_side == "left"
    conversations = [
        [{"role": "user", "content": [audio(A)]}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [audio(B)]},
         {"role": "assistant", "content": "Yes."}, {"role": "user", "content": [audio(A)]}],
    ]
    chat = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    before, after = processor.apply_chat_template(conversations, **chat), loaded.apply_chat_template(conversations, **chat)
    assert set(before) == set(after) == {"input_ids", "attention_mask", "input_features"}
    for key in before:
        assert torch.equal(before[key], after[key]), key
