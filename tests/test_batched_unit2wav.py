"""BatchedUnit2Wav: many requests' LLM states -> units -> audio, batched, equal to each request run alone."""

import copy
import random
import time
from types import SimpleNamespace

import pytest
import torch

from llama_omni_hf import batched_unit2wav
from llama_omni_hf.batched_unit2wav import BatchedUnit2Wav
from llama_omni_hf.tiny import build_tiny_model_and_processor

ANSWERS = 8


@pytest.fixture(scope="module")
def answers(model, processor, speech):
    """ANSWERS real answers of different lengths: the final-norm states `generate` fed its unit stream (captured
    with a hook on the final norm), and generate's own units."""
    captured = []
    hook = model.model.norm.register_forward_hook(lambda module, args, output: captured.append(output[0, -1].clone()))
    result = []
    try:
        for i in range(ANSWERS):
            inputs = processor(audio=speech["france" if i % 2 else "tea"], sampling_rate=16000, return_tensors="pt")
            length = 41 - 5 * i  # longest first: the 1-request runs get the longest answer
            captured.clear()
            torch.manual_seed(100 + i)
            out = model.generate(**inputs, do_sample=True, temperature=1.2, max_new_tokens=length,
                                 min_new_tokens=length, return_dict_in_generate=True, return_audio=False)
            states = torch.stack(captured)
            assert len(states) == out.sequences.shape[1] - inputs["input_ids"].shape[1] == length
            result.append((states, out.units[0].tolist()))
    finally:
        hook.remove()
    return result


def units_per_state(model, states):
    """The in-process path, one state at a time: each state's new units."""
    stream = model.init_unit_stream(1, eos_token_id=None)
    per_state = []
    with torch.no_grad():
        for state in states:
            before = len(stream.units[0])
            model._unit_stream_step(stream, None, state[None, None])
            per_state.append(stream.units[0][before:])
    return per_state


@pytest.fixture(scope="module")
def references(model, answers):
    refs = []
    for states, generated in answers:
        per_state = units_per_state(model, states)
        assert sum(per_state, []) == generated  # the captured states are the ones generate decoded
        refs.append(per_state)
    assert sum(len(sum(r, [])) for r in refs) > 100  # enough units for several vocoder chunks each
    return refs


def make_schedule(seed, num_requests, lengths):
    """A random interleaving: requests arrive at different steps, send random row counts (0-4) or skip a step,
    and say finished with their last rows or in a later step. Returns a list of steps, each
    {request: (rows, final)} with rows a (start, stop) range of its states."""
    rng = random.Random(seed)
    arrival = [rng.randrange(4) for _ in range(num_requests)]
    position, done = [0] * num_requests, [False] * num_requests
    steps, t = [], 0
    while not all(done):
        step = {}
        for r in range(num_requests):
            if done[r] or t < arrival[r] or rng.random() < 0.3:
                continue
            n = min(rng.choice([0, 1, 1, 1, 2, 3, 4]), lengths[r] - position[r])
            start, position[r] = position[r], position[r] + n
            final = position[r] == lengths[r] and rng.random() < 0.6
            step[r] = ((start, position[r]), final)
            done[r] = final
        steps.append(step)
        t += 1
    return steps


def run_engine(model, answers, schedule, ids, chunk_sizes, order=None, forwards=None):
    """Drive a BatchedUnit2Wav through the schedule; per request (by index): list of (units, audio) per event.
    `forwards`: a counter of unit-decoder calls, checked to be one per step with rows."""
    engine = BatchedUnit2Wav(model)
    vocoder_calls = [0]
    hook = model.vocoder.register_forward_hook(lambda *args: vocoder_calls.__setitem__(0, vocoder_calls[0] + 1))
    try:
        outputs = _drive(engine, answers, schedule, ids, chunk_sizes, order, forwards, vocoder_calls)
    finally:
        hook.remove()
    assert engine.num_active == 0
    return outputs


