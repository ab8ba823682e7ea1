"""LlamaOmniForConditionalGeneration against independent computations.

References written here from the spec (not from the model code): openai-whisper's own AudioEncoder, the
adaptor as "concatenate 5 frames, Linear-ReLU-Linear", the unit decoder as hand-written Llama layers in
float64 (RMSNorm, llama3-scaled RoPE, attention with an explicit causal mask, SwiGLU, no final norm), the
CTC collapse "merge repeats, then drop blanks", and greedy decoding as a plain loop of full forwards.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import TextIteratorStreamer, TextStreamer
from transformers.models.llama import modeling_llama

from llama_omni_hf.modeling_llama_omni import LlamaOmniForConditionalGeneration, collapse_units

# Spec section 3: the unit decoder's RoPE is the LLM's (theta 500000, llama3 scaling).
ROPE_THETA = 500000.0
LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
UPSAMPLE = 25  # lambda
BLANK = 1000  # = unit_vocab_size


# ----------------------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------------------


def _w(linear):
    return linear.weight.detach().double()


def _b(linear):
    return None if linear.bias is None else linear.bias.detach().double()


def _linear(x, linear):
    y = x @ _w(linear).T
    return y if linear.bias is None else y + _b(linear)


def rope_inverse_frequencies(head_dim: int, llama3: bool = True) -> torch.Tensor:
    """RoPE frequencies, with Llama-3.1's piecewise rescaling (long wavelengths / factor, short kept,
    a linear blend between)."""
    inv = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if not llama3:
        return inv
    s = LLAMA3_SCALING
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]  # 8192
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]  # 2048
    out = []
    for f in inv.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"]
            )
            out.append((1 - smooth) * f / s["factor"] + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def _rms_norm(x, weight, eps=1e-5):
    return weight.detach().double() * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _rotate(x, inv_freq):
    """x [B, heads, T, d]; positions 0..T-1; halves rotated as in the Llama checkpoints (rotate_half)."""
    t = x.shape[2]
    angles = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None]  # [T, d/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_unit_decoder(decoder, x, num_heads, *, llama3_rope=True, causal=True, final_norm=None):
    """Spec section 3: input_proj -> Llama layers -> NO final norm -> output_proj; float64. x [B, T, H_llm]."""
    h = _linear(x.double(), decoder.input_proj)
    batch, t, dim = h.shape
    head_dim = dim // num_heads
    inv_freq = rope_inverse_frequencies(head_dim, llama3_rope)
    allowed = torch.ones(t, t, dtype=torch.bool).tril() if causal else torch.ones(t, t, dtype=torch.bool)
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        a = _rms_norm(h, layer.input_layernorm.weight)
        q, k, v = (_linear(a, p).view(batch, t, -1, head_dim).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        q, k = _rotate(q, inv_freq), _rotate(k, inv_freq)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        scores = scores.masked_fill(~allowed, float("-inf"))
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, t, dim)
        h = h + _linear(context, attn.o_proj)
        m = _rms_norm(h, layer.post_attention_layernorm.weight)
        h = h + _linear(F.silu(_linear(m, mlp.gate_proj)) * _linear(m, mlp.up_proj), mlp.down_proj)
    if final_norm is not None:  # only for the negative control: the original has none
        h = _rms_norm(h, final_norm)
    return _linear(h, decoder.output_proj)


def reference_collapse(frames):
    """CTC collapse as the spec words it: merge consecutive repeats first, then drop blanks."""
    merged = [frame for frame, _ in itertools.groupby(frames)]
    return [frame for frame in merged if frame != BLANK]


def reference_units(model, states):
    """The original's offline algorithm: the N states (one per answer token) repeated x25, the decoder over
    the whole sequence, argmax, collapse."""
    if len(states) == 0:
        return []
    upsampled = states.double().repeat_interleave(UPSAMPLE, dim=0)[None]
    logits = reference_unit_decoder(model.unit_decoder, upsampled, model.config.unit_decoder_num_attention_heads)
    return reference_collapse(logits[0].argmax(-1).tolist())


def reference_adaptor(adaptor, frames):
    """Concatenate each 5 consecutive encoder frames (frame 5j first), then Linear -> ReLU -> Linear."""
    usable = frames.shape[1] // 5 * 5
    grouped = torch.cat([frames[:, i:usable:5] for i in range(5)], dim=-1).double()  # [B, T/5, 5C]
    return _linear(torch.relu(_linear(grouped, adaptor.linear1)), adaptor.linear2)


def openai_whisper_encoder(encoder):
    """openai-whisper's AudioEncoder with the transformers encoder's weights, renamed per spec section 1."""
    whisper_model = pytest.importorskip("whisper.model")
    c = encoder.config
    ref = whisper_model.AudioEncoder(
        c.num_mel_bins, c.max_source_positions, c.d_model, c.encoder_attention_heads, c.encoder_layers
    )
    if c.encoder_ffn_dim != 4 * c.d_model:  # openai-whisper always builds a 4x MLP (large-v3: 5120 = 4 * 1280)
        for block in ref.blocks:
            block.mlp = torch.nn.Sequential(
                whisper_model.Linear(c.d_model, c.encoder_ffn_dim), torch.nn.GELU(),
                whisper_model.Linear(c.encoder_ffn_dim, c.d_model),
            )
    sub = {
        "self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
        "self_attn.out_proj": "attn.out", "self_attn_layer_norm": "attn_ln", "fc1": "mlp.0", "fc2": "mlp.2",
        "final_layer_norm": "mlp_ln",
    }
    state = {}
    for key, value in encoder.state_dict().items():
        if key == "embed_positions.weight":
            name = "positional_embedding"
        elif key.startswith("layer_norm."):
            name = "ln_post." + key.split(".", 1)[1]
        elif key.startswith(("conv1.", "conv2.")):
            name = key
        else:
            layer, module, param = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", key).groups()
            name = f"blocks.{layer}.{sub[module]}.{param}"
        state[name] = value
    ref.load_state_dict(state, strict=True)  # every openai name filled, nothing left over
    return ref.eval()


@torch.no_grad()
def reference_embeddings(model, input_ids, input_features):
    """The original's splicing: speech vectors replace the placeholders in order, everything else is
    embed_tokens. Speech vectors from the encoder and the hand-written adaptor."""
    speech = reference_adaptor(model.speech_adaptor, model.speech_encoder(input_features).last_hidden_state)
    speech = speech.reshape(-1, speech.shape[-1])  # [n_audio * 300, H], audio order
    table = model.model.embed_tokens.weight.detach().double()
    rows, used = [], 0
    for ids in input_ids.tolist():
        row = []
        for token in ids:
            if token == model.config.speech_token_id:
                row.append(speech[used])
                used += 1
            else:
                row.append(table[token])
        rows.append(torch.stack(row))
    assert used == speech.shape[0]
    return torch.stack(rows)


@torch.no_grad()
def greedy_reference(model, inputs, max_new_tokens, eos_ids=()):
    """A plain greedy loop for ONE unpadded row: full forward over the whole sequence every step, argmax.
    Returns the answer tokens and the final-norm states that predicted them."""
    assert inputs["input_ids"].shape[0] == 1 and bool(inputs["attention_mask"].all())
    embeds = reference_embeddings(model, inputs["input_ids"], inputs["input_features"]).float()
    tokens, states = [], []
    for _ in range(max_new_tokens):
        hidden = model.model(inputs_embeds=embeds).last_hidden_state[0, -1]
        logits = model.lm_head(hidden)
        tokens.append(int(logits.argmax()))
        states.append(hidden)
        if tokens[-1] in eos_ids:
            break
        embeds = torch.cat([embeds, model.model.embed_tokens.weight[tokens[-1]][None, None]], dim=1)
    return tokens, torch.stack(states)


def answer_of(sequences, row, prompt_length, pad_id):
    answer = sequences[row, prompt_length:].tolist()
    while answer and answer[-1] == pad_id:
        answer.pop()
    return answer


# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------


def sharpen(model, seed=0, scale=10.0):
    """Make units informative. At init the RMSNorm weights are ones and the biases zeros, so the unit decoder
    is blind to the scale of its input (pre- vs post-norm states would give the same units) and its tiny
    logits give a handful of long runs of one unit. Random norm weights (the LLM's final norm included),
    random biases and larger matrices give a dozen distinct units per answer and expose such mistakes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm = model.model.norm.weight
        norm.copy_(1 + 0.5 * torch.randn(norm.shape, generator=generator))
        for name, param in model.unit_decoder.named_parameters():
            if "layernorm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
            else:
                param.mul_(scale)
    return model


@pytest.fixture(scope="module")
def sharp_model(tiny_checkpoint):
    return sharpen(LlamaOmniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval())


@pytest.fixture(scope="module")
def sharp_eager_model(tiny_checkpoint):
    model = LlamaOmniForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()
    assert model.config._attn_implementation == "eager"
    return sharpen(model)


@pytest.fixture(scope="module")
def france_greedy(sharp_model, france_inputs):
    """8 greedy steps of the reference loop, no EOS."""
    tokens, states = greedy_reference(sharp_model, france_inputs, max_new_tokens=8)
    assert len(reference_units(sharp_model, states)) >= 8  # informative units (see `sharpen`)
    return tokens, states


@pytest.fixture
def count_eager_attention(monkeypatch):
    calls = []
    original = modeling_llama.eager_attention_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", counting)
    return calls


# ----------------------------------------------------------------------------------------------------------
# speech encoder and adaptor
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_speech_encoder_matches_openai_whisper(model, france_inputs):
    features = france_inputs["input_features"]
    assert features.shape == (1, 128, 3000)
    ours = model.speech_encoder(features).last_hidden_state
    theirs = openai_whisper_encoder(model.speech_encoder)(features)
    assert ours.shape == theirs.shape == (1, 1500, model.config.speech_encoder_config.d_model)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_adaptor_concatenates_five_frames_then_ffn(model):
    frames = torch.randn(2, 1503, model.config.speech_encoder_config.d_model)  # 3 trailing frames are dropped
    ours = model.speech_adaptor(frames)
    assert ours.shape == (2, 300, model.config.text_config.hidden_size)
    torch.testing.assert_close(ours.double(), reference_adaptor(model.speech_adaptor, frames), rtol=1e-5, atol=1e-6)
    # the order of the concatenated frames matters: frames 5j..5j+4 in time order
    swapped = frames.clone()
    swapped[:, [0, 1]] = frames[:, [1, 0]]
    assert not torch.allclose(model.speech_adaptor(swapped)[:, 0], ours[:, 0], atol=1e-6)
    torch.testing.assert_close(model.speech_adaptor(swapped)[:, 1:], ours[:, 1:])


# ----------------------------------------------------------------------------------------------------------
# unit decoder
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_unit_decoder_matches_hand_written_llama_layers(sharp_model):
    model = sharp_model
    heads = model.config.unit_decoder_num_attention_heads
    assert model.config.unit_decoder_num_key_value_heads == heads  # spec: 32 heads AND 32 KV heads
    assert model.config.text_config.rope_parameters["rope_type"] == "llama3"
    x = torch.randn(1, 6 * UPSAMPLE, model.config.text_config.hidden_size)
    ours = model.unit_decoder(x)
    assert ours.shape == (1, 6 * UPSAMPLE, model.config.unit_vocab_size + 1)
    ref = reference_unit_decoder(model.unit_decoder, x, heads)
    scale = ref.abs().max()
    tolerance = 1e-5 * scale
    assert (ours.double() - ref).abs().max() < tolerance
    # negative controls: each spec detail moves the logits far beyond the tolerance
    for variant in (
        dict(llama3_rope=False),  # plain RoPE instead of the inherited llama3 scaling
        dict(causal=False),  # bidirectional attention
        dict(final_norm=torch.ones(model.config.unit_decoder_hidden_size)),  # a final norm
    ):
        wrong = reference_unit_decoder(model.unit_decoder, x, heads, **variant)
        assert (ours.double() - wrong).abs().max() > 100 * tolerance, variant


def test_collapse_merges_repeats_before_dropping_blanks():
    _ = BLANK
    cases = {
        (5, _, 5): [5, 5],
        (5, 5, _, _, 7, 7, 5): [5, 7, 5],
        (_, _, _): [],
        (): [],
        (3, 3, 3): [3],
        (_, 9, _, 9, 9, _): [9, 9],
    }
    for frames, expected in cases.items():
        assert reference_collapse(list(frames)) == expected
        assert collapse_units(list(frames), BLANK) == expected


@torch.no_grad()
def test_unit_decoder_predict_is_argmax_then_collapse(sharp_model):
    model = sharp_model
    states = torch.randn(6, model.config.text_config.hidden_size)
    assert model.unit_decoder.predict(states) == reference_units(model, states)
    assert model.unit_decoder.predict(states[:0]) == []


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@torch.no_grad()
def test_unit_decoder_is_causal(implementation, sharp_model, sharp_eager_model, count_eager_attention):
    """Changing a later LLM state never changes the unit frames of earlier ones (spec section 3), for
    every attention implementation (transformers' eager attention without a mask is bidirectional)."""
    m = sharp_model if implementation == "sdpa" else sharp_eager_model
    states = torch.randn(1, 6, m.config.text_config.hidden_size)
    changed = states.clone()
    changed[:, 4:] = torch.randn(1, 2, states.shape[-1])
    logits = m.unit_decoder(states.repeat_interleave(UPSAMPLE, dim=1))
    logits_changed = m.unit_decoder(changed.repeat_interleave(UPSAMPLE, dim=1))
    assert (count_eager_attention != []) == (implementation == "eager")
    scale = float(logits.abs().max())
    torch.testing.assert_close(logits_changed[:, : 4 * UPSAMPLE], logits[:, : 4 * UPSAMPLE], rtol=0, atol=1e-6 * scale)
    assert (logits_changed[:, 4 * UPSAMPLE :] - logits[:, 4 * UPSAMPLE :]).abs().max() > 0.01 * scale
    # and the same logits as the hand-written causal reference
    ref = reference_unit_decoder(m.unit_decoder, states.repeat_interleave(UPSAMPLE, dim=1),
                                 m.config.unit_decoder_num_attention_heads)
    torch.testing.assert_close(logits.double(), ref, rtol=0, atol=1e-5 * scale)


@torch.no_grad()
def test_eager_matches_sdpa(sharp_model, sharp_eager_model, france_inputs, count_eager_attention):
    length = france_inputs["input_ids"].shape[1]
    labels = torch.full((1, length), -100)
    labels[0, -4:] = france_inputs["input_ids"][0, -4:]
    unit_labels = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    sdpa = sharp_model(**france_inputs, labels=labels, unit_labels=unit_labels)
    assert count_eager_attention == []
    eager = sharp_eager_model(**france_inputs, labels=labels, unit_labels=unit_labels)
    assert count_eager_attention != []
    torch.testing.assert_close(eager.logits, sdpa.logits, rtol=1e-4, atol=1e-5)
    scale = float(sdpa.unit_logits.abs().max())
    torch.testing.assert_close(eager.unit_logits, sdpa.unit_logits, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(eager.loss, sdpa.loss, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# speech splicing
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_speech_positions_hold_adaptor_outputs(model, processor, speech):
    """A left-padded batch: a default prompt, and a two-audio conversation (3 audios, 900 speech positions)."""
    two_audio = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "And this one?"}]}],
        add_generation_prompt=True,
    )
    default = processor.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}],
                                            add_generation_prompt=True)
    inputs = processor(audio=[speech["france"], speech["tea"], speech["france"][::-1].copy()],
                       text=[default, two_audio], sampling_rate=16000, return_tensors="pt")
    ids = inputs["input_ids"]
    assert (ids == model.config.speech_token_id).sum(-1).tolist() == [300, 600]
    captured = {}
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True
    )
    try:
        model(**inputs)
    finally:
        hook.remove()
    embeds = captured["inputs_embeds"]
    assert embeds.shape == (*ids.shape, model.config.text_config.hidden_size)
    expected = reference_embeddings(model, ids, inputs["input_features"])
    is_speech = ids == model.config.speech_token_id
    torch.testing.assert_close(embeds[is_speech].double(), expected[is_speech], rtol=1e-5, atol=1e-6)
    text_ids = ids.masked_fill(is_speech, 0)
    torch.testing.assert_close(embeds[~is_speech], model.model.embed_tokens(text_ids)[~is_speech], rtol=0, atol=0)


