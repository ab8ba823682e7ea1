"""LlamaOmniProcessor: the original's prompt and tokenization, Whisper features, batching, audio hygiene."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from llama_omni_hf.processing_llama_omni import resample

SR = 16000
# spec section 2, verbatim
SYSTEM = (
    "You are a helpful language and speech assistant. You are able to understand the speech content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
SPEC_PROMPT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + SYSTEM + "<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n<speech>\nPlease directly answer the questions in the user's "
    "speech.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)
SINGLE_AUDIO_TURN = [{"role": "user", "content": [{"type": "audio"}]}]


def original_tokenization(tokenizer, prompt, speech_id, per_audio=300):
    """The original's `tokenizer_speech_token`: tokenize the pieces around each <speech> separately WITH the
    tokenizer's BOS, keep the first piece's BOS (so a prompt that starts with <|begin_of_text|> gets two),
    drop the BOS of every later piece; each slot becomes the adaptor's 300 positions."""
    pieces = [tokenizer(piece).input_ids for piece in prompt.split("<speech>")]
    ids = list(pieces[0])
    for piece in pieces[1:]:
        assert piece[0] == tokenizer.bos_token_id
        ids += [speech_id] * per_audio + piece[1:]
    return ids


def tone(freq, sr, seconds=2.0, amplitude=0.5):
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def features(processor, audio, sr=SR):
    return processor(audio=audio, sampling_rate=sr, return_tensors="pt")["input_features"][0]


# ----------------------------------------------------------------------------------------------------------
# prompt and tokenization
# ----------------------------------------------------------------------------------------------------------


def test_default_prompt_is_the_original_with_double_bos(processor, speech):
    assert processor.apply_chat_template(SINGLE_AUDIO_TURN, add_generation_prompt=True) == SPEC_PROMPT
    tokenizer = processor.tokenizer
    bos = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    inputs = processor(audio=speech["france"], sampling_rate=SR, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    expected = original_tokenization(tokenizer, SPEC_PROMPT, processor.speech_token_id)
    assert ids == expected
    assert ids[:3] == [bos, bos, tokenizer.convert_tokens_to_ids("<|start_header_id|>")]
    assert ids.count(bos) == 2  # no BOS after the speech slot
    speech_positions = [i for i, t in enumerate(ids) if t == processor.speech_token_id]
    assert len(speech_positions) == 300 and speech_positions == list(range(speech_positions[0], speech_positions[0] + 300))
    assert ids[speech_positions[-1] + 1] != bos
    assert inputs["attention_mask"].tolist() == [[1] * len(ids)]
    assert inputs["input_features"].shape == (1, 128, 3000) and inputs["input_features"].dtype == torch.float32


def test_features_match_openai_whisper_log_mel(processor, speech):
    whisper = pytest.importorskip("whisper")
    audio = speech["france"]
    ours = features(processor, audio)
    theirs = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)), n_mels=128)
    assert theirs.shape == ours.shape == (128, 3000)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_chat_template_multi_turn_with_audio_turns(processor, speech, tmp_path):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "audio", "audio": speech["france"], "sampling_rate": SR}]},
        {"role": "assistant", "content": "Paris. "},
        {"role": "user", "content": [{"type": "audio", "path": str(tmp_path / "q.wav")},
                                     {"type": "text", "text": "Answer this one too."}]},
    ]
    # the second audio comes from a 22.05 kHz file: resampled like any other rate
    sf.write(tmp_path / "q.wav", resample(torch.from_numpy(speech["tea"]), SR, 22050).numpy(), 22050, subtype="FLOAT")
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<speech>\nPlease directly answer the questions in the user's "
        "speech.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<speech>\nAnswer this one too.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids == original_tokenization(processor.tokenizer, text, processor.speech_token_id)
    assert inputs["input_features"].shape == (2, 128, 3000)
    torch.testing.assert_close(inputs["input_features"][0], features(processor, speech["france"]))
    tea_16k = resample(resample(torch.from_numpy(speech["tea"]), SR, 22050), 22050, SR).numpy()
    torch.testing.assert_close(inputs["input_features"][1], features(processor, tea_16k), rtol=0, atol=1e-4)


