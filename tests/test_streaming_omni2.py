"""LLaMA-Omni2's generate_stream against generate: the same text, TTS ids and units chunk by chunk, audio of the
same length and close to the offline decoding (by design not equal: the streamed flow emits frames before their
chunk is complete, see tests/test_token2wav.py), 24 kHz everywhere, and an early close that stops everything."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from llama_omni_hf.tiny import build_tiny_omni2_model_and_processor
from test_model_omni2 import UNIT0, sharpen  # the same sharpened tiny model

MAX_NEW = 8


@pytest.fixture(scope="module")
def tiny(speech):
    model, processor, _ = build_tiny_omni2_model_and_processor(token2wav=True, seed=0)
    inputs = processor(audio=speech["tea"], sampling_rate=16000, return_tensors="pt")
    return sharpen(model), processor, inputs


def snr_db(reference, x):
    error = (reference.double() - x.double()).pow(2).sum().clamp(min=1e-30)
    return 10 * math.log10(reference.double().pow(2).sum() / error)


def run_stream(model, inputs, processor, **kwargs):
    chunks = list(model.generate_stream(**inputs, tokenizer=processor.tokenizer, **kwargs))
    assert chunks and chunks[-1].is_final and not any(c.is_final for c in chunks[:-1])
    return chunks


@torch.no_grad()
def test_greedy_stream_equals_generate(tiny):
    model, processor, inputs = tiny
    options = dict(do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=[1], tts_do_sample=False, nsf_noise=False)
    offline = model.generate(**inputs, return_dict_in_generate=True, **options)
    chunks = run_stream(model, inputs, processor, **options)
    prompt_length = inputs["input_ids"].shape[1]
    answer = offline.sequences[0, prompt_length:]
    assert len(answer) == MAX_NEW
    assert torch.equal(torch.cat([c.token_ids for c in chunks]), answer)
    assert "".join(c.text for c in chunks) == processor.decode(answer, skip_special_tokens=True)
    assert torch.equal(chunks[-1].sequences, offline.sequences)
    units = torch.cat([c.units for c in chunks])
    assert torch.equal(units, offline.units[0]) and torch.equal(chunks[-1].all_units, offline.units[0])
    assert len(units) == len([i for i in offline.tts_token_ids[0].tolist() if i >= UNIT0]) > 30
    # units arrive per write: W=10 ids after 3 and 6 tokens, then the flush in pieces of W
    sizes = [len(c.units) for c in chunks if len(c.units)]
    assert len(sizes) >= 3 and max(sizes) <= 10
    # 24 kHz audio, 960 samples per unit, the same speech as the offline decoding of the same units
    assert offline.sampling_rate == 24000 and {c.sampling_rate for c in chunks} == {24000}
    streamed = torch.cat([c.audio for c in chunks])
    reference = offline.audio[0]
    assert streamed.dtype == torch.float32 and streamed.shape == reference.shape == (960 * len(units),)
    assert sum(1 for c in chunks[:-1] if len(c.audio)) >= 1  # audio before the answer is complete
    assert snr_db(reference, streamed) > 10  # about 26 dB here
    torch.testing.assert_close(reference, model.units_to_audio([units], nsf_noise=False)[0], rtol=0, atol=0)


def test_seeded_stream_equals_seeded_generate(tiny):
    model, processor, inputs = tiny
    options = dict(do_sample=False, max_new_tokens=4, eos_token_id=[1], seed=11)
    offline = model.generate(**inputs, return_dict_in_generate=True, return_audio=False, **options)
    chunks = run_stream(model, inputs, processor, **options)
    assert torch.equal(chunks[-1].sequences, offline.sequences)
    assert torch.equal(torch.cat([c.units for c in chunks]), offline.units[0])
    greedy = model.generate(**inputs, return_dict_in_generate=True, return_audio=False, tts_do_sample=False,
                            **{k: v for k, v in options.items() if k != "seed"})
    assert greedy.units[0].tolist() != offline.units[0].tolist()


class CountingStreamer(BaseStreamer):
    def __init__(self):
        self.tokens = 0

    def put(self, value):
        self.tokens += value.numel()

    def end(self):
        pass


def test_closing_the_iterator_stops_generation_without_the_final_flush(tiny):
    model, processor, inputs = tiny
    finals = []
    original = model._tts_write

    def write(state, index, final):
        finals.append(final)
        original(state, index, final)

    model._tts_write = write
    try:
        counter = CountingStreamer()
        stream = model.generate_stream(**inputs, tokenizer=processor.tokenizer, max_new_tokens=400,
                                       min_new_tokens=400, streamer=counter)
        next(stream)
        stream.close()  # joins the generation thread
    finally:
        del model._tts_write
    # (the LLM runs on the spliced embeddings: the streamer's first put, the prompt ids, is empty)
    assert 1 <= counter.tokens < 50, counter.tokens
    assert not any(final for final in finals), finals  # no <sep>, no flush
    assert not any(t.name == "llama-omni2-generate" and t.is_alive() for t in threading.enumerate())