def test_placeholder_count_mismatch_is_a_clear_error(model, france_inputs):
    ids, features = france_inputs["input_ids"], france_inputs["input_features"]
    speech_id = model.config.speech_token_id
    one_short = ids.clone()
    one_short[0, (ids[0] == speech_id).nonzero()[0, 0]] = 100  # 299 placeholders for one audio
    with pytest.raises(ValueError, match=r"got 1 audio inputs \(300 speech positions\) but 299 <speech> placeholders"):
        model(input_ids=one_short, input_features=features)
    with pytest.raises(ValueError, match=r"got 2 audio inputs \(600 speech positions\) but 300 <speech> placeholders"):
        model(input_ids=ids, input_features=features.repeat(2, 1, 1))
    with pytest.raises(ValueError, match="300 <speech> placeholders but no `input_features`"):
        model(input_ids=ids)


# ----------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------


def _unused_ids(tokens, count=2, start=770):
    """Ids that the answer never contains (to use as EOS that is never hit)."""
    return [i for i in range(start, start + 100) if i not in tokens][:count]


@torch.no_grad()
def test_greedy_generate_equals_plain_loop_and_full_recompute_units(sharp_model, france_inputs, france_greedy):
    tokens, states = france_greedy
    prompt_length = france_inputs["input_ids"].shape[1]
    never = _unused_ids(tokens)
    out = sharp_model.generate(**france_inputs, do_sample=False, max_new_tokens=8, eos_token_id=never,
                         return_dict_in_generate=True, return_audio=False)
    assert out.sequences[0, :prompt_length].tolist() == france_inputs["input_ids"][0].tolist()
    assert out.sequences[0, prompt_length:].tolist() == tokens
    assert isinstance(out.units, list) and len(out.units) == 1
    assert out.units[0].dtype == torch.long
    expected = reference_units(sharp_model, states)
    assert len(expected) > 0
    assert out.units[0].tolist() == expected


