"""Streaming: generate_stream vs generate vs the original's full recompute; seamless audio; edge cases."""

import copy
import threading

import pytest
import torch
from transformers import TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from llama_omni_hf.espeak import synthesize
from llama_omni_hf.tiny import build_tiny_model_and_processor

MAX_NEW = 24


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_model_and_processor(vocoder=True, seed=1)
    audio = synthesize("What is the tallest mountain in the world?")
    inputs = processor(audio=audio, sampling_rate=16000, return_tensors="pt")
    return model, processor, inputs


def original_units(model, sequences, prompt_length, input_features):
    """The original's algorithm (spec sections 3-4): run the LLM over prompt + answer, take the final-norm
    states that predicted each answer token, upsample x25, run the decoder over the whole prefix at once,
    argmax, merge repeats, drop blanks."""
    with torch.no_grad():
        embeds = model._embed_with_speech(sequences, input_features)
        states = model.model(inputs_embeds=embeds).last_hidden_state[0]
        n_answer = sequences.shape[1] - prompt_length
        states = states[prompt_length - 1 : prompt_length - 1 + n_answer]  # (last prompt token, y1..y_{N-1})
        upsampled = states.repeat_interleave(model.config.unit_decoder_upsample_factor, dim=0)[None]
        frames = model.unit_decoder(upsampled)[0].float().argmax(-1).tolist()
    blank = model.config.unit_vocab_size
    merged = [f for i, f in enumerate(frames) if i == 0 or f != frames[i - 1]]
    return [f for f in merged if f != blank]


def snr_db(reference, estimate):
    noise = (reference - estimate).pow(2).sum()
    return float(10 * torch.log10(reference.pow(2).sum() / noise.clamp(min=1e-20)))


def run_stream(model, inputs, processor, **kwargs):
    chunks = list(model.generate_stream(**inputs, tokenizer=processor.tokenizer, **kwargs))
    assert chunks and chunks[-1].is_final and not any(c.is_final for c in chunks[:-1])
    return chunks


def test_stream_equals_generate_and_original_greedy(tiny):
    model, processor, inputs = tiny
    prompt_length = inputs["input_ids"].shape[1]
    offline = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW, return_dict_in_generate=True)
    chunks = run_stream(model, inputs, processor, do_sample=False, max_new_tokens=MAX_NEW, chunk_size=10)
    answer_text = processor.decode(offline.sequences[0, prompt_length:], skip_special_tokens=True)
    assert "".join(c.text for c in chunks) == answer_text
    assert sum(1 for c in chunks if c.text) >= 2  # text arrives in several updates
    assert torch.equal(torch.cat([c.token_ids for c in chunks]), offline.sequences[0, prompt_length:])
    assert torch.equal(chunks[-1].sequences, offline.sequences)
    streamed_units = torch.cat([c.units for c in chunks])
    assert torch.equal(streamed_units, offline.units[0])
    assert torch.equal(chunks[-1].all_units, offline.units[0])
    expected = original_units(model, offline.sequences, prompt_length, inputs["input_features"])
    assert len(expected) > 0
    assert offline.units[0].tolist() == expected


def test_stream_equals_generate_seeded_sampling(tiny):
    model, processor, inputs = tiny
    options = dict(do_sample=True, temperature=1.3, top_p=0.95, top_k=50, max_new_tokens=MAX_NEW)
    torch.manual_seed(123)
    offline = model.generate(**inputs, return_dict_in_generate=True, **options)
    torch.manual_seed(123)
    chunks = run_stream(model, inputs, processor, chunk_size=20, **options)
    assert torch.equal(chunks[-1].sequences, offline.sequences)
    assert torch.equal(torch.cat([c.units for c in chunks]), offline.units[0])
    prompt_length = inputs["input_ids"].shape[1]
    assert offline.units[0].tolist() == original_units(
        model, offline.sequences, prompt_length, inputs["input_features"]
    )


@pytest.mark.parametrize("omega", [10, 40])
def test_streamed_audio_matches_offline(tiny, omega):
    model, processor, inputs = tiny
    options = dict(do_sample=False, max_new_tokens=4 * omega, min_new_tokens=4 * omega)
    offline = model.generate(**inputs, return_dict_in_generate=True, **options)
    assert len(offline.units[0]) >= 3 * omega  # several chunks, so there are seams to get wrong
    chunks = run_stream(model, inputs, processor, chunk_size=omega, **options)
    streamed = torch.cat([c.audio for c in chunks])
    reference = offline.audio[0]
    assert streamed.dtype == torch.float32 and streamed.shape == reference.shape
    assert sum(1 for c in chunks if len(c.audio)) >= 3
    seamless = snr_db(reference, streamed)
    # the original's method: every chunk vocoded alone (chunk-edge durations and seams differ from offline)
    independent = torch.cat([c.audio for c in run_stream(
        model, inputs, processor, chunk_size=omega, vocoder_left_context=0, vocoder_lookahead=0, **options)])
    n = min(len(independent), len(reference))
    original = snr_db(reference[:n], independent[:n])
    assert seamless > 15.0, seamless
    assert seamless > original + 5.0, (seamless, original)


