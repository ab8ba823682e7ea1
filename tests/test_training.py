"""Training: the LM loss, the CTC loss (against torch and a hand-written CTC recursion), their combination,
the two stages' freezing, gradient checkpointing, and a real optimizer step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from test_model import UPSAMPLE, reference_unit_decoder

IGNORE = -100
BLANK = 1000


def ctc_negative_log_likelihood(log_probs, target, blank=BLANK):
    """-log p(target) for one sequence of log-probs [T, C], by the CTC forward recursion over the
    blank-extended target (a blank between and around labels; a skip over a blank only between different
    labels). Returns inf when no alignment fits."""
    extended = [blank]
    for unit in target:
        extended += [unit, blank]
    lp = log_probs.double().tolist()

    def logsumexp(values):
        values = [v for v in values if v != -math.inf]
        if not values:
            return -math.inf
        top = max(values)
        return top + math.log(sum(math.exp(v - top) for v in values))

    alpha = [-math.inf] * len(extended)
    alpha[0] = lp[0][blank]
    if len(extended) > 1:
        alpha[1] = lp[0][extended[1]]
    for t in range(1, len(lp)):
        previous = alpha
        alpha = []
        for s, label in enumerate(extended):
            terms = [previous[s]]
            if s >= 1:
                terms.append(previous[s - 1])
            if s >= 2 and label != blank and label != extended[s - 2]:
                terms.append(previous[s - 2])
            alpha.append(logsumexp(terms) + lp[t][label])
    return -logsumexp(alpha[-2:])


def uniform_assignment(num_states, num_frames):
    """The original's `_uniform_assignment`: frame t reads state floor(t / (T / N)) (float32 division)."""
    ratio = torch.tensor(num_frames / num_states, dtype=torch.float32)
    return (torch.arange(num_frames) / ratio).long()


def text_batch(model, rows=3, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 700, (rows, length), generator=generator)


def response_labels(input_ids, response_lengths):
    labels = torch.full_like(input_ids, IGNORE)
    for row, n in enumerate(response_lengths):
        labels[row, -n:] = input_ids[row, -n:]
    return labels


def pad_units(rows):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [IGNORE] * (width - len(r)) for r in rows])


# Hand-made CTC case (spec section 3: blank 1000, sum / total target length, zero_infinity):
#  row 0: 2 response states -> 50 frames, but 60 targets: stretched to 60 frames (uniform assignment),
#         no repeated neighbours, so exactly one alignment family fits;
#  row 1: 3 states -> 75 frames, 10 targets with a repeated neighbour (needs a blank between);
#  row 2: 1 state -> 25 frames, 25 targets with a repeat: needs 26 frames, impossible -> inf -> zeroed.
RESPONSE_LENGTHS = [2, 3, 1]
UNIT_TARGETS = [
    [(7 * i) % 1000 for i in range(1, 61)],
    [11, 12, 12, 400, 999, 0, 5, 6, 7, 8],
    [1, 1] + list(range(100, 123)),
]


@torch.no_grad()
def test_ctc_loss_matches_torch_and_the_ctc_recursion(model):
    input_ids = text_batch(model)
    labels = response_labels(input_ids, RESPONSE_LENGTHS)
    out = model(input_ids=input_ids, labels=labels, unit_labels=pad_units(UNIT_TARGETS))
    frames = [max(n * UPSAMPLE, len(t)) for n, t in zip(RESPONSE_LENGTHS, UNIT_TARGETS)]
    assert frames == [60, 75, 25]
    assert out.unit_logits.shape == (3, 75, 1001)

    # the unit decoder reads the final-norm states AT the label positions (the original's training quirk)
    hidden = model.model(input_ids=input_ids).last_hidden_state
    for row, (n, t) in enumerate(zip(RESPONSE_LENGTHS, frames)):
        states = hidden[row, -n:][uniform_assignment(n, t)][None]  # [1, T, H]
        ref = reference_unit_decoder(model.unit_decoder, states, model.config.unit_decoder_num_attention_heads)
        torch.testing.assert_close(out.unit_logits[row, :t].double(), ref[0], rtol=1e-4, atol=1e-5)

    log_probs = F.log_softmax(out.unit_logits.double(), dim=-1)
    nll = [ctc_negative_log_likelihood(log_probs[row, :t], target)
           for row, (t, target) in enumerate(zip(frames, UNIT_TARGETS))]
    assert math.isfinite(nll[0]) and math.isfinite(nll[1]) and nll[2] == math.inf
    total_target_length = sum(len(t) for t in UNIT_TARGETS)
    expected = (nll[0] + nll[1] + 0.0) / total_target_length  # zero_infinity drops row 2, not its length
    torch.testing.assert_close(out.ctc_loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)

    by_torch = F.ctc_loss(
        log_probs.transpose(0, 1), torch.cat([torch.tensor(t) for t in UNIT_TARGETS]), torch.tensor(frames),
        torch.tensor([len(t) for t in UNIT_TARGETS]), blank=BLANK, reduction="sum", zero_infinity=True,
    ) / total_target_length
    torch.testing.assert_close(out.ctc_loss.double(), by_torch, rtol=1e-5, atol=0)
    # with labels, the loss is lm + 1.0 * ctc
    torch.testing.assert_close(out.loss, out.lm_loss + out.ctc_loss)