@torch.no_grad()
def test_generation_stops_at_any_of_several_eos_ids(sharp_model, france_inputs, france_greedy):
    tokens, states = france_greedy
    prompt_length = france_inputs["input_ids"].shape[1]
    stop = next(k for k in range(2, len(tokens)) if tokens[k] not in tokens[:k])
    eos = [_unused_ids(tokens)[0], tokens[stop]]  # the second of two EOS ids is hit
    out = sharp_model.generate(**france_inputs, do_sample=False, max_new_tokens=8, eos_token_id=eos,
                         return_dict_in_generate=True, return_audio=False)
    assert out.sequences[0, prompt_length:].tolist() == tokens[: stop + 1]  # EOS kept, nothing after it
    # units of exactly the stop + 1 states that predicted the answer (EOS included)
    assert out.units[0].tolist() == reference_units(sharp_model, states[: stop + 1])


@torch.no_grad()
def test_batch_of_two_equals_each_alone(sharp_model, processor, speech, france_inputs, france_greedy):
    """Different audios AND different prompt lengths (left padding); row 0 stops early on an EOS, so it is
    padded while row 1 runs on, and must get no units after its EOS."""
    custom = processor.apply_chat_template(
        [{"role": "system", "content": "Answer in one short sentence."},
         {"role": "user", "content": [{"type": "audio"}]}],
        add_generation_prompt=True,
    )
    default = processor.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}],
                                            add_generation_prompt=True)
    alone = [
        processor(audio=speech["france"], text=default, sampling_rate=16000, return_tensors="pt"),
        processor(audio=speech["tea"], text=custom, sampling_rate=16000, return_tensors="pt"),
    ]
    assert alone[0]["input_ids"].tolist() == france_inputs["input_ids"].tolist()
    batch = processor(audio=[speech["france"], speech["tea"]], text=[default, custom], sampling_rate=16000,
                      return_tensors="pt")
    lengths = [a["input_ids"].shape[1] for a in alone]
    assert lengths[0] != lengths[1] and batch["input_ids"].shape[1] == max(lengths)
    pad = processor.tokenizer.pad_token_id
    options = dict(do_sample=False, max_new_tokens=6, return_dict_in_generate=True, return_audio=False)
    # row 1 alone, with an EOS it never hits; then an EOS for row 0 that row 1 never produces
    row1 = sharp_model.generate(**alone[1], eos_token_id=[1], **options)
    tokens, _ = france_greedy
    row1_answer = answer_of(row1.sequences, 0, lengths[1], pad)
    assert len(row1_answer) == 6
    stop = next(k for k in range(1, 5) if tokens[k] not in tokens[:k] and tokens[k] not in row1_answer)
    options["eos_token_id"] = [1, tokens[stop]]
    alone_out = [sharp_model.generate(**alone[0], **options), row1]  # row 1 with this EOS = row 1 without it
    answers = [answer_of(alone_out[0].sequences, 0, lengths[0], pad), row1_answer]
    assert answers[0] == tokens[: stop + 1]
    batch_out = sharp_model.generate(**batch, **options)
    width = batch["input_ids"].shape[1]
    for row in range(2):
        assert answer_of(batch_out.sequences, row, width, pad) == answers[row]
        assert batch_out.units[row].tolist() == alone_out[row].units[0].tolist()
    assert batch_out.sequences[0, width + stop + 1 :].tolist() == [pad] * (5 - stop)