def test_batch_of_audios_pads_on_the_left(processor, speech):
    short_prompt = processor.apply_chat_template(SINGLE_AUDIO_TURN, add_generation_prompt=True)
    long_prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Please answer in detail, "
                                                          "with an example and a short summary at the end."}]}],
        add_generation_prompt=True,
    )
    audios = [speech["tea"], speech["france"]]  # different lengths
    batch = processor(audio=audios, text=[short_prompt, long_prompt], sampling_rate=SR, return_tensors="pt")
    alone = [processor(audio=a, text=t, sampling_rate=SR, return_tensors="pt")
             for a, t in zip(audios, [short_prompt, long_prompt])]
    lengths = [a["input_ids"].shape[1] for a in alone]
    assert lengths[0] < lengths[1] and batch["input_ids"].shape == (2, lengths[1])
    pad = processor.tokenizer.pad_token_id
    for row, (single, length) in enumerate(zip(alone, lengths)):
        padding = lengths[1] - length
        assert batch["input_ids"][row, :padding].tolist() == [pad] * padding
        assert batch["input_ids"][row, padding:].tolist() == single["input_ids"][0].tolist()
        assert batch["attention_mask"][row].tolist() == [0] * padding + [1] * length
        torch.testing.assert_close(batch["input_features"][row], single["input_features"][0])
    # a plain list of audios with the default prompt
    plain = processor(audio=audios, sampling_rate=SR, return_tensors="pt")
    assert plain["input_ids"].shape == (2, lengths[0]) and bool(plain["attention_mask"].all())


# ----------------------------------------------------------------------------------------------------------
# audio hygiene
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [44100, 8000, 22050])
def test_resampling_to_16k_matches_an_analytic_sine(processor, rate):
    resampled = resample(torch.from_numpy(tone(440.0, rate)), rate, SR).numpy()
    assert len(resampled) == 2 * SR
    analytic = tone(440.0, SR)
    inner = slice(400, -400)  # the sinc kernel sees zeros past the ends
    assert np.abs(resampled[inner] - analytic[inner]).max() < 1e-4
    # and through the processor: the features are those of the analytic 16 kHz sine (edge frames aside)
    ours, reference = features(processor, tone(440.0, rate), rate), features(processor, analytic)
    torch.testing.assert_close(ours[:, 3:197], reference[:, 3:197], rtol=0, atol=1e-4)


def test_downsampling_removes_what_would_alias(processor):
    # 10 kHz is above the new Nyquist (8 kHz): a naive decimator would fold it to 6 kHz
    resampled = resample(torch.from_numpy(tone(10000.0, 44100)), 44100, SR).numpy()
    assert np.abs(resampled[400:-400]).max() < 1e-3


def test_stereo_is_downmixed_to_the_channel_mean(processor):
    left, right = tone(300.0, SR), tone(1200.0, SR, amplitude=0.2)
    mono = features(processor, (left + right) / 2)
    torch.testing.assert_close(features(processor, np.stack([left, right])), mono)  # [channels, samples]
    torch.testing.assert_close(features(processor, np.stack([left, right], axis=1)), mono)  # [samples, channels]
    # integer PCM is scaled to [-1, 1]
    pcm = np.round(left * 32767).astype(np.int16)
    torch.testing.assert_close(features(processor, pcm), features(processor, pcm / 32767.0), rtol=0, atol=1e-5)


def test_audio_over_30_seconds_is_cut_with_a_warning(processor, caplog):
    long = np.concatenate([tone(440.0, SR, 30.0), tone(880.0, SR, 5.0)])
    with caplog.at_level(logging.WARNING):
        cut = features(processor, long)
    assert "audio[0] lasts 35.0 s; only its first 30 s are used" in caplog.text
    torch.testing.assert_close(cut, features(processor, long[: 30 * SR]))


