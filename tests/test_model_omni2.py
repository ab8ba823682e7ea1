"""LlamaOmni2ForConditionalGeneration against independent computations.

References written here from the spec (`llama-omni2.md` 1.4, 2.1-2.5, 2.9, 3), never from the model code: the
fusion r*g + e*(1-g) in float64, the original's read/write loop of spec 2.4 as its pseudo-code reads (a growing
`tts_ctx` built by concatenation, every write a fresh greedy generate that re-runs the TTS Qwen2 over the whole
context), transformers 4.43's top-k / top-p warpers and `multinomial` draw, the unit regex of 2.5, the prompt cut
of Q9 and the answer-only repetition penalty of Q13 as plain loops. Then generate end to end on the tiny model:
KV-cached TTS == re-prefill, batch == alone, the hub copy in a clean process, and the errors a caller can hit.
Streaming is in tests/test_streaming_omni2.py.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llama_omni_hf import modeling_llama_omni2
from llama_omni_hf.configuration_llama_omni2 import LlamaOmni2Config
from llama_omni_hf.modeling_llama_omni2 import LlamaOmni2ForConditionalGeneration, sample_tts_token
from llama_omni_hf.tiny import build_tiny_omni2_checkpoint, build_tiny_omni2_model_and_processor

# the tiny Qwen tokenizers (llama_omni_hf/tiny_tokenizer.py): <|endoftext|> 768 (also the TTS's EOS and the pad),
# <|im_end|> 770 (the LLM's EOS), <sep> 790 (where the LLM has <speech>), units <0>.. from 791
ENDOFTEXT, IM_END, SEP, UNIT0 = 768, 770, 790, 791
UNITS = 6561
MAX_NEW = 8


# ----------------------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------------------


def _w(linear):
    return linear.weight.detach().double()


def _b(linear):
    return linear.bias.detach().double()


def reference_fuse(tts, states, ids):
    """Spec 1.4 in float64: r = Linear(H,2H) -> ReLU -> Linear(2H,D) of the LLM state, e = the TTS embedding of
    the text id, g = sigmoid(gate([r; e])), fused = r*g + e*(1-g)."""
    first, second = tts.input_proj[0], tts.input_proj[2]
    r = torch.relu(states.detach().double() @ _w(first).T + _b(first)) @ _w(second).T + _b(second)
    e = tts.model.embed_tokens.weight.detach().double()[torch.as_tensor(ids, dtype=torch.long)]
    g = torch.sigmoid(torch.cat([r, e], dim=-1) @ _w(tts.gate).T + _b(tts.gate))
    return r * g + e * (1 - g)


@dataclass
class RefWrite:
    at: int  # text tokens read so far (the original's `cur`)
    final: bool
    context: torch.Tensor  # tts_ctx the write's generate starts from
    ids: list
    logits: torch.Tensor  # [n, V]


@torch.no_grad()
def original_read_write(model, states, tokens, read, write, final_max):
    """Spec 2.4, as its pseudo-code reads: `states[k]` predicted `tokens[k]` (states[0] is the last prompt
    position); every `read` tokens and at the end, the fused (state, token) pairs are concatenated onto
    `tts_ctx` (then `<sep>` at the end), and a greedy generate over `inputs_embeds=tts_ctx` writes up to `write`
    ids (`final_max` at the end), each step re-running the TTS over the WHOLE context from position 0 (no cache),
    stopping after the TTS EOS; all written ids, EOS included, are then appended to `tts_ctx`."""
    tts, cfg = model.tts, model.config
    table = tts.model.embed_tokens.weight.detach()

    def embed(ids):
        return table[torch.tensor(ids, dtype=torch.long)]

    tts_ctx, cur, last, writes = None, 0, 0, []
    for t in range(1, len(tokens) + 1):
        cur += 1
        finished = t == len(tokens)
        if cur % read == 0 or finished:
            x = reference_fuse(tts, states[last:cur], tokens[last:cur]).float()
            tts_ctx = x if tts_ctx is None else torch.cat([tts_ctx, x])
            if finished:
                tts_ctx = torch.cat([tts_ctx, embed([cfg.tts_sep_token_id])])
            gen, logits = [], []
            for _ in range(final_max if finished else write):
                full = torch.cat([tts_ctx, embed(gen)])
                hidden = tts.model(inputs_embeds=full[None], use_cache=False).last_hidden_state[0, -1]
                logits.append(tts.lm_head(hidden).float())
                gen.append(int(logits[-1].argmax()))
                if gen[-1] == cfg.tts_eos_token_id:
                    break
            writes.append(RefWrite(cur, finished, tts_ctx.clone(), gen, torch.stack(logits)))
            tts_ctx = torch.cat([tts_ctx, embed(gen)])
            last = cur
    return writes, tts_ctx


def top_p_numpy(scores, top_p, min_tokens_to_keep=1):
    """transformers 4.43 TopPLogitsWarper in numpy: sort ascending, cumulative softmax, remove the tokens whose
    cumulative probability is <= 1 - top_p, always keep the last `min_tokens_to_keep` (the most likely)."""
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    finite = np.isfinite(ordered)
    probs = np.zeros_like(ordered)
    probs[finite] = np.exp(ordered[finite] - ordered[finite].max())
    cumulative = np.cumsum(probs / probs.sum())
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted[-min_tokens_to_keep:] = False
    remove = np.zeros_like(remove_sorted)
    remove[order] = remove_sorted
    return np.where(remove, -np.inf, scores)


def hand_draw(logits, generator, temperature=1.0, top_k=50, top_p=1.0):
    """4.43's `_sample` for one row: temperature, top-k (keep the k largest), top-p, softmax, one multinomial."""
    scores = (logits.double() / temperature).numpy()
    if top_k:
        keep = np.zeros(scores.shape, dtype=bool)
        keep[np.argsort(-scores, kind="stable")[:top_k]] = True
        scores = np.where(keep, scores, -np.inf)
    if top_p < 1.0:
        scores = top_p_numpy(scores, top_p)
    allowed = torch.from_numpy(np.isfinite(scores))
    masked = (logits / temperature if temperature != 1.0 else logits).masked_fill(~allowed, float("-inf"))
    return int(torch.multinomial(masked.softmax(-1), 1, generator=generator)[0]), allowed