class _CollectingStreamer(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.pieces, self.ended = [], False

    def on_finalized_text(self, text, stream_end=False):
        self.pieces.append(text)
        self.ended |= stream_end


@torch.no_grad()
def test_streamers_receive_the_answer_text(sharp_model, processor, france_inputs, france_greedy):
    tokens, _ = france_greedy
    expected = processor.tokenizer.decode(tokens[:6], skip_special_tokens=True)
    options = dict(do_sample=False, max_new_tokens=6, eos_token_id=_unused_ids(tokens), return_audio=False)
    collecting = _CollectingStreamer(processor.tokenizer)
    sharp_model.generate(**france_inputs, streamer=collecting, **options)
    assert collecting.ended and "".join(collecting.pieces) == expected
    iterator = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=10)
    sharp_model.generate(**france_inputs, streamer=iterator, **options)
    assert "".join(iterator) == expected


@torch.no_grad()
def test_sampling_is_reproducible_with_a_seed(sharp_model, france_inputs, france_greedy):
    tokens, _ = france_greedy
    prompt_length = france_inputs["input_ids"].shape[1]
    options = dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=200, repetition_penalty=1.1,
                   max_new_tokens=4, eos_token_id=_unused_ids(tokens), return_dict_in_generate=True,
                   return_audio=False)

    def sample(seed):
        torch.manual_seed(seed)
        out = sharp_model.generate(**france_inputs, **options)
        return out.sequences[0, prompt_length:].tolist(), out.units[0].tolist()

    first = sample(1234)
    assert sample(1234) == first
    assert sample(99)[0] != first[0]  # the sampling arguments are applied: another seed, another answer
    # top_k=1 sampling can only pick the argmax: the greedy answer
    torch.manual_seed(5)
    out = sharp_model.generate(**france_inputs, do_sample=True, top_k=1, max_new_tokens=4,
                         eos_token_id=_unused_ids(tokens), return_dict_in_generate=True, return_audio=False)
    assert out.sequences[0, prompt_length:].tolist() == tokens[:4]