@torch.no_grad()
def test_lm_loss_is_the_shifted_cross_entropy(model):
    input_ids = text_batch(model, rows=2, length=10, seed=1)
    labels = response_labels(input_ids, [4, 6])
    out = model(input_ids=input_ids, labels=labels)
    # position i predicts token i + 1; only response tokens count; mean over them
    log_probs = F.log_softmax(out.logits.double(), dim=-1)
    losses = [-log_probs[b, i - 1, labels[b, i]] for b in range(2) for i in range(1, 10) if labels[b, i] != IGNORE]
    assert len(losses) == 10
    expected = torch.stack(losses).mean()
    torch.testing.assert_close(out.lm_loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss, out.lm_loss)
    assert out.ctc_loss is None and out.unit_logits is None


@torch.no_grad()
def test_combined_loss_weights_the_ctc_term(fresh_model):
    fresh_model.config.ctc_loss_weight = 0.3
    input_ids = text_batch(fresh_model)
    out = fresh_model(input_ids=input_ids, labels=response_labels(input_ids, RESPONSE_LENGTHS),
                      unit_labels=pad_units(UNIT_TARGETS))
    assert out.lm_loss is not None and out.ctc_loss is not None
    torch.testing.assert_close(out.loss, out.lm_loss + 0.3 * out.ctc_loss)


def test_unit_labels_need_labels_and_stages_are_checked(model):
    with pytest.raises(ValueError, match="`unit_labels` need `labels`"):
        model(input_ids=text_batch(model), unit_labels=pad_units(UNIT_TARGETS))
    with pytest.raises(ValueError, match="training stage must be 1, 2 or None, got 3"):
        model.set_training_stage(3)


TRAINABLE = {
    1: ("speech_adaptor.", "model.", "lm_head."),  # paper: encoder frozen, adaptor + LLM trained
    2: ("unit_decoder.",),  # paper: only the speech decoder
}


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("stage", [1, 2])
def test_a_training_step_changes_only_the_stage_parameters(stage, fresh_model, france_inputs):
    model = fresh_model.set_training_stage(stage)
    model.train()
    names = [name for name, _ in model.named_parameters()]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name in names if name.startswith(TRAINABLE[stage])}
    assert not any(name.startswith(("speech_encoder.", "vocoder.")) for name in trainable)

    length = france_inputs["input_ids"].shape[1]
    labels = torch.full((1, length), IGNORE)
    labels[0, -5:] = france_inputs["input_ids"][0, -5:]
    batch = dict(france_inputs, labels=labels)
    if stage == 2:
        batch["unit_labels"] = torch.tensor([[5, 17, 17, 300, 2, 999, 41, 8]])
    before = _snapshot(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    out = model(**batch)
    assert (out.lm_loss is None) == (stage == 2) and (out.ctc_loss is None) == (stage == 1)
    out.loss.backward()
    assert all(p.grad is None for name, p in model.named_parameters() if name not in trainable)
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    # every trainable tensor that the loss reaches moves; the embedding rows of unused tokens do not matter
    assert changed <= trainable
    reached = {name for name in trainable if model.get_parameter(name).grad is not None
               and bool(model.get_parameter(name).grad.abs().sum() > 0)}
    assert reached == changed
    must_move = {"speech_adaptor.linear1.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"} \
        if stage == 1 else {"unit_decoder.input_proj.weight", "unit_decoder.output_proj.bias",
                            "unit_decoder.layers.1.mlp.down_proj.weight"}
    assert must_move <= changed
    if stage == 2:
        assert out.loss.item() == pytest.approx(out.ctc_loss.item())  # stage 2 trains on the CTC term only


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(fresh_model):
    model = fresh_model.set_training_stage(None)
    model.train()
    input_ids = text_batch(model)
    batch = dict(input_ids=input_ids, labels=response_labels(input_ids, RESPONSE_LENGTHS),
                 unit_labels=pad_units(UNIT_TARGETS))
    layer_calls = []
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda *args: layer_calls.append(1))
    model.unit_decoder.layers[0].self_attn.register_forward_pre_hook(lambda *args: layer_calls.append(2))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        layer_calls.clear()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    assert sorted(layer_calls) == [1, 2]
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert all(layer.gradient_checkpointing for layer in [*model.model.layers, *model.unit_decoder.layers])
    checkpointed_loss, checkpointed_grads = loss_and_grads()
    assert sorted(layer_calls) == [1, 1, 2, 2]  # the layers were recomputed in backward
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    assert checkpointed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_stage_two_loss_is_the_unweighted_ctc_loss_as_the_original(fresh_model, france_inputs):
    model = fresh_model.set_training_stage(2)
    model.config.ctc_loss_weight = 0.5
    length = france_inputs["input_ids"].shape[1]
    labels = torch.full((1, length), IGNORE)
    labels[0, -5:] = france_inputs["input_ids"][0, -5:]
    out = model(**france_inputs, labels=labels, unit_labels=torch.tensor([[5, 17, 300, 2]]))
    assert out.loss.item() == pytest.approx(out.ctc_loss.item())
    model.set_training_stage(None)
    both = model(**france_inputs, labels=labels, unit_labels=torch.tensor([[5, 17, 300, 2]]))
    assert both.loss.item() == pytest.approx(both.lm_loss.item() + 0.5 * both.ctc_loss.item(), rel=1e-5)