GOOD = tone(440.0, SR, 1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(audio=np.zeros(0, np.float32)), r"audio\[0\] is empty: there is no speech to answer"),
        (dict(audio=np.full(1600, np.nan, np.float32)), r"audio\[0\] contains NaN or infinite samples"),
        (dict(audio=np.where(np.arange(1600) == 7, np.inf, 0.1).astype(np.float32)), r"audio\[0\] contains NaN or infinite"),
        (dict(audio=np.zeros(16000, np.float32)), r"audio\[0\] is silent \(peak below 1e-4\)"),
        (dict(audio=[GOOD, np.zeros(16000, np.float32)]), r"audio\[1\] is silent"),
        (dict(audio="question.wav"), r"audio\[0\] is a str, not audio samples: pass a 1-D float array"),
        (dict(audio={"array": GOOD, "sampling_rate": SR}), r"audio\[0\] is a dict, not audio samples"),
        (dict(audio=[GOOD, None]), r"audio\[1\] is a NoneType, not audio samples"),
        (dict(audio=GOOD.astype(np.complex64)), r"audio\[0\] has dtype complex64, not audio samples"),
        (dict(audio=np.ones(1600, bool)), r"audio\[0\] has dtype bool, not audio samples"),
        (dict(audio=np.zeros((2, 2, 1600), np.float32)), r"audio\[0\] has shape \(2, 2, 1600\); expected \[samples\]"),
        (dict(audio=[]), r"no audio given"),
        (dict(), r"pass `audio=`"),
        (dict(audio=GOOD, sampling_rate=None),
         r"pass `sampling_rate=` \(the rate of your audio\): the processor requires it explicitly and does not "
         r"assume 16000 Hz"),
        (dict(audio=GOOD, sampling_rate=0), r"sampling_rate=0 is not a valid audio rate"),
        (dict(audio=GOOD, sampling_rate="16k"), r"sampling_rate='16k' is not a valid audio rate"),
        (dict(audio=GOOD, sampling_rate=16000.5), r"sampling_rate=16000.5 is not a valid audio rate"),
        (dict(audio=[GOOD, GOOD], text="<speech> What is this?"), r"the text has 1 <speech> slots but 2 audios"),
        (dict(audio=GOOD, text="No slot here."), r"the text has 0 <speech> slots but 1 audios"),
        (dict(text="<speech> and <speech>"), r"the text has 2 <speech> slots but 0 audios"),
    ],
    ids=lambda value: None if isinstance(value, dict) else value[:30],
)
def test_bad_input_gets_a_clear_error(processor, kwargs, message):
    kwargs.setdefault("sampling_rate", SR)
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_chat_template_audio_items_without_samples_or_rate_are_clear_errors(processor, tmp_path):
    with pytest.raises(ValueError, match=r"an audio item needs its samples \('audio'\) or a file \('path'\)"):
        processor.apply_chat_template(SINGLE_AUDIO_TURN, tokenize=True)
    sf.write(tmp_path / "q.wav", GOOD, 22050)
    conversation = [{"role": "user", "content": [{"type": "audio", "path": str(tmp_path / "q.wav")},
                                                 {"type": "audio", "audio": GOOD}]}]
    no_rate = (r"audio item 1 has samples but no rate: add 'sampling_rate' to the item or pass sampling_rate= "
               r"\(the processor requires it; it does not assume 16000 Hz\)")
    with pytest.raises(ValueError, match=no_rate):
        processor.apply_chat_template(conversation, tokenize=True)


def test_missing_or_corrupt_audio_file_in_a_conversation_is_a_clear_error(processor, tmp_path):
    (tmp_path / "broken.wav").write_bytes(b"RIFF but not really a wav file")
    for path in (tmp_path / "absent.wav", tmp_path / "broken.wav"):
        conversation = [{"role": "user", "content": [{"type": "audio", "path": str(path)}]}]
        with pytest.raises(ValueError, match=f"cannot read the audio file '{path}'"):
            processor.apply_chat_template(conversation, tokenize=True)


def test_bfloat16_tensor_audio_is_accepted(processor):
    as_bf16 = processor(audio=torch.from_numpy(GOOD).bfloat16(), sampling_rate=16000, return_tensors="pt")
    upcast = processor(audio=torch.from_numpy(GOOD).bfloat16().float(), sampling_rate=16000,  # the same samples
                       return_tensors="pt")
    assert torch.equal(as_bf16["input_ids"], upcast["input_ids"])
    assert torch.equal(as_bf16["input_features"], upcast["input_features"])


# ----------------------------------------------------------------------------------------------------------
# transformers' processor conventions (ProcessorTesterMixin findings)
# ----------------------------------------------------------------------------------------------------------

GOOD_TURN = [{"role": "user", "content": [{"type": "audio", "audio": GOOD, "sampling_rate": SR}]}]