def test_first_audio_before_text_is_complete(tiny):
    model, processor, inputs = tiny
    chunks = run_stream(model, inputs, processor, do_sample=False, max_new_tokens=MAX_NEW, chunk_size=10)
    first_audio = next(i for i, c in enumerate(chunks) if len(c.audio))
    tokens_before = sum(len(c.token_ids) for c in chunks[: first_audio + 1])
    assert first_audio < len(chunks) - 1
    assert tokens_before < MAX_NEW


def test_text_iterator_streamer_is_fed(tiny):
    model, processor, inputs = tiny
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    received = []
    reader = threading.Thread(target=lambda: received.extend(streamer))
    reader.start()
    chunks = run_stream(model, inputs, processor, do_sample=False, max_new_tokens=MAX_NEW, streamer=streamer)
    reader.join(timeout=60)
    assert "".join(received).strip() == "".join(c.text for c in chunks).strip()


class CountingStreamer(BaseStreamer):
    def __init__(self):
        self.tokens = 0

    def put(self, value):
        self.tokens += value.numel()

    def end(self):
        pass


def test_closing_the_iterator_stops_generation(tiny):
    model, processor, inputs = tiny
    counter = CountingStreamer()
    stream = model.generate_stream(**inputs, tokenizer=processor.tokenizer, do_sample=False, max_new_tokens=400,
                                   min_new_tokens=400, streamer=counter)
    next(stream)
    stream.close()  # joins the generation thread
    prompt = inputs["input_ids"].numel()
    assert counter.tokens - prompt < 50, counter.tokens - prompt
    assert not any(t.name == "llama-omni-generate" and t.is_alive() for t in threading.enumerate())


def test_omega_larger_than_answer(tiny):
    model, processor, inputs = tiny
    offline = model.generate(**inputs, do_sample=False, max_new_tokens=8, return_dict_in_generate=True)
    chunks = run_stream(model, inputs, processor, do_sample=False, max_new_tokens=8, chunk_size=100000)
    assert all(len(c.audio) == 0 for c in chunks[:-1])
    assert torch.allclose(chunks[-1].audio, offline.audio[0], atol=1e-5)


def test_eos_at_first_step(tiny):
    model, processor, inputs = tiny
    first = model.generate(**inputs, do_sample=False, max_new_tokens=1)[0, -1].item()
    out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=[first],
                         return_dict_in_generate=True)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 1
    prompt_length = inputs["input_ids"].shape[1]
    assert out.units[0].tolist() == original_units(model, out.sequences, prompt_length, inputs["input_features"])
    chunks = run_stream(model, inputs, processor, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=[first])
    assert torch.equal(chunks[-1].sequences, out.sequences)
    assert "".join(c.text for c in chunks) == processor.decode(out.sequences[0, prompt_length:],
                                                               skip_special_tokens=True)


def test_answer_without_units_gives_empty_audio(tiny):
    model, processor, inputs = tiny
    silent = copy.deepcopy(model)
    with torch.no_grad():
        silent.unit_decoder.output_proj.bias[silent.config.unit_vocab_size] = 1e4  # blank always wins
    out = silent.generate(**inputs, do_sample=False, max_new_tokens=6, return_dict_in_generate=True)
    assert out.units[0].numel() == 0 and out.audio[0].numel() == 0 and out.audio[0].dtype == torch.float32
    chunks = run_stream(silent, inputs, processor, do_sample=False, max_new_tokens=6)
    assert sum(len(c.audio) for c in chunks) == 0 and chunks[-1].all_units.numel() == 0


def test_checkpoint_without_vocoder():
    model, processor = build_tiny_model_and_processor(vocoder=False, seed=2)
    inputs = processor(audio=synthesize("Hello there."), sampling_rate=16000, return_tensors="pt")
    with pytest.raises(ValueError, match="no vocoder"):
        model.generate(**inputs, max_new_tokens=4, return_audio=True)
    out = model.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True)
    assert out.audio is None and len(out.units) == 1
    chunks = list(model.generate_stream(**inputs, tokenizer=processor.tokenizer, max_new_tokens=4))
    assert all(c.audio.numel() == 0 for c in chunks)