def regex_units(text):
    """Spec 2.5: every decimal number in the decoded text."""
    return [int(n) for n in re.findall(r"\d+", text)]


def answer_of(sequences, row, prompt_length, pad_id):
    answer = sequences[row, prompt_length:].tolist()
    while answer and answer[-1] == pad_id:
        answer.pop()
    return answer


def prompt_embeddings(model, inputs):
    """The spliced prompt as the LLM receives it in a plain forward (captured, not rebuilt)."""
    captured = {}
    hook = model.model.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return captured["inputs_embeds"]


# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------


def sharpen(model, seed=0, scale=10.0):
    """At init (std 0.02, unit norms) the tiny LLM's state is its last input's embedding and the tied head
    repeats that token forever ("\\n"), and the TTS barely sees its context. Random norm weights and larger
    matrices in both Qwen2s give varied answers and context-dependent speech, and a gate away from 1/2 makes
    the fusion matter: wrong pairings, pre-norm states or a lost context then change the ids."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for qwen in (model.model, model.tts.model):
            qwen.norm.weight.copy_(1 + 0.5 * torch.randn(qwen.norm.weight.shape, generator=generator))
            for name, param in qwen.layers.named_parameters():
                if "layernorm" in name:
                    param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
                else:
                    param.mul_(scale)
        for linear in (model.tts.input_proj[0], model.tts.input_proj[2], model.tts.gate):
            linear.weight.mul_(3.0)
            linear.bias.copy_(0.5 * torch.randn(linear.bias.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def tiny():
    """(model, processor, tts_tokenizer) straight from the builder (read-only)."""
    return build_tiny_omni2_model_and_processor(token2wav=True, seed=0)


@pytest.fixture(scope="module")
def sharp(tiny):
    return sharpen(copy.deepcopy(tiny[0]))


@pytest.fixture(scope="module")
def processor(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def inputs(processor, speech):
    return processor(audio=speech["france"], sampling_rate=16000, return_tensors="pt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_omni2_checkpoint(tmp_path_factory.mktemp("omni2") / "llama-omni2-tiny")


# ----------------------------------------------------------------------------------------------------------
# fusion
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_fusion_is_the_gated_sum(sharp):
    tts = sharp.tts
    states = torch.randn(7, sharp.config.text_config.hidden_size) * 3
    ids = [5, 100, IM_END, 300, 700, ENDOFTEXT, 12]
    expected = reference_fuse(tts, states, ids)
    fused = tts.fuse(states, torch.tensor(ids))
    assert fused.shape == (7, sharp.config.tts_config.hidden_size) and fused.dtype == torch.float32
    torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-5)
    # the gate is really in use (neither end saturated everywhere) and r*g + e*(1-g), not the other way round
    first, second = tts.input_proj[0], tts.input_proj[2]
    r = torch.relu(states.double() @ _w(first).T + _b(first)) @ _w(second).T + _b(second)
    e = tts.model.embed_tokens.weight.double()[ids]
    g = torch.sigmoid(torch.cat([r, e], -1) @ _w(tts.gate).T + _b(tts.gate))
    assert 0.1 < float(g.mean()) < 0.9
    assert (fused.double() - (e * g + r * (1 - g))).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------------
# the read/write loop, driven directly
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recording(model):
    """Records each write (the tokens it reads, final or not, the ids it writes), every TTS forward's input and
    cache length, and every TTS logit vector."""
    log = SimpleNamespace(writes=[], calls=[], logits=[])
    original = model._tts_write

    def write(state, index, final):
        row = state.rows[index]
        before, first_call = len(row.tts_token_ids), len(log.calls)
        pending = list(row.tokens)
        original(state, index, final)
        log.writes.append(dict(pending=pending, final=final, ids=row.tts_token_ids[before:], first_call=first_call))

    def before_forward(module, args, kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        log.calls.append((kwargs["inputs_embeds"][0].detach().clone(), 0 if cache is None else cache.get_seq_length()))

    hooks = [
        model.tts.model.register_forward_pre_hook(before_forward, with_kwargs=True),
        model.tts.lm_head.register_forward_hook(lambda m, i, out: log.logits.append(out.detach().float().clone())),
    ]
    model._tts_write = write
    try:
        yield log
    finally:
        del model._tts_write
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def drive(model, states, tokens, eos=(IM_END, ENDOFTEXT), feed_last=False, **options):
    """What generate does, by hand: the prefill hands over the last prompt state; LLM step t feeds y_t and hands
    over the state at y_t; after the stop, finish_tts_stream reads the last token (never fed to the LLM). With
    `feed_last` the last token is fed through a step first, as a batch row that stopped early on its EOS."""
    state = model.init_tts_stream(1, list(eos), tts_do_sample=False, **options)
    model._tts_stream_step(state, None, states[0][None])
    for t in range(1, len(tokens)):
        model._tts_stream_step(state, torch.tensor([[tokens[t - 1]]]), states[t][None])
    if feed_last:
        model._tts_stream_step(state, torch.tensor([[tokens[-1]]]), torch.zeros_like(states[0])[None])
    model.finish_tts_stream(state, torch.tensor([tokens]))
    return state


def fake_answer(model, n, eos, seed):
    generator = torch.Generator().manual_seed(seed)
    states = 2 * torch.randn(n, model.config.text_config.hidden_size, generator=generator)
    tokens = torch.randint(0, 760, (n,), generator=generator).tolist()
    if eos:
        tokens[-1] = IM_END
    return states, tokens


SCHEDULES = {
    # name: (n text tokens, ends with the LLM's EOS, read_write, final cap, expected [(tokens read, final)] and
    # ids per write: W for each write, the cap for the final flush (no TTS EOS with these weights))
    "eos": (10, True, None, None, [(3, False), (6, False), (9, False), (10, True)], [10, 10, 10, 60]),
    "max_new_tokens": (9, False, None, None, [(3, False), (6, False), (9, True)], [10, 10, 60]),
    "read_write": (7, False, (2, 4), 13, [(2, False), (4, False), (6, False), (7, True)], [4, 4, 4, 13]),
}


@pytest.mark.parametrize("reprefill", [False, True], ids=["kv-cache", "reprefill"])
@pytest.mark.parametrize("case", list(SCHEDULES))
def test_read_write_schedule_and_context_match_the_original_loop(sharp, case, reprefill):
    n, eos, read_write, cap, schedule, lengths = SCHEDULES[case]
    model = copy.deepcopy(sharp) if cap else sharp
    if cap:
        model.config.tts_final_max_new_tokens = cap
    read, write = read_write or (3, 10)
    final_max = cap or model.config.tts_final_max_new_tokens
    assert final_max == (13 if cap else 60)  # the tiny config's flush (1024 in the release, checked below)
    states, tokens = fake_answer(model, n, eos, seed=n)
    reference, full_context = original_read_write(model, states, tokens, read, write, final_max)
    assert [(w.at, w.final) for w in reference] == schedule
    assert [len(w.ids) for w in reference] == lengths

    options = {"read_write": read_write} if read_write else {}
    with recording(model) as log:
        state = drive(model, states, tokens, tts_reprefill=reprefill, **options)
    # WHEN: every R tokens and once at the end (a last group of R tokens is one final write, not two)
    read_so_far = np.cumsum([len(w["pending"]) for w in log.writes]).tolist()
    assert list(zip(read_so_far, [w["final"] for w in log.writes])) == schedule
    assert [w["pending"] for w in log.writes] == [tokens[a:b] for a, b in zip([0] + read_so_far, read_so_far)]
    # WHAT: the same ids, write by write, and the same logits (fp32 noise)
    assert [w["ids"] for w in log.writes] == [w.ids for w in reference]
    assert state.rows[0].tts_token_ids == [i for w in reference for i in w.ids]
    expected_logits = torch.cat([w.logits for w in reference])
    assert len(log.logits) == len(expected_logits)
    scale = float(expected_logits.abs().max())
    torch.testing.assert_close(torch.stack(log.logits), expected_logits, rtol=0, atol=2e-5 * scale)
    # ...because the TTS saw the original's context
    if reprefill:  # each write starts over the whole context from position 0
        for ours, ref in zip(log.writes, reference):
            fed, cached = log.calls[ours["first_call"]]
            assert cached == 0
            torch.testing.assert_close(fed, ref.context, rtol=1e-5, atol=1e-5)
        fed_rows = log.calls[log.writes[-1]["first_call"]][0]
    else:  # the cache continues the positions: everything fed, in order, is the original's final context
        lengths_fed = [len(x) for x, _ in log.calls]
        assert [c for _, c in log.calls] == np.cumsum([0] + lengths_fed[:-1]).tolist()
        fed_rows = torch.cat([x for x, _ in log.calls])
        torch.testing.assert_close(fed_rows, full_context[:-1], rtol=1e-5, atol=1e-5)
    # <sep> once, right after the last group's fused pairs, whose last pair is (state that predicted it, y_N):
    # with an LLM EOS that is the EOS itself, fed to the TTS
    sep = model.tts.model.embed_tokens.weight[SEP]
    at_sep = (fed_rows == sep).all(-1).nonzero().flatten().tolist()
    assert at_sep == [len(reference[-1].context) - 1]
    torch.testing.assert_close(fed_rows[at_sep[0] - 1].double(), reference_fuse(model.tts, states[-1:], tokens[-1:])[0],
                               rtol=1e-5, atol=1e-5)
    if eos:  # a batch row that stopped early reads its EOS through a step: the same writes
        again = drive(model, states, tokens, feed_last=True, tts_reprefill=reprefill, **options)
        assert again.rows[0].tts_token_ids == state.rows[0].tts_token_ids


@pytest.mark.parametrize("reprefill", [False, True], ids=["kv-cache", "reprefill"])
def test_tts_eos_ends_a_write_and_stays_in_the_context(sharp, reprefill):
    """Swap the head rows of the TTS EOS and of the 3rd id of the 2nd write: greedy decoding then stops that
    write with EOS at the same step; the EOS embedding is read before the next fused pairs, reading goes on."""
    states, tokens = fake_answer(sharp, 10, True, seed=10)
    baseline, _ = original_read_write(sharp, states, tokens, 3, 10, 60)
    swapped_id = baseline[1].ids[2]
    assert ENDOFTEXT not in sum((w.ids for w in baseline), [])
    assert swapped_id not in baseline[0].ids + baseline[1].ids[:2]
    model = copy.deepcopy(sharp)
    with torch.no_grad():
        head = model.tts.lm_head.weight
        head[[ENDOFTEXT, swapped_id]] = head[[swapped_id, ENDOFTEXT]].clone()
    reference, full_context = original_read_write(model, states, tokens, 3, 10, 60)
    assert reference[1].ids == baseline[1].ids[:2] + [ENDOFTEXT]
    with recording(model) as log:
        state = drive(model, states, tokens, tts_reprefill=reprefill)
    assert [w["ids"] for w in log.writes] == [w.ids for w in reference]
    assert [len(w["pending"]) for w in log.writes] == [3, 3, 3, 1]  # reading went on after the EOS
    eos_row = model.tts.model.embed_tokens.weight[ENDOFTEXT]
    third = log.calls[log.writes[2]["first_call"]][0]
    if reprefill:
        torch.testing.assert_close(third, reference[2].context, rtol=1e-5, atol=1e-5)
        assert torch.equal(third[len(reference[1].context) + 2], eos_row)
    else:
        assert torch.equal(third[0], eos_row)  # the held-back EOS comes first, then the 3 fused pairs
        assert len(third) == 4
        torch.testing.assert_close(torch.cat([x for x, _ in log.calls]), full_context[:-1], rtol=1e-5, atol=1e-5)
    assert ENDOFTEXT in state.rows[0].tts_token_ids
    assert len(state.rows[0].units) == len([i for i in state.rows[0].tts_token_ids if i >= UNIT0])


def test_state_defaults_follow_the_config_and_the_release(sharp):
    state = sharp.init_tts_stream(1, IM_END)
    assert (state.read, state.write, state.final_max_new_tokens) == (3, 10, 60)
    assert (state.do_sample, state.temperature, state.top_k, state.top_p) == (True, 1.0, 50, 1.0)
    assert state.eos_token_ids == {IM_END} and state.unit_parse == "offset"
    release = LlamaOmni2Config()  # the 0.5B release: (3,10), a 1024-token flush, implicit top-k 50 at T=1
    assert release.read_write == (3, 10) and release.tts_final_max_new_tokens == 1024
    sampling = (release.tts_do_sample, release.tts_temperature, release.tts_top_k, release.tts_top_p)
    assert sampling == (True, 1.0, 50, 1.0)
    assert (release.tts_sep_token_id, release.tts_eos_token_id, release.unit_token_offset) == (151665, 151643, 151666)


# ----------------------------------------------------------------------------------------------------------
# TTS sampling
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logits():
    return 3 * torch.randn(7352, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_is_top_k_50_softmax_and_one_multinomial(logits, temperature):
    for seed in range(40):
        ours_gen, ref_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        ours = int(sample_tts_token(logits, True, temperature=temperature, top_k=50, generator=ours_gen))
        expected, allowed = hand_draw(logits, ref_gen, temperature=temperature, top_k=50)
        assert ours == expected, seed
        assert allowed.sum() == 50 and allowed[ours]
        assert torch.equal(ours_gen.get_state(), ref_gen.get_state())  # exactly one draw of the same size


@pytest.mark.parametrize(("top_k", "top_p"), [(50, 0.9), (50, 0.3), (0, 0.95)])
def test_top_p_matches_transformers_4_43_warper(logits, top_k, top_p):
    kept = set()
    for seed in range(60):
        ours_gen, ref_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        ours = int(sample_tts_token(logits, True, top_k=top_k, top_p=top_p, generator=ours_gen))
        expected, allowed = hand_draw(logits, ref_gen, top_k=top_k, top_p=top_p)
        assert ours == expected, seed
        kept.add(ours)
    assert kept <= set(allowed.nonzero().flatten().tolist()) and 1 <= int(allowed.sum()) < (top_k or 7352)
    assert len(kept) > 1 or top_p < 0.5


def test_greedy_is_argmax_and_draws_nothing(logits):
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    assert int(sample_tts_token(logits, False, generator=generator)) == int(np.argmax(logits.numpy()))
    assert torch.equal(generator.get_state(), before)


# ----------------------------------------------------------------------------------------------------------
# TTS ids -> units
# ----------------------------------------------------------------------------------------------------------


def test_offset_parsing_keeps_unit_ids_only(sharp):
    ids = [UNIT0 + 5, 20, UNIT0, ENDOFTEXT, SEP, UNIT0 + UNITS - 1, 100, UNIT0 + 42]
    assert sharp.tts_ids_to_units(ids, "offset") == [5, 0, UNITS - 1, 42]
    assert sharp.tts_ids_to_units([], "offset") == []


def test_regex_parsing_reads_numbers_of_the_decoded_text(sharp, tiny):
    tts_tokenizer = tiny[2]
    digit = {str(d): tts_tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
    the = tts_tokenizer.convert_tokens_to_ids("Ġthe")

    def unit(k):
        return UNIT0 + k

    # a digit text token between unit tokens becomes a unit; specials and digit-free text vanish
    ids = [unit(12), digit["5"], unit(7), SEP, ENDOFTEXT, IM_END, the, unit(6560), digit["9"], digit["7"]]
    assert sharp.tts_ids_to_units(ids, "regex", tts_tokenizer) == [12, 5, 7, 6560, 97]
    assert regex_units(tts_tokenizer.decode(ids, skip_special_tokens=True)) == [12, 5, 7, 6560, 97]
    # a number past the 6561 units (the original's flow would index out of range) is dropped, with a warning
    with pytest.warns(UserWarning, match="6561"):
        units = sharp.tts_ids_to_units([unit(3), digit["7"], digit["0"], digit["0"], digit["0"], unit(4)], "regex",
                                       tts_tokenizer)
    assert units == [3, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sharp.tts_ids_to_units([unit(1), unit(2)], "regex", tts_tokenizer) == [1, 2]


def test_regex_units_of_generate_are_the_original_offline_parse(sharp, tiny, inputs, monkeypatch):
    """Offline, the original joins every write's decoded text and parses the joined string once (spec 2.4-2.5,
    Q15): digit text tokens on both sides of a write boundary ("5" | "3") make ONE number, 53. A scripted
    stand-in for the sampler puts them there."""
    tts_tokenizer = tiny[2]
    five, three = tts_tokenizer.convert_tokens_to_ids("5"), tts_tokenizer.convert_tokens_to_ids("3")
    script = [UNIT0 + k for k in range(8)] + [UNIT0 + 8, five] + [three] + [UNIT0 + 100 + k for k in range(200)]
    drawn = []

    def scripted(logits, *args, **kwargs):
        drawn.append(script[len(drawn)])
        return torch.tensor(drawn[-1])

    monkeypatch.setattr(modeling_llama_omni2, "sample_tts_token", scripted)
    options = dict(max_new_tokens=MAX_NEW, eos_token_id=[1], return_dict_in_generate=True, return_audio=False)
    out = sharp.generate(**inputs, unit_parse="regex", tts_tokenizer=tts_tokenizer, **options)
    ids = out.tts_token_ids[0].tolist()
    assert ids == script[: len(ids)] and len(ids) == 80
    joined = "".join(tts_tokenizer.decode(ids[a:b], skip_special_tokens=True) for a, b in ((0, 10), (10, 20), (20, 80)))
    expected = [n for n in regex_units(joined) if n < UNITS]
    assert expected[:11] == list(range(9)) + [53, 100]
    assert out.units[0].tolist() == expected
    drawn.clear()
    offset = sharp.generate(**inputs, **options)
    assert offset.units[0].tolist() == [i - UNIT0 for i in script[:80] if i >= UNIT0]


# ----------------------------------------------------------------------------------------------------------
# the LLM side: prompt cut (Q9), repetition penalty (Q13), pairing with the TTS (Q2)
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_long_prompt_keeps_its_last_positions_with_a_warning(sharp, inputs):
    length = inputs["input_ids"].shape[1]
    limit = length - 29
    model = copy.deepcopy(sharp)
    model.config.max_prompt_length = limit
    embeds = prompt_embeddings(model, inputs)
    expected = model(inputs_embeds=embeds[:, -limit:]).logits[:, -1]
    uncut = model(inputs_embeds=embeds).logits[:, -1]
    assert (expected - uncut).abs().max() > 1e-3  # the cut changes the answer's first logits
    with pytest.warns(UserWarning, match=rf"{length} positions .*only its last {limit}"):
        out = model.generate(**inputs, max_new_tokens=2, output_logits=True, return_dict_in_generate=True,
                             return_units=False)
    torch.testing.assert_close(out.logits[0], expected, rtol=1e-4, atol=1e-4)
    assert out.sequences[0, :length].tolist() == inputs["input_ids"][0].tolist()  # the prompt as given
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = sharp.generate(**inputs, max_new_tokens=1, output_logits=True, return_dict_in_generate=True,
                              return_units=False)
    assert not [w for w in caught if "max_prompt_length" in str(w.message)]
    torch.testing.assert_close(full.logits[0], uncut, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_repetition_penalty_applies_to_answer_tokens_only(tiny, inputs):
    """The untouched tiny model repeats "\\n" (the prompt's last token): a penalty that counted the prompt would
    already change the first step."""
    model = tiny[0]
    penalty, steps = 3.0, 6
    embeds = prompt_embeddings(model, inputs)
    table = model.model.embed_tokens.weight
    answer, scores = [], []
    for _ in range(steps):
        full = torch.cat([embeds, table[answer][None]], dim=1) if answer else embeds
        logits = model(inputs_embeds=full).logits[0, -1].clone()
        for token in set(answer):
            logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
        scores.append(logits)
        answer.append(int(logits.argmax()))
    out = model.generate(**inputs, max_new_tokens=steps, repetition_penalty=penalty, eos_token_id=[1],
                         output_scores=True, return_dict_in_generate=True, return_units=False)
    length = inputs["input_ids"].shape[1]
    assert out.sequences[0, length:].tolist() == answer
    assert len(set(answer)) > 1 and answer[0] == int(inputs["input_ids"][0, -1])  # unpenalised first step
    torch.testing.assert_close(torch.cat(out.scores), torch.stack(scores), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_generate_feeds_the_tts_the_post_norm_state_that_predicted_each_token(sharp, inputs):
    """End to end against spec 2.4 with the LLM's states from ONE plain forward over prompt + answer."""
    out = sharp.generate(**inputs, max_new_tokens=MAX_NEW, eos_token_id=[1], tts_do_sample=False,
                         return_dict_in_generate=True, return_audio=False)
    length = inputs["input_ids"].shape[1]
    answer = out.sequences[0, length:].tolist()
    assert len(answer) == MAX_NEW and len(set(answer)) > 3
    embeds = prompt_embeddings(sharp, inputs)
    full = torch.cat([embeds, sharp.model.embed_tokens.weight[answer][None]], dim=1)
    hidden = sharp.model(inputs_embeds=full).last_hidden_state[0]  # after the final norm
    states = hidden[length - 1 : length - 1 + MAX_NEW]
    reference, _ = original_read_write(sharp, states, answer, 3, 10, 60)
    assert out.tts_token_ids[0].tolist() == [i for w in reference for i in w.ids]
    assert out.units[0].tolist() == [i - UNIT0 for w in reference for i in w.ids if i >= UNIT0]
    # the pre-norm states, or the states at each token instead of before it, give other speech (so the check
    # above tells them apart)
    captured = []
    hook = sharp.model.norm.register_forward_hook(lambda m, args, out: captured.append(args[0][0]))
    try:
        sharp.model(inputs_embeds=full)
    finally:
        hook.remove()
    for wrong_states in (captured[0][length - 1 : length - 1 + MAX_NEW], hidden[length : length + MAX_NEW]):
        wrong, _ = original_read_write(sharp, wrong_states, answer, 3, 10, 60)
        assert [i for w in wrong for i in w.ids] != out.tts_token_ids[0].tolist()


# ----------------------------------------------------------------------------------------------------------
# generate end to end
# ----------------------------------------------------------------------------------------------------------


def test_kv_cached_tts_equals_the_original_reprefill(sharp, inputs):
    options = dict(max_new_tokens=7, return_dict_in_generate=True, return_audio=False)
    cached = sharp.generate(**inputs, tts_do_sample=False, **options)
    reprefill = sharp.generate(**inputs, tts_do_sample=False, tts_reprefill=True, **options)
    assert cached.tts_token_ids[0].tolist() == reprefill.tts_token_ids[0].tolist()
    assert len(cached.tts_token_ids[0]) == 10 + 10 + 60
    assert cached.units[0].tolist() == reprefill.units[0].tolist()
    seeded = [sharp.generate(**inputs, seed=5, **options),
              sharp.generate(**inputs, seed=5, tts_reprefill=True, **options),
              sharp.generate(**inputs, tts_generator=torch.Generator().manual_seed(5), **options)]
    ids = [s.tts_token_ids[0].tolist() for s in seeded]
    assert ids[0] == ids[1] == ids[2]
    assert ids[0] != cached.tts_token_ids[0].tolist()  # sampled, not greedy
    other = sharp.generate(**inputs, seed=6, **options)
    assert other.tts_token_ids[0].tolist() != ids[0]
    assert torch.equal(seeded[0].sequences, cached.sequences)  # the TTS's draws never touch the LLM's text


def test_generate_outputs_and_audio(sharp, inputs):
    out = sharp.generate(**inputs, max_new_tokens=4, tts_do_sample=False, return_dict_in_generate=True,
                         nsf_noise=False)
    assert out.sampling_rate == 24000 and sharp.sampling_rate == 24000
    assert out.units[0].dtype == torch.long and len(out.units[0]) > 0
    assert out.audio[0].dtype == torch.float32 and out.audio[0].shape == (960 * len(out.units[0]),)
    torch.testing.assert_close(out.audio[0], sharp.units_to_audio(out.units, nsf_noise=False)[0], rtol=0, atol=0)
    ids = sharp.generate(**inputs, max_new_tokens=4, tts_do_sample=False)
    assert torch.equal(ids, out.sequences)
    text_only = sharp.generate(**inputs, max_new_tokens=4, return_units=False, return_dict_in_generate=True)
    assert torch.equal(text_only.sequences, out.sequences) and text_only.units is None and text_only.audio is None


@torch.no_grad()
def test_batch_equals_each_alone(sharp, processor, speech):
    """Different audios and prompt lengths (left padding); greedy LLM and TTS. Row 0 stops early on an EOS:
    it reads that EOS, gets `<sep>` and its flush at that step, and nothing after."""
    custom = processor.apply_chat_template(
        [{"role": "system", "content": "Answer in one short sentence."},
         {"role": "user", "content": [{"type": "audio"}]}], add_generation_prompt=True)
    default = processor.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}],
                                            add_generation_prompt=True)
    texts, audios = [default, custom], [speech["france"], speech["tea"]]
    alone = [processor(audio=a, text=t, sampling_rate=16000, return_tensors="pt") for a, t in zip(audios, texts)]
    batch = processor(audio=audios, text=texts, sampling_rate=16000, return_tensors="pt")
    lengths = [a["input_ids"].shape[1] for a in alone]
    width = batch["input_ids"].shape[1]
    assert lengths[0] != lengths[1] and width == max(lengths)
    pad = processor.tokenizer.pad_token_id
    options = dict(max_new_tokens=6, tts_do_sample=False, return_dict_in_generate=True, nsf_noise=False)
    probe = [sharp.generate(**a, eos_token_id=[1], return_audio=False, **options) for a in alone]
    answers = [answer_of(p.sequences, 0, n, pad) for p, n in zip(probe, lengths)]
    stop = next(k for k in range(1, 4) if answers[0][k] not in answers[0][:k] + answers[1])
    options["eos_token_id"] = [1, answers[0][stop]]
    alone_out = [sharp.generate(**a, **options) for a in alone]
    assert answer_of(alone_out[0].sequences, 0, lengths[0], pad) == answers[0][: stop + 1]
    batch_out = sharp.generate(**batch, **options)
    for row in range(2):
        expected = answer_of(alone_out[row].sequences, 0, lengths[row], pad)
        assert answer_of(batch_out.sequences, row, width, pad) == expected
        assert batch_out.tts_token_ids[row].tolist() == alone_out[row].tts_token_ids[0].tolist()
        assert batch_out.units[row].tolist() == alone_out[row].units[0].tolist()
        torch.testing.assert_close(batch_out.audio[row], alone_out[row].audio[0], rtol=0, atol=1e-5)
    assert len(batch_out.tts_token_ids[0]) == 60 + (10 if stop + 1 > 3 else 0)  # one write per 3 tokens read
    assert batch_out.sequences[0, width + stop + 1 :].tolist() == [pad] * (5 - stop)