def _drive(engine, answers, schedule, ids, chunk_sizes, order, forwards, vocoder_calls):
    added, outputs = set(), {r: [] for r in range(len(ids))}
    for step in schedule:
        for r in step:
            if r not in added:
                engine.add_request(ids[r], chunk_size=chunk_sizes[r])
                added.add(r)
        members = order(list(step)) if order else list(step)
        batch = {ids[r]: answers[r][0][slice(*step[r][0])] for r in members}
        finished = {ids[r] for r in members if step[r][1]}
        before, vocoded_before = (forwards or [0])[0], vocoder_calls[0]
        result = engine.step(batch, finished)
        if forwards is not None:
            has_rows = any(len(rows) for rows in batch.values())
            assert forwards[0] - before == (1 if has_rows else 0)
        assert vocoder_calls[0] - vocoded_before <= 1  # the windows due are vocoded in one call
        assert set(result) == set(batch)
        for r in members:
            outputs[r].append(result[ids[r]])
    return outputs


def reference_events(model, per_state, events, chunk_size):
    """Request alone: the in-process units for each event's states, and the vocoder's own stream of them."""
    stream = model.vocoder.init_stream(chunk_size=chunk_size)
    expected = []
    with torch.no_grad():
        for (start, stop), final in events:
            units = sum(per_state[start:stop], [])
            expected.append((units, model.vocoder.stream(stream, units, final=final)))
    return expected


def check_against_alone(model, answers, references, schedule, outputs, chunk_sizes):
    worst = 0.0
    for r, got in outputs.items():
        events = [step[r] for step in schedule if r in step]
        expected = reference_events(model, references[r], events, chunk_sizes[r])
        assert len(got) == len(expected)
        for (units, audio), (ref_units, ref_audio) in zip(got, expected):
            assert units == ref_units
            assert audio.dtype == torch.float32 and audio.shape == ref_audio.shape
            if audio.numel():
                worst = max(worst, float((audio - ref_audio).abs().max()))
        assert sum((u for u, _ in got), []) == answers[r][1]  # generate's units
    assert worst < 1e-5, worst
    return worst


def count_forwards(model):
    counter = [0]
    hook = model.unit_decoder.output_proj.register_forward_hook(lambda *args: counter.__setitem__(0, counter[0] + 1))
    return counter, hook


@pytest.mark.parametrize("num_requests", [1, 4, 8])
def test_interleaved_requests_equal_each_request_alone(model, answers, references, num_requests, monkeypatch):
    reads = []  # how the slab was read: a view of consecutive slots, or a gather
    init = batched_unit2wav._BatchCache.__init__

    def recording_init(self, *args):
        init(self, *args)
        reads.append("view" if isinstance(self.rows, slice) else "gather")

    monkeypatch.setattr(batched_unit2wav._BatchCache, "__init__", recording_init)
    chunk_sizes = [[1, 3, 10][r % 3] for r in range(num_requests)]
    for seed in range(2):
        schedule = make_schedule(seed * 10 + num_requests, num_requests, [len(s) for s, _ in answers])
        counter, hook = count_forwards(model)
        try:
            outputs = run_engine(model, answers, schedule, [f"req-{r}" for r in range(num_requests)], chunk_sizes,
                                 forwards=counter)
        finally:
            hook.remove()
        worst = check_against_alone(model, answers, references, schedule, outputs, chunk_sizes)
        vocoded = sum(1 for events in outputs.values() for _, audio in events if audio.numel())
        assert vocoded >= num_requests  # every request got audio
        print(f"{num_requests} requests, seed {seed}: {len(schedule)} steps, {counter[0]} unit-decoder forwards, "
              f"{vocoded} audio chunks, max |audio - alone| {worst:.2e}")
    if num_requests > 1:
        assert {"view", "gather"} <= set(reads)


def test_several_rows_per_request_and_step(model, answers, references):
    """Every request sends all its states at once, in one step: n_i x lambda queries each, very different n_i."""
    schedule = [{r: ((0, len(answers[r][0])), True) for r in range(4)}]
    outputs = run_engine(model, answers, schedule, list("abcd"), [10] * 4)
    check_against_alone(model, answers, references, schedule, outputs, [10] * 4)