def test_a_caller_chat_template_replaces_the_default(processor):
    template = "<|begin_of_text|>{% for message in messages %}[{{ message['role'] }}] <speech>{% endfor %}"
    text = processor.apply_chat_template(GOOD_TURN, chat_template=template)
    assert text == "<|begin_of_text|>[user] <speech>"
    inputs = processor.apply_chat_template(GOOD_TURN, chat_template=template, tokenize=True, return_dict=True)
    assert inputs["input_ids"] == [original_tokenization(processor.tokenizer, text, processor.speech_token_id)]
    # the processor's own template is unchanged
    assert processor.apply_chat_template(GOOD_TURN, add_generation_prompt=True) == SPEC_PROMPT


def test_a_batch_of_conversations_is_tokenized_together_with_left_padding(processor, speech):
    france, tea = speech["france"], speech["tea"]
    conversations = [
        [{"role": "user", "content": [{"type": "audio", "audio": france, "sampling_rate": SR}]}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "audio", "audio": tea, "sampling_rate": SR},
                                      {"type": "text", "text": "Two things, please."}]},
         {"role": "assistant", "content": "Sure."},
         {"role": "user", "content": [{"type": "audio", "audio": france, "sampling_rate": SR}]}],
    ]
    texts = processor.apply_chat_template(conversations, add_generation_prompt=True)
    assert texts == [processor.apply_chat_template(conversation, add_generation_prompt=True)
                     for conversation in conversations]
    batch = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    rows = [original_tokenization(processor.tokenizer, text, processor.speech_token_id) for text in texts]
    width, pad = max(map(len, rows)), processor.tokenizer.pad_token_id
    assert len(rows[0]) < width
    assert batch["input_ids"].tolist() == [[pad] * (width - len(row)) + row for row in rows]
    assert batch["attention_mask"].tolist() == [[0] * (width - len(row)) + [1] * len(row) for row in rows]
    assert batch["input_features"].shape == (3, 128, 3000)  # every audio of the batch, in order
    for row, audio in zip(batch["input_features"], [france, tea, france]):
        torch.testing.assert_close(row, features(processor, audio))


def test_outputs_are_lists_unless_return_tensors_is_given(processor):
    lists = processor(audio=GOOD, sampling_rate=SR)
    tensors = processor(audio=GOOD, sampling_rate=SR, return_tensors="pt")
    assert type(lists["input_ids"]) is list and type(lists["input_ids"][0][0]) is int
    assert lists["input_ids"] == tensors["input_ids"].tolist()
    assert lists["attention_mask"] == tensors["attention_mask"].tolist()
    assert not isinstance(lists["input_features"], torch.Tensor)  # the feature extractor's numpy output
    np.testing.assert_array_equal(np.asarray(lists["input_features"]), tensors["input_features"].numpy())
    assert isinstance(processor(audio=GOOD, sampling_rate=SR, return_tensors="np")["input_ids"], np.ndarray)
    # apply_chat_template(tokenize=True) alike: the ids (transformers' default return_dict=False), or all outputs
    chat = dict(add_generation_prompt=True, tokenize=True)
    assert processor.apply_chat_template(GOOD_TURN, return_dict=True, **chat)["input_ids"] == lists["input_ids"]
    assert processor.apply_chat_template(GOOD_TURN, **chat) == lists["input_ids"]
    assert torch.equal(processor.apply_chat_template(GOOD_TURN, return_tensors="pt", **chat), tensors["input_ids"])


def test_padding_options_are_honoured(processor):
    ids = processor(audio=GOOD, sampling_rate=SR)["input_ids"][0]
    n, pad = len(ids), processor.tokenizer.pad_token_id
    padded = processor(audio=GOOD, sampling_rate=SR, padding="max_length", max_length=n + 7)
    assert padded["input_ids"] == [[pad] * 7 + ids] and padded["attention_mask"] == [[0] * 7 + [1] * n]
    right = processor(audio=GOOD, sampling_rate=SR, padding="max_length", max_length=n + 3, padding_side="right")
    assert right["input_ids"] == [ids + [pad] * 3]
    multiple = processor(audio=GOOD, sampling_rate=SR, pad_to_multiple_of=64)["input_ids"][0]
    assert len(multiple) % 64 == 0 and len(multiple) - n < 64 and multiple[len(multiple) - n:] == ids
    assert "attention_mask" not in processor(audio=GOOD, sampling_rate=SR, return_attention_mask=False)
    # padding=False leaves a batch ragged
    texts = [SPEC_PROMPT, SPEC_PROMPT.replace("the questions", "every one of the many questions")]
    ragged = processor(audio=[GOOD, GOOD], text=texts, sampling_rate=SR, padding=False)["input_ids"]
    assert ragged == [processor(audio=GOOD, text=text, sampling_rate=SR)["input_ids"][0] for text in texts]
    assert len(ragged[0]) < len(ragged[1])
    # and through apply_chat_template
    via_chat = processor.apply_chat_template(GOOD_TURN, add_generation_prompt=True, tokenize=True,
                                             padding="max_length", max_length=n + 7)
    assert via_chat == padded["input_ids"]