@torch.no_grad()
def test_repetition_penalty_reaches_the_logits(model, france_inputs):
    """The plain tiny model repeats itself greedily; a strong penalty must change that."""
    prompt_length = france_inputs["input_ids"].shape[1]
    options = dict(do_sample=False, max_new_tokens=6, eos_token_id=[1], return_dict_in_generate=True,
                   return_audio=False)
    neutral = model.generate(**france_inputs, repetition_penalty=1.0, **options).sequences[0, prompt_length:].tolist()
    assert len(set(neutral)) < len(neutral)
    penalised = model.generate(**france_inputs, repetition_penalty=5.0, **options).sequences[0, prompt_length:].tolist()
    assert len(set(penalised)) > len(set(neutral))


@torch.no_grad()
def test_num_return_sequences_gives_units_per_sequence(sharp_model, france_inputs, france_greedy):
    tokens, states = france_greedy
    prompt_length = france_inputs["input_ids"].shape[1]
    torch.manual_seed(0)
    out = sharp_model.generate(**france_inputs, do_sample=True, top_k=1, num_return_sequences=2, max_new_tokens=4,
                         eos_token_id=_unused_ids(tokens), return_dict_in_generate=True, return_audio=False)
    assert out.sequences[:, prompt_length:].tolist() == [tokens[:4]] * 2
    assert [u.tolist() for u in out.units] == [reference_units(sharp_model, states[:4])] * 2