def test_permuted_ids_and_order_give_the_same_results(model, answers, references):
    """No cross-talk: other names, another arrival order (so other slots and batch rows), same results."""
    schedule = make_schedule(7, 8, [len(s) for s, _ in answers])
    chunk_sizes = [2] * 8
    first = run_engine(model, answers, schedule, list(range(8)), chunk_sizes)
    permutation = [5, 2, 7, 0, 3, 6, 1, 4]
    second = run_engine(model, answers, schedule, [f"user-{p}" for p in permutation], chunk_sizes,
                        order=lambda members: list(reversed(members)))
    for r in range(8):
        assert [u for u, _ in first[r]] == [u for u, _ in second[r]]
        for (_, a), (_, b) in zip(first[r], second[r]):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    check_against_alone(model, answers, references, schedule, second, chunk_sizes)


def test_removed_request_does_not_affect_the_others(model, answers, references):
    """A client disconnects mid-answer: its state is freed, its slot reused by a newcomer, the others go on."""
    engine = BatchedUnit2Wav(model)
    for r in range(4):
        engine.add_request(r, chunk_size=3)
    got = {r: [] for r in range(6)}
    steps = {r: [] for r in range(6)}
    cursor = [0] * 6
    source = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5}  # request -> answer
    for t in range(40):
        if t == 3:
            engine.remove(1)  # disconnected after 3 steps
            engine.remove(1)  # twice is harmless
            assert engine.num_active == 3 and 1 not in engine
            engine.add_request(4, chunk_size=3)  # takes the freed slot
        if t == 5:
            engine.add_request(5, chunk_size=3)
        batch, finished = {}, set()
        for r in range(6):
            if r not in engine:
                continue
            states = answers[source[r]][0]
            n = 1 + (t + r) % 2
            start, cursor[r] = cursor[r], min(cursor[r] + n, len(states))
            batch[r] = states[start : cursor[r]]
            final = cursor[r] == len(states)
            if final:
                finished.add(r)
            steps[r].append(((start, cursor[r]), final))
        if not batch:
            break
        for r, output in engine.step(batch, finished).items():
            got[r].append(output)
    assert engine.num_active == 0
    with pytest.raises(KeyError, match="unknown request"):
        engine.step({1: answers[1][0][:1]})
    for r in (0, 2, 3, 4, 5):
        expected = reference_events(model, references[source[r]], steps[r], 3)
        assert [u for u, _ in got[r]] == [u for u, _ in expected]
        assert sum((u for u, _ in got[r]), []) == answers[source[r]][1]
        for (_, a), (_, b) in zip(got[r], expected):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    assert len(got[1]) == 3


def test_nan_states_do_not_leak_into_other_requests(model, answers, references):
    """Garbage in one request (NaN states) stays in it: not in its batch neighbours, not in its slot's next user."""
    engine = BatchedUnit2Wav(model)
    engine.add_request("bad")
    engine.add_request("good")
    hidden = answers[0][0].shape[1]
    good_units = []
    states = answers[2][0]
    for t in range(4):
        out = engine.step({"bad": torch.full((2, hidden), float("nan")), "good": states[2 * t : 2 * t + 2]})
        good_units += out["good"][0]
    engine.remove("bad")
    engine.add_request("next")  # reuses the bad request's slot
    out = engine.step({"good": states[8:], "next": answers[3][0]}, finished={"good", "next"})
    assert good_units + out["good"][0] == answers[2][1]
    assert out["next"][0] == answers[3][1]


def test_finished_flushes_the_vocoder_tail(model, answers):
    states, units = answers[5]
    offline = model.units_to_audio([torch.tensor(units)])[0]
    engine = BatchedUnit2Wav(model)
    engine.add_request("a", chunk_size=4)
    before = [engine.step({"a": states[t : t + 1]})["a"][1] for t in range(len(states))]
    emitted = sum(len(a) for a in before)
    hop = model.vocoder.config.code_hop_size
    assert 0 < emitted < len(offline)  # the look-ahead units (and any short chunk) wait for more
    assert engine.num_active == 1
    new_units, tail = engine.step({}, finished={"a"})["a"]
    assert new_units == [] and len(tail) > 0 and len(tail) % hop == 0
    streamed = torch.cat(before + [tail])
    assert streamed.shape == offline.shape  # every unit has its offline duration
    assert engine.num_active == 0 and "a" not in engine
    with pytest.raises(KeyError):
        engine.step({}, finished={"a"})