# ----------------------------------------------------------------------------------------------------------
# errors a caller can hit
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(read_write=(0, 10)), r"read_write.*positive"),
    (dict(read_write=(3, 2.5)), r"read_write.*positive"),
    (dict(unit_parse="x"), "unit_parse"),
    (dict(seed=1, tts_generator=torch.Generator()), "not both"),
    (dict(num_beams=2), "greedy decoding or sampling only"),
])
def test_bad_generate_arguments(sharp, inputs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sharp.generate(**inputs, max_new_tokens=2, **kwargs)


def test_audio_without_a_token_to_wave_decoder(sharp, inputs):
    model = copy.deepcopy(sharp)
    model.token2wav = None
    with pytest.raises(ValueError, match="no token-to-wave decoder"):
        model.generate(**inputs, max_new_tokens=2, return_audio=True, return_dict_in_generate=True)
    out = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True)
    assert out.audio is None and out.sampling_rate is None and len(out.units[0]) > 0
    chunks = list(model.generate_stream(**inputs, max_new_tokens=2))
    assert all(c.audio.numel() == 0 and c.sampling_rate is None for c in chunks)


def test_stream_rejects_batches(sharp, inputs):
    batch = {k: torch.cat([v, v]) for k, v in inputs.items()}
    with pytest.raises(ValueError, match="batch size 1"):
        sharp.generate_stream(**batch)
    with pytest.raises(ValueError, match="num_return_sequences and num_beams must be 1"):
        sharp.generate_stream(**inputs, num_beams=2)