def test_stream_rejects_batches_and_bad_omega(tiny):
    model, processor, inputs = tiny
    batch = {k: torch.cat([v, v]) for k, v in inputs.items()}
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate_stream(**batch)
    with pytest.raises(ValueError, match="chunk_size"):
        model.generate_stream(**inputs, chunk_size=0)


def test_unit_decoder_cache_matches_full_recompute_over_many_steps(tiny):
    """The doubling cache grows several times over 40 steps; units must equal the one-pass computation."""
    model, _, _ = tiny
    torch.manual_seed(5)
    states = torch.randn(40, model.config.text_config.hidden_size)
    state = model.init_unit_stream(1, eos_token_id=None)
    with torch.no_grad():
        for step in range(states.shape[0]):
            model._unit_stream_step(state, None, states[step][None, None])
    assert state.cache.get_seq_length() == 40 * model.config.unit_decoder_upsample_factor
    assert state.units[0] == model.unit_decoder.predict(states)


def test_text_only_generation_matches(tiny):
    model, _, inputs = tiny
    full = model.generate(**inputs, do_sample=False, max_new_tokens=12, return_dict_in_generate=True)
    text_only = model.generate(**inputs, do_sample=False, max_new_tokens=12, return_units=False,
                               return_dict_in_generate=True)
    assert torch.equal(full.sequences, text_only.sequences) and text_only.units is None
    with pytest.raises(ValueError, match="return_audio=True needs the units"):
        model.generate(**inputs, max_new_tokens=2, return_units=False, return_audio=True)


def test_incremental_text_never_splits_words_or_characters(tiny):
    from llama_omni_hf.modeling_llama_omni import _IncrementalText, _is_wide

    _, processor, _ = tiny
    sentence = "Héllo wörld, 日本語 is spoken in Tokyo 🙂 and naïve café crème brûlée " * 3
    ids = processor.tokenizer(sentence, add_special_tokens=False).input_ids
    text = _IncrementalText(processor.tokenizer)
    pieces = [text.add([token]) for token in ids]
    pieces.append(text.flush())
    assert "".join(pieces) == processor.tokenizer.decode(ids)
    words = sentence.split(" ")
    for piece in filter(None, pieces[:-1]):
        assert "\ufffd" not in piece
        # each update ends at a word boundary: it is a run of whole words (CJK may stream per character)
        assert all(word in words or (all(_is_wide(c) for c in word) and any(word in w for w in words))
                   for word in piece.strip().split(" ")), piece


def test_iterator_closed_before_the_first_chunk_never_generates(tiny):
    model, processor, inputs = tiny
    counter = CountingStreamer()
    stream = model.generate_stream(**inputs, tokenizer=processor.tokenizer, max_new_tokens=400, streamer=counter)
    stream.close()
    assert counter.tokens == 0
    assert not any(t.name == "llama-omni-generate" and t.is_alive() for t in threading.enumerate())


def test_stream_rejects_several_answers(tiny):
    model, processor, inputs = tiny
    with pytest.raises(ValueError, match="num_return_sequences and num_beams must be 1"):
        model.generate_stream(**inputs, do_sample=True, num_return_sequences=2)


def test_wrong_feature_shape_is_a_clear_error(tiny):
    model, _, inputs = tiny
    with pytest.raises(ValueError, match=r"input_features must be \[n_audio, 128, 3000\].*got \[1, 80, 3000\]"):
        model(input_ids=inputs["input_ids"], input_features=torch.zeros(1, 80, 3000))


def test_vocoder_stays_in_float32_when_the_model_is_half(tmp_path):
    """The original vocoder runs in fp32; in fp16 rounded durations flip and the answer's length changes."""
    from transformers import AutoModel, AutoProcessor

    from llama_omni_hf.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "tiny")
    model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.vocoder.parameters()} == {torch.float32}
    out = model.generate(**processor(audio=synthesize("Hello there."), sampling_rate=16000, return_tensors="pt"),
                         max_new_tokens=6,
                         return_dict_in_generate=True)
    assert out.audio[0].dtype == torch.float32 and len(out.audio[0]) > 0


def test_incremental_text_releases_cjk_per_character(tiny):
    from llama_omni_hf.modeling_llama_omni import _IncrementalText

    _, processor, _ = tiny
    ids = processor.tokenizer("東京は日本の首都です", add_special_tokens=False).input_ids
    text = _IncrementalText(processor.tokenizer)
    pieces = [text.add([token]) for token in ids]
    assert sum(1 for p in pieces if p) >= 5  # no spaces, yet it streams
    assert "".join(pieces) + text.flush() == "東京は日本の首都です"


def test_audio_needs_a_dict_output(tiny):
    model, _, inputs = tiny
    with pytest.raises(ValueError, match="return_audio=True needs return_dict_in_generate=True"):
        model.generate(**inputs, max_new_tokens=2, return_audio=True)
