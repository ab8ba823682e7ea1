"""LLaMA-Omni's speech half for many requests at once: final-norm LLM states -> units -> 16 kHz audio chunks.

The engine-independent core of a serving stage that receives, for many requests interleaved, the final-norm
hidden rows of the LLM (one [H] row per generated text token, in order, several rows per call allowed) and
returns each request's new units and audio as soon as they exist. Plain torch, beside the remote code; it
holds no weights of its own and uses the model's `unit_decoder` and `vocoder` modules.

    engine = BatchedUnit2Wav(model)                 # a loaded LlamaOmniForConditionalGeneration
    engine.add_request("a", chunk_size=10)          # Omega: fewest ready units worth a vocoder call
    out = engine.step({"a": rows_a, "b": rows_b}, finished={"b"})
    units, audio = out["a"]                         # list[int], float32 [samples] at 16 kHz

Per request: the unit decoder's keys/values (a slot of a shared slab), the last CTC frame (to collapse
repeats across calls) and the vocoder's stream state. Each `step` runs the unit decoder ONCE for every request
with rows: a padded batch where row b holds request b's new queries (its rows upsampled x lambda), RoPE positions
that continue that request's own cache, and a mask that lets query q of row b see exactly keys
[0, past_b + q] of its own slot. Windows due for vocoding are vocoded in one padded vocoder call too (the
vocoder zeroes padded frames before every convolution, so each item gets what it would get alone).

Which rows to feed (what `generate` feeds its unit stream): per answer, the final-norm state of the last prompt
token, then that of each generated token except the last one: one row per generated token, the row that
predicted EOS included, no other prompt rows (a serving engine's prefill yields one per prompt token: keep the
last). `finished` flushes the vocoder's held-back look-ahead and removes the request; a request that goes away
without it (a disconnected client) is `remove`d. Memory: the slab holds slots x the longest active request's
capacity (doubling) x 2 layers x keys and values: 32 KB per position in bf16 at the released size (4096 wide),
25 positions per text token; it is freed when no request is active.

Results equal, per request, the in-process path: the units of `LlamaOmniUnitStreamState` (`generate`'s
`.units`), and the audio of `vocoder.init_stream` / `stream` fed the same unit increments, up to float
rounding (a padded batch sums in another order: ~1e-7 in fp32; argmax ties within that can flip).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .modeling_llama_omni import collapse_units
from .transformers_compat import cache_kwargs
from .vocoder_llama_omni import DEFAULT_LEFT_CONTEXT, DEFAULT_LOOKAHEAD


@dataclass
class _Request:
    slot: int
    vocoder_state: object | None
    length: int = 0  # unit-decoder cache positions filled (= 25 x states consumed)
    last_frame: int = -1  # last CTC frame class, -1 before the first
    num_states: int = 0
    units: list[int] = field(default_factory=list)


class _UnitDecoderSlab:
    """Keys/values of every request's unit decoder, [slots, kv_heads, capacity, head_dim] per layer.

    Grown by doubling (in slots and in positions) into zeroed memory; a freed slot is zeroed, so whatever lies
    beyond a request's own length is finite and the mask's zero weights keep it out exactly (a NaN would
    survive a zero weight). Memory is slots x the longest request's capacity: drop the slab when idle.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def num_slots(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, num_slots: int, length: int) -> None:
        if num_slots <= self.num_slots and length <= self.capacity:
            return
        slots = max(self.num_slots, 1)
        while slots < num_slots:
            slots *= 2
        capacity = max(self.capacity, 256)
        while capacity < length:
            capacity *= 2
        shape = (slots, self.num_kv_heads, capacity, self.head_dim)
        old_slots, old_capacity = self.num_slots, self.capacity
        for store in (self.keys, self.values):
            for layer in range(self.num_layers):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if layer < len(store):
                    grown[:old_slots, :, :old_capacity] = store[layer]
                    store[layer] = grown
                else:
                    store.append(grown)

    def clear(self, slot: int) -> None:
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[slot].zero_()