@torch.no_grad()
def test_generate_without_dict_returns_the_sequences_tensor(sharp_model, france_inputs, france_greedy):
    tokens, _ = france_greedy
    prompt_length = france_inputs["input_ids"].shape[1]
    out = sharp_model.generate(**france_inputs, do_sample=False, max_new_tokens=3, eos_token_id=_unused_ids(tokens),
                         return_dict_in_generate=False)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, prompt_length + 3) and out[0, prompt_length:].tolist() == tokens[:3]


@torch.no_grad()
def test_generate_returns_audio_from_the_vocoder(sharp_model, france_inputs, france_greedy):
    tokens, _ = france_greedy
    out = sharp_model.generate(**france_inputs, do_sample=False, max_new_tokens=3, eos_token_id=_unused_ids(tokens),
                         return_dict_in_generate=True)
    assert sharp_model.vocoder is not None and len(out.audio) == 1
    audio = out.audio[0]
    assert audio.dtype == torch.float32 and audio.ndim == 1
    # every unit lasts at least one 320-sample frame (durations are clamped to >= 1)
    assert len(audio) >= 320 * len(out.units[0]) > 0
    assert bool(torch.isfinite(audio).all()) and float(audio.abs().max()) <= 1.0


# ----------------------------------------------------------------------------------------------------------
# loading options
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_bfloat16_and_device_map_auto_loading_generate(tiny_checkpoint, model, france_inputs):
    bf16 = LlamaOmniForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16, device_map="auto")
    assert {p.dtype for n, p in bf16.named_parameters() if not n.startswith("vocoder.")} == {torch.bfloat16}
    assert {p.dtype for p in bf16.vocoder.parameters()} == {torch.float32}  # kept fp32, as the original
    assert {p.device.type for p in bf16.parameters()} == {"cpu"}
    # device_map="auto" keeps these whole; a misspelt class name would be ignored silently
    declared = set(LlamaOmniForConditionalGeneration._no_split_modules)
    assert {"LlamaDecoderLayer", "WhisperEncoderLayer"} <= declared <= {type(m).__name__ for m in bf16.modules()}
    out = bf16.generate(**france_inputs, do_sample=False, max_new_tokens=3, return_dict_in_generate=True,
                        return_audio=False)
    prompt_length = france_inputs["input_ids"].shape[1]
    assert out.sequences.shape[1] <= prompt_length + 3 and out.sequences.shape[1] > prompt_length
    assert out.units[0].dtype == torch.long
    # bf16 logits follow the float32 ones
    low = bf16(**france_inputs).logits[0, -1].float()
    high = model(**france_inputs).logits[0, -1]
    assert F.cosine_similarity(low, high, dim=0) > 0.99