def test_truncation_never_cuts_a_prompt_and_says_why(processor):
    n = len(processor(audio=GOOD, sampling_rate=SR)["input_ids"][0])
    message = rf"a prompt is {n} tokens \(300 per audio\) but truncation to {n - 1} was requested: LlamaOmniProcessor"
    with pytest.raises(ValueError, match=message):
        processor(audio=GOOD, sampling_rate=SR, truncation=True, max_length=n - 1)
    with pytest.raises(ValueError, match=message):
        processor.apply_chat_template(GOOD_TURN, add_generation_prompt=True, tokenize=True,
                                      truncation="longest_first", max_length=n - 1)
    fits = processor(audio=GOOD, sampling_rate=SR, truncation=True, max_length=n)
    assert fits["input_ids"] == processor(audio=GOOD, sampling_rate=SR)["input_ids"]
    # without max_length the limit is the tokenizer's model_max_length (2048 in the tiny checkpoint)
    limit = processor.tokenizer.model_max_length
    many = ["<|begin_of_text|>" + "<speech>" * (limit // 300 + 1)]
    with pytest.raises(ValueError, match=rf"but truncation to {limit} was requested"):
        processor(audio=[GOOD] * (limit // 300 + 1), text=many, sampling_rate=SR, truncation=True)
    # options the processor does not know are an error, not silently ignored
    with pytest.raises(TypeError, match="unexpected keyword argument 'images'"):
        processor(audio=GOOD, sampling_rate=SR, images=[np.zeros((3, 8, 8))])


def test_speech_token_is_one_added_token_of_the_saved_tokenizer(processor, tiny_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint, trust_remote_code=True)  # loaded on its own
    speech_id = tokenizer.convert_tokens_to_ids("<speech>")
    assert speech_id == processor.speech_token_id == len(tokenizer) - 1
    assert tokenizer("a <speech> b", add_special_tokens=False)["input_ids"].count(speech_id) == 1
    assert processor(audio=GOOD, sampling_rate=SR)["input_ids"][0].count(speech_id) == 300


# ----------------------------------------------------------------------------------------------------------
# transformers' ProcessorMixin.apply_chat_template: names, defaults, processor_kwargs, masks, message objects
# ----------------------------------------------------------------------------------------------------------


def test_audio_token_is_transformers_name_for_the_speech_placeholder(processor):
    assert processor.audio_token == "<speech>"
    ids = processor.tokenizer("<speech>", add_special_tokens=False)["input_ids"]  # the tokenizer on its own
    assert ids == [processor.audio_token_id] and processor.audio_token_id == processor.speech_token_id


def test_chat_template_defaults_are_transformers(processor):
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    # no generation prompt unless asked for
    assert processor.apply_chat_template(GOOD_TURN) == SPEC_PROMPT.removesuffix(header)
    # tokenize=True returns the input_ids only (return_dict=False), as the tokenizer would tokenize the text
    ids = processor.apply_chat_template(GOOD_TURN, tokenize=True)
    text = SPEC_PROMPT.removesuffix(header)
    assert ids == [original_tokenization(processor.tokenizer, text, processor.audio_token_id)]
    full = processor.apply_chat_template(GOOD_TURN, tokenize=True, return_dict=True, return_tensors="pt")
    assert set(full) == {"input_ids", "attention_mask", "input_features"} and full["input_ids"].tolist() == ids


def test_processor_kwargs_reach_call(processor):
    chat = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    n = len(processor(audio=GOOD, sampling_rate=SR)["input_ids"][0])
    expected = processor(audio=GOOD, sampling_rate=SR, padding="max_length", max_length=n + 5, padding_side="right")
    got = processor.apply_chat_template(
        GOOD_TURN, processor_kwargs={"padding": "max_length", "max_length": n + 5, "padding_side": "right"}, **chat
    )
    assert got["input_ids"] == expected["input_ids"] and got["attention_mask"] == expected["attention_mask"]
    # the rate of audio items without their own, through processor_kwargs too
    no_rate = [{"role": "user", "content": [{"type": "audio", "audio": GOOD}]}]
    with_rate = processor.apply_chat_template(no_rate, processor_kwargs={"sampling_rate": SR}, **chat)
    assert with_rate["input_ids"] == processor.apply_chat_template(GOOD_TURN, **chat)["input_ids"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_frames'"):  # not silently dropped
        processor.apply_chat_template(GOOD_TURN, processor_kwargs={"num_frames": 2}, **chat)


MASK_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|eot_id|>{% endgeneration %}"
    "{% else %}{% for item in message['content'] %}{{ '<speech>' if item['type'] == 'audio' else item['text'] }}"
    "{% endfor %}<|eot_id|>{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_assistant_tokens_mask_covers_the_answers_only(processor, padding_side):
    ask = {"role": "user", "content": [{"type": "audio", "audio": GOOD, "sampling_rate": SR}]}
    conversations = [
        [ask, {"role": "assistant", "content": "Paris."}],
        [ask, {"role": "assistant", "content": "It is Paris."},
         ask, {"role": "assistant", "content": "Rome, I think."}],
    ]
    inputs = processor.apply_chat_template(
        conversations, chat_template=MASK_TEMPLATE, tokenize=True, return_dict=True, return_tensors="pt",
        return_assistant_tokens_mask=True, processor_kwargs={"padding_side": padding_side},
    )
    masks, ids = inputs["assistant_masks"], inputs["input_ids"]
    assert masks.shape == ids.shape and masks.dtype == torch.int64
    encode = lambda text: processor.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    answers = [["Paris."], ["It is Paris.", "Rome, I think."]]
    for row, mask, attention, texts in zip(ids, masks, inputs["attention_mask"], answers):
        assert row[mask.bool()].tolist() == [t for text in texts for t in encode(text + "<|eot_id|>")]
        assert not mask[row == processor.audio_token_id].any()  # the speech positions are the user's
        assert not mask[attention == 0].any()  # nor is the padding
    assert inputs["attention_mask"][0, 0 if padding_side == "left" else -1] == 0  # the first row is padded
    with pytest.raises(ValueError, match="return_assistant_tokens_mask=True needs tokenize=True and return_dict=True"):
        processor.apply_chat_template(conversations, tokenize=True, return_assistant_tokens_mask=True)


def test_message_objects_are_taken_as_dicts(processor):
    import dataclasses

    @dataclasses.dataclass
    class Message:
        role: str
        content: list
        tool_calls: list | None = None  # None fields are dropped, as transformers does

    objects = [Message("user", [{"type": "audio", "audio": GOOD, "sampling_rate": SR}])]
    chat = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    assert processor.apply_chat_template(objects, add_generation_prompt=True) == SPEC_PROMPT
    assert processor.apply_chat_template(objects, **chat)["input_ids"] == processor.apply_chat_template(
        GOOD_TURN, **chat)["input_ids"]


def test_audio_url_items_are_local_files_only(processor, tmp_path):
    sf.write(tmp_path / "q.wav", GOOD, SR)
    chat = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    by_path = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "audio", "path": str(tmp_path / "q.wav")}]}], **chat)
    for url in (str(tmp_path / "q.wav"), (tmp_path / "q.wav").as_uri()):
        by_url = processor.apply_chat_template([{"role": "user", "content": [{"type": "audio", "url": url}]}], **chat)
        np.testing.assert_array_equal(np.asarray(by_url["input_features"]), np.asarray(by_path["input_features"]))
    remote = [{"role": "user", "content": [{"type": "audio", "url": "https://example.com/q.wav"}]}]
    with pytest.raises(ValueError, match="the audio URL 'https://example.com/q.wav' is not downloaded by the proc"):
        processor.apply_chat_template(remote, **chat)
    image = [{"role": "user", "content": [{"type": "image", "url": "cat.png"}, {"type": "text", "text": "What?"}]}]
    with pytest.raises(ValueError, match="'image' items are not supported: LLaMA-Omni takes audio and text items only"):
        processor.apply_chat_template(image, **chat)