class _BatchCache:
    """The `cache` the unit decoder's layers see during one batched call: `update` writes each row's real new
    keys/values into its request's slot and returns every row's keys [0, max(past + new)) from the slab."""

    def __init__(self, slab: _UnitDecoderSlab, slots: torch.Tensor, src_row, src_query, dst_slot, dst_pos,
                 kv_len: int):
        self.slab, self.kv_len = slab, kv_len
        self.src_row, self.src_query, self.dst_slot, self.dst_pos = src_row, src_query, dst_slot, dst_pos
        first, count = int(slots[0]), len(slots)
        contiguous = bool((slots == torch.arange(first, first + count, device=slots.device)).all())
        # consecutive slots are read as a view of the slab; others are gathered (a copy of their keys)
        self.rows = slice(first, first + count) if contiguous else slots.to(slab.device)

    def _read(self, tensor: torch.Tensor) -> torch.Tensor:
        window = tensor[:, :, : self.kv_len]
        return window[self.rows] if isinstance(self.rows, slice) else window.index_select(0, self.rows)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.slab.keys[layer_idx], self.slab.values[layer_idx]
        keys[self.dst_slot, :, self.dst_pos] = key_states[self.src_row, :, self.src_query]
        values[self.dst_slot, :, self.dst_pos] = value_states[self.src_row, :, self.src_query]
        return self._read(keys), self._read(values)

    def get_seq_length(self, layer_idx: int = 0) -> int:  # not read by the layers; for completeness
        return self.kv_len