def test_eager_attention_matches_too(model, answers, references):
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    schedule = make_schedule(3, 4, [len(s) for s, _ in answers])
    outputs = run_engine(eager, answers, schedule, list(range(4)), [3] * 4)
    assert eager.unit_decoder.config._attn_implementation == "eager"
    check_against_alone(eager, answers, references, schedule, outputs, [3] * 4)


def test_bfloat16_unit_decoder(model, answers):
    """In bf16 (how a GPU serves it) the batched units equal the in-process bf16 path's on these answers (a bf16
    near-tie could flip under the batch's other summation order; none occurs here)."""
    half = copy.deepcopy(model)
    half.unit_decoder.to(torch.bfloat16)
    states = [s.bfloat16() for s, _ in answers]
    expected = [sum(units_per_state(half, s), []) for s in states]
    schedule = make_schedule(11, ANSWERS, [len(s) for s in states])
    outputs = run_engine(half, [(s, None) for s in states], schedule, list(range(ANSWERS)), [10] * ANSWERS)
    for r in range(ANSWERS):
        assert sum((u for u, _ in outputs[r]), []) == expected[r]
        assert all(audio.dtype == torch.float32 for _, audio in outputs[r])


def test_checkpoint_without_vocoder_gives_units_only(answers):
    model, _ = build_tiny_model_and_processor(vocoder=False, seed=1)
    states = answers[1][0]
    expected = sum(units_per_state(model, states), [])
    engine = BatchedUnit2Wav(model)
    engine.add_request(0)
    first = engine.step({0: states[:3]})
    rest = engine.step({0: states[3:]}, finished={0})
    assert first[0][0] + rest[0][0] == expected
    assert first[0][1].numel() == 0 and rest[0][1].dtype == torch.float32 and engine.sampling_rate is None


def test_clear_errors(model):
    engine = BatchedUnit2Wav(model)
    engine.add_request("a")
    with pytest.raises(ValueError, match="already active"):
        engine.add_request("a")
    with pytest.raises(ValueError, match="chunk_size"):
        engine.add_request("b", chunk_size=0)
    with pytest.raises(ValueError, match=r"states must be a tensor \[n, 64\]"):
        engine.step({"a": torch.zeros(3)})
    with pytest.raises(KeyError, match="add_request"):
        engine.step({"zzz": torch.zeros(1, 64)})
    units, audio = engine.step({"a": torch.zeros(0, 64)})["a"]  # no rows: nothing new, no forward
    assert units == [] and audio.numel() == 0 and audio.dtype == torch.float32
    small = SimpleNamespace(config=SimpleNamespace(num_embeddings=10, sampling_rate=16000))
    with pytest.raises(ValueError, match="the vocoder embeds 10 units but the unit decoder emits 1000"):
        BatchedUnit2Wav(SimpleNamespace(unit_decoder=model.unit_decoder, vocoder=small, config=model.config))


def test_timing_batched_vs_per_request_loop(model):
    """Printed only: 8 requests, one state each per step, batched engine vs the in-process path per request."""
    steps, hidden = 40, model.config.text_config.hidden_size
    states = [torch.randn(steps, hidden) for _ in range(ANSWERS)]
    engine = BatchedUnit2Wav(model)
    for r in range(ANSWERS):
        engine.add_request(r, chunk_size=10)
    start = time.perf_counter()
    for t in range(steps):
        engine.step({r: states[r][t : t + 1] for r in range(ANSWERS)},
                    finished=set(range(ANSWERS)) if t == steps - 1 else set())
    batched = time.perf_counter() - start
    streams = [model.init_unit_stream(1, eos_token_id=None) for _ in range(ANSWERS)]
    vocoders = [model.vocoder.init_stream(chunk_size=10) for _ in range(ANSWERS)]
    start = time.perf_counter()
    with torch.no_grad():
        for t in range(steps):
            for r in range(ANSWERS):
                before = len(streams[r].units[0])
                model._unit_stream_step(streams[r], None, states[r][t][None, None])
                model.vocoder.stream(vocoders[r], streams[r].units[0][before:], final=t == steps - 1)
    loop = time.perf_counter() - start
    print(f"\n{ANSWERS} requests x {steps} steps (tiny model, CPU, 1 thread): batched {1e3 * batched / steps:.1f} "
          f"ms/step, per-request loop {1e3 * loop / steps:.1f} ms/step ({loop / batched:.2f}x)")