def test_loading_errors(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModel

    # a repo without the TTS weights
    no_tts = tmp_path / "no-tts"
    shutil.copytree(checkpoint, no_tts)
    weights = load_file(no_tts / "model.safetensors")
    dropped = [k for k in weights if k.startswith("tts.")]
    assert dropped
    save_file({k: v for k, v in weights.items() if not k.startswith("tts.")}, no_tts / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"lacks {len(dropped)} weights .*tts\..*convert_llama_omni2"):
        LlamaOmni2ForConditionalGeneration.from_pretrained(no_tts)
    with pytest.raises(ValueError, match=rf"lacks {len(dropped)} weights"):
        AutoModel.from_pretrained(no_tts, trust_remote_code=True)
    # an original release config (model_type omni2_speech2s_qwen2)
    original = tmp_path / "original"
    shutil.copytree(checkpoint, original)
    config = json.loads((original / "config.json").read_text())
    config.update(model_type="omni2_speech2s_qwen2", stream_params="(3,10)",
                  speech_generator=config.pop("tts_config"))
    (original / "config.json").write_text(json.dumps(config))
    for load in (lambda: AutoConfig.from_pretrained(original, trust_remote_code=True),
                 lambda: LlamaOmni2Config.from_pretrained(original)):
        with pytest.raises(ValueError, match=r"ORIGINAL LLaMA-Omni2 release.*convert_llama_omni2"):
            load()
    # unit_parse="regex" without the tts_tokenizer/ folder
    no_tokenizer = tmp_path / "no-tts-tokenizer"
    shutil.copytree(checkpoint, no_tokenizer)
    shutil.rmtree(no_tokenizer / "tts_tokenizer")
    model = LlamaOmni2ForConditionalGeneration.from_pretrained(no_tokenizer)
    with pytest.raises(ValueError, match=r"tts_tokenizer.*pass `tts_tokenizer=` or use unit_parse='offset'"):
        model.init_tts_stream(1, IM_END, unit_parse="regex")
    # ...and with it, regex parsing loads it by itself
    loaded = LlamaOmni2ForConditionalGeneration.from_pretrained(checkpoint)
    regex = loaded.init_tts_stream(1, IM_END, unit_parse="regex")
    assert regex.tts_tokenizer is not None and regex.tts_tokenizer.convert_tokens_to_ids("<0>") == UNIT0


# ----------------------------------------------------------------------------------------------------------
# the hub copy in a clean process (also run on the minimum transformers: .ci/run MIN_TESTS)
# ----------------------------------------------------------------------------------------------------------

REMOTE_SCRIPT = textwrap.dedent(
    r"""
    import importlib.abc
    import sys

    class BlockLlamaOmniHf(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "llama_omni_hf" or name.startswith("llama_omni_hf."):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockLlamaOmniHf())
    try:
        import llama_omni_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("llama_omni_hf is importable: the test would prove nothing")

    import numpy as np
    import torch
    from transformers import AutoModel, AutoProcessor

    checkpoint, audio_path, out_path = sys.argv[1:4]
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    inputs = processor(audio=np.load(audio_path), sampling_rate=16000, return_tensors="pt")
    options = dict(max_new_tokens=4, tts_do_sample=False, nsf_noise=False, unit_parse="regex")
    out = model.generate(**inputs, return_dict_in_generate=True, **options)
    chunks = list(model.generate_stream(**inputs, tokenizer=processor.tokenizer, **options))
    print("sequences", tuple(out.sequences.shape), "units", tuple(out.units[0].shape), "audio",
          tuple(out.audio[0].shape), "rate", out.sampling_rate, "chunks", len(chunks))
    torch.save({
        "classes": [type(x).__module__ + "." + type(x).__name__ for x in (model, processor, model.token2wav)],
        "loaded": sorted(name for name in sys.modules if "llama_omni" in name.lower()),
        "inputs": dict(inputs), "sequences": out.sequences, "units": out.units[0], "tts_ids": out.tts_token_ids[0],
        "audio": out.audio[0], "rate": out.sampling_rate,
        "stream": {"sequences": chunks[-1].sequences, "units": torch.cat([c.units for c in chunks]),
                   "audio": torch.cat([c.audio for c in chunks]), "rates": {c.sampling_rate for c in chunks}},
    }, out_path)
    """
)


@torch.no_grad()
def test_hub_copy_runs_in_a_clean_process(checkpoint, speech, tmp_path):
    audio_path, out_path = tmp_path / "question.npy", tmp_path / "remote.pt"
    np.save(audio_path, speech["france"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    work_dir = tmp_path / "elsewhere"
    work_dir.mkdir()
    completed = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(checkpoint), str(audio_path), str(out_path)],
                               cwd=work_dir, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert re.search(r"sequences \(1, \d+\) units \(\d+,\) audio \(\d+,\) rate 24000 chunks \d+", completed.stdout)
    remote = torch.load(out_path, weights_only=False)
    assert not any(name.startswith("llama_omni_hf") for name in remote["loaded"]), remote["loaded"]
    model_class, processor_class, token2wav_class = remote["classes"]
    assert all(c.startswith("transformers_modules.") for c in remote["classes"]), remote["classes"]
    assert model_class.endswith(".LlamaOmni2ForConditionalGeneration")
    assert processor_class.endswith(".LlamaOmni2Processor") and token2wav_class.endswith(".LlamaOmni2Token2Wav")

    # the same as the package in this process
    from llama_omni_hf.processing_llama_omni2 import LlamaOmni2Processor

    model = LlamaOmni2ForConditionalGeneration.from_pretrained(checkpoint).eval()
    local_inputs = LlamaOmni2Processor.from_pretrained(checkpoint)(audio=speech["france"], sampling_rate=16000,
                                                                   return_tensors="pt")
    for key, value in local_inputs.items():
        assert torch.equal(remote["inputs"][key], value), key
    local = model.generate(**local_inputs, max_new_tokens=4, tts_do_sample=False, nsf_noise=False,
                           return_dict_in_generate=True, unit_parse="regex")
    assert torch.equal(remote["sequences"], local.sequences)
    assert remote["tts_ids"].tolist() == local.tts_token_ids[0].tolist()
    assert remote["units"].tolist() == local.units[0].tolist() and len(local.units[0]) > 0
    assert remote["units"].tolist() == [n for n in regex_units(
        model._load_tts_tokenizer().decode(local.tts_token_ids[0], skip_special_tokens=True)) if n < UNITS]
    torch.testing.assert_close(remote["audio"], local.audio[0], rtol=0, atol=1e-5)
    assert remote["rate"] == 24000
    stream = remote["stream"]
    assert torch.equal(stream["sequences"], local.sequences) and stream["rates"] == {24000}
    assert stream["audio"].shape == local.audio[0].shape


# ----------------------------------------------------------------------------------------------------------
# LLaMA-Omni (v1): the new sampling_rate field
# ----------------------------------------------------------------------------------------------------------


def test_llama_omni_reports_its_16_khz_sampling_rate(speech):
    from llama_omni_hf.tiny import build_tiny_model_and_processor

    model, processor = build_tiny_model_and_processor(vocoder=True, seed=0)
    inputs = processor(audio=speech["france"], sampling_rate=16000, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, eos_token_id=[1], return_dict_in_generate=True)
    assert out.sampling_rate == 16000
    chunks = list(model.generate_stream(**inputs, tokenizer=processor.tokenizer, max_new_tokens=4, eos_token_id=[1]))
    assert {c.sampling_rate for c in chunks} == {16000}
    text_only = model.generate(**inputs, max_new_tokens=2, eos_token_id=[1], return_dict_in_generate=True,
                               return_audio=False)
    assert text_only.sampling_rate is None