class BatchedUnit2Wav:
    """Incremental CTC unit decoding and streaming vocoding for many requests, batched across requests.

    Not thread-safe: one caller drives `add_request` / `step` / `remove`. Inputs may be on any device; they are
    moved to the unit decoder's device and dtype. Audio comes back as float32 on the vocoder's device at
    `sampling_rate` (16 kHz); empty when the checkpoint has no vocoder.
    """

    def __init__(self, model, vocoder_left_context: int = DEFAULT_LEFT_CONTEXT,
                 vocoder_lookahead: int = DEFAULT_LOOKAHEAD):
        self.model = model
        self.unit_decoder = model.unit_decoder
        self.vocoder = model.vocoder
        self.upsample_factor = self.unit_decoder.upsample_factor
        self.blank_id = self.unit_decoder.blank_id
        self.hidden_size = self.unit_decoder.input_proj.in_features
        self.sampling_rate = self.vocoder.config.sampling_rate if self.vocoder is not None else None
        if self.vocoder is not None and self.vocoder.config.num_embeddings < self.blank_id:
            # CTC units lie in [0, unit_vocab_size): checked once here instead of at every vocoder call
            raise ValueError(f"the vocoder embeds {self.vocoder.config.num_embeddings} units but the unit decoder "
                             f"emits {self.blank_id}")
        self.vocoder_left_context, self.vocoder_lookahead = vocoder_left_context, vocoder_lookahead
        self._requests: dict[object, _Request] = {}
        self._free_slots: list[int] = []
        self._slab: _UnitDecoderSlab | None = None

    # ----- requests -----

    @property
    def num_active(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id) -> bool:
        return request_id in self._requests

    def units(self, request_id) -> list[int]:
        """All units of a request so far."""
        return list(self._requests[request_id].units)

    def add_request(self, request_id, chunk_size: int = 10, left_context: int | None = None,
                    lookahead: int | None = None) -> None:
        """Start a request. `chunk_size` (Omega), `left_context`, `lookahead`: as `LlamaOmniVocoder.init_stream`
        (defaults: the engine's, which default to the vocoder's)."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already active")
        vocoder_state = None
        if self.vocoder is not None:
            vocoder_state = self.vocoder.init_stream(
                left_context=self.vocoder_left_context if left_context is None else left_context,
                lookahead=self.vocoder_lookahead if lookahead is None else lookahead,
                chunk_size=chunk_size,
            )
        elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"`chunk_size` must be an integer >= 1, got {chunk_size!r}")
        taken = {request.slot for request in self._requests.values()}
        slot = min(self._free_slots) if self._free_slots else len(taken)
        if self._free_slots:
            self._free_slots.remove(slot)
        self._requests[request_id] = _Request(slot=slot, vocoder_state=vocoder_state)

    def remove(self, request_id) -> None:
        """Forget a request (finished, cancelled or disconnected) and free its slot; unknown ids are ignored."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        if not self._requests:  # idle: give the memory back
            self._slab, self._free_slots = None, []
            return
        if self._slab is not None and request.slot < self._slab.num_slots:
            self._slab.clear(request.slot)
        self._free_slots.append(request.slot)

    # ----- the step -----

    @torch.no_grad()
    def step(self, batch: dict, finished=frozenset()) -> dict:
        """Consume new LLM states and return what became ready.

        Args:
            batch: {request_id: Tensor [n_i, H]}: request i's next n_i final-norm states, in order (n_i >= 0).
            finished: ids whose states are complete (after this call's rows): their vocoder tail is flushed and
                the request is removed.
        Returns:
            {request_id: (new_units list[int], audio float32 Tensor [samples])} for every id in `batch` or
            `finished`.
        """
        finished = set(finished)
        unknown = [rid for rid in (*batch, *finished) if rid not in self._requests]
        if unknown:
            raise KeyError(f"unknown request ids {unknown!r}: call add_request first (finished ones are removed)")
        rows = {}
        for rid, states in batch.items():
            if not isinstance(states, torch.Tensor) or states.dim() != 2 or states.shape[1] != self.hidden_size:
                got = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
                raise ValueError(f"request {rid!r}: states must be a tensor [n, {self.hidden_size}], got {got}")
            if states.shape[0]:
                rows[rid] = states
        new_units = self._decode_units(rows) if rows else {}
        ids = list(dict.fromkeys([*batch, *finished]))
        audio = self._vocode({rid: new_units.get(rid, []) for rid in ids}, finished)
        result = {rid: (new_units.get(rid, []), audio[rid]) for rid in ids}
        for rid in finished:
            self.remove(rid)
        return result

    def _decode_units(self, rows: dict) -> dict:
        """One padded unit-decoder call over every request with rows; returns their new collapsed units."""
        decoder = self.unit_decoder
        decoder.config._attn_implementation = self.model.config._attn_implementation  # as the model's forward
        weight = decoder.input_proj.weight
        device, dtype = weight.device, weight.dtype
        requests = sorted(((self._requests[rid], rid) for rid in rows), key=lambda item: item[0].slot)
        factor = self.upsample_factor
        past = torch.tensor([r.length for r, _ in requests], dtype=torch.long)
        new = torch.tensor([rows[rid].shape[0] * factor for _, rid in requests], dtype=torch.long)
        q_len, kv_len = int(new.max()), int((past + new).max())
        slots = torch.tensor([r.slot for r, _ in requests], dtype=torch.long)
        if self._slab is None:
            config = decoder.config
            self._slab = _UnitDecoderSlab(config.num_hidden_layers, config.num_key_value_heads,
                                          getattr(config, "head_dim", config.hidden_size // config.num_attention_heads),
                                          dtype, device)
        self._slab.reserve(int(slots.max()) + 1, kv_len)

        # [B, q_len, H]: each request's states repeated lambda times, zero padded
        upsampled = nn.utils.rnn.pad_sequence(
            [rows[rid].to(device=device, dtype=dtype).repeat_interleave(factor, dim=0) for _, rid in requests],
            batch_first=True,
        )
        # where each real query's key/value goes: (row, query) -> (slot, past + query)
        src_row = torch.repeat_interleave(torch.arange(len(requests)), new)
        src_query = torch.cat([torch.arange(int(n)) for n in new])
        dst_pos = past[src_row] + src_query
        cache = _BatchCache(self._slab, slots, src_row.to(device), src_query.to(device), slots[src_row].to(device),
                            dst_pos.to(device), kv_len)
        # positions continue each request's own cache (the decoder's positions start at 0 per answer)
        past, end = past.to(device), (past + new).to(device)
        position_ids = past[:, None] + torch.arange(q_len, device=device)[None]  # [B, q_len]
        # query q of row b sees keys [0, past_b + q] of its own slot; padded queries see their row's real keys
        # (a row that sees nothing would be NaN); the mask is built on the device (it is B x q_len x kv_len)
        key = torch.arange(kv_len, device=device)[None, None]
        allowed = ((key <= position_ids[..., None]) & (key < end[:, None, None])) | (key == 0)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        mask = mask[:, None]  # [B, 1, q_len, kv_len]

        hidden = decoder.input_proj(upsampled)
        position_embeddings = decoder.rotary_emb(hidden, position_ids)
        for layer in decoder.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, use_cache=True,
                           position_embeddings=position_embeddings, **cache_kwargs(cache))
        frames = decoder.output_proj(hidden).float().argmax(-1).cpu().tolist()  # [B, q_len]

        result = {}
        for b, (request, rid) in enumerate(requests):
            row_frames = frames[b][: int(new[b])]
            units = collapse_units(row_frames, self.blank_id, request.last_frame)
            request.last_frame = row_frames[-1]
            request.length += int(new[b])
            request.num_states += int(new[b]) // factor
            request.units.extend(units)
            result[rid] = units
        return result

    def _vocode(self, new_units: dict, finished: set) -> dict:
        """Advance every request's vocoder stream as `LlamaOmniVocoder.stream` does; the windows due are
        vocoded in one padded call."""
        vocoder = self.vocoder
        if vocoder is None:
            return {rid: torch.zeros(0, dtype=torch.float32) for rid in new_units}
        device = vocoder.dict.weight.device
        empty = vocoder.dict.weight.new_zeros(0).float()
        audio, due = {}, []
        for rid, units in new_units.items():
            state, final = self._requests[rid].vocoder_state, rid in finished
            if state.finished:
                raise ValueError(f"request {rid!r}: its vocoder stream is finished")
            state.units.extend(units)
            state.units_received += len(units)
            state.finished = final
            end = state.units_received if final else state.units_received - state.lookahead
            audio[rid] = empty
            if end - state.units_done >= (1 if final else state.chunk_size):
                due.append((rid, state, end))
        if not due:
            return audio
        lengths = torch.tensor([len(state.units) for _, state, _ in due], dtype=torch.long, device=device)
        units = nn.utils.rnn.pad_sequence(
            [torch.tensor(state.units, dtype=torch.long) for _, state, _ in due], batch_first=True
        ).to(device)
        durations = vocoder.predict_durations(units, lengths)  # [B, W], 0 on padding
        for b, (_, state, _) in enumerate(due):  # context units keep the durations they were given
            num_context = state.units_done - state.units_start
            durations[b, :num_context] = torch.tensor(state.durations, dtype=torch.long, device=device)
        wav, _ = vocoder(units, lengths, durations=durations)
        hop = vocoder.config.code_hop_size
        for b, (rid, state, end) in enumerate(due):
            num_context, num_new = state.units_done - state.units_start, end - state.units_done
            row = durations[b].tolist()
            start = sum(row[:num_context]) * hop
            stop = start + sum(row[num_context : num_context + num_new]) * hop
            audio[rid] = wav[b, start:stop].float()
            # advance, then forget units older than the left context (as the vocoder's own stream)
            state.durations.extend(row[num_context : num_context + num_new])
            state.units_done = end
            state.samples_emitted += stop - start
            drop = max(0, state.units_done - state.left_context - state.units_start)
            del state.units[:drop], state.durations[:drop]
            state.units_start += drop
        return audio


__all__ = ["BatchedUnit2Wav"]
