"""Stage 1 of LLaMA-Omni on vLLM-Omni, unit2wav (`LLM_GENERATION`, state kept across chunks): the thinker's
final-norm hidden rows -> CTC units -> 16 kHz audio chunks, batched across requests.

`LlamaOmniUnit2Wav` wraps llama_omni_hf.batched_unit2wav.BatchedUnit2Wav (the engine-independent core, exact per
request) around the checkpoint's `unit_decoder.*` and `vocoder.*` weights. Each engine step it receives, for every
scheduled request, the rows stage 0 sent since the last step (`thinker_rows_async_chunk` below, through the
connector, as `codes.audio`) and returns that request's new audio, `sr` 16000 stated (vllm-omni's server assumes 24 kHz otherwise).

vllm-omni 0.30 specifics, as its Audex code2wav stage handles them (vllm_omni/model_executor/models/audex/
audex_code2wav.py, stage_input_processors/audex.py):
- the chunk receiver (`chunk_transfer_adapter._commit_received_chunk`) drops `meta.finished` before the model
  sees it, so the producer also sets `meta.stream_finished`, which survives;
- an empty chunk counts as "not ready": the producer holds back the newest row until the next call, so the
  terminal payload always carries at least one row;
- per-request state is freed on `stream_finished` and in `on_requests_finished` (aborted / disconnected requests).
  Both are keyed by the stage's own request ids (`requires_request_ids`: the generation runner passes them to
  `forward`, vllm_omni/worker/gpu_generation_model_runner.py), which are what `finished_req_ids` holds; the
  payload's `meta.req_id` is the upstream (external) id, used only when the runner gives none. Each freeing is
  logged ("unit2wav: request ... freed ...; N active") so a deployment can see state go back to zero.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

SAMPLING_RATE = 16000
DEFAULT_CHUNK_UNITS = 10  # Omega: units per vocoder call (the in-process app's default)
_STATE_KEY = "_llama_omni_rows"
DEFAULT_SEND_INTERVAL_S = 0.05  # about one stage-1 engine step under load on the CPU (LLAMA_OMNI_SERVING_TRACE)
_RECENTLY_DONE = 4096  # finished ids remembered, so a late duplicate payload cannot restart a finished request


def _send_interval() -> float:
    """Seconds between two sends of a request's rows (the first and the last go at once). Stage 1 consumes one
    chunk per request per engine step (vllm-omni's chunk_transfer_adapter loads the next chunk only after the
    last was scheduled): rows sent every decode step of a fast thinker queue up behind it and the audio falls
    ever further behind the text. LLAMA_OMNI_SEND_INTERVAL_S; 0 sends every step."""
    return float(os.environ.get("LLAMA_OMNI_SEND_INTERVAL_S", DEFAULT_SEND_INTERVAL_S))


def _trace(event: str, **fields) -> None:
    """LLAMA_OMNI_SERVING_TRACE=FILE: one JSON line per producer send and per stage-1 step (wall time, rows,
    audio), from both stage processes, to see where a request's first audio waits. Off by default."""
    path = os.environ.get("LLAMA_OMNI_SERVING_TRACE")
    if path:
        with open(path, "a") as trace:
            trace.write(json.dumps({"t": time.time(), "event": event, **fields}) + "\n")


def _logger():
    from vllm.logger import init_logger

    return init_logger(__name__)


def _as_bool(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(value.reshape(-1)[0].item()) if value.numel() else False
    if isinstance(value, (list, tuple)):
        return bool(value) and _as_bool(value[0])
    return bool(value)


def _as_str(value: Any) -> str | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else str(value)


def thinker_rows_async_chunk(transfer_manager: Any, multimodal_output: Any, request: Any,
                             is_finished: bool = False):
    """Stage 0 -> stage 1 producer (`async_chunk_process_next_stage_input_func`).

    vllm-omni's AR runner gives, per request and step, the final-norm rows of the tokens it just computed
    (`multimodal_output["hidden"]`, vllm_omni/worker/gpu_ar_model_runner.py `_build_omni_pooler_payload`): the
    prompt's rows at prefill (possibly over several chunked-prefill steps), then one per decoded token. The unit
    decoder wants the last prompt row, then one per generated token (the one that predicted EOS included): row
    positions >= prompt_len - 1. Those are sent as a [n, H] float tensor in `codes.audio`."""
    from vllm_omni.data_entry_keys import CodesStruct, MetaStruct, OmniPayloadStruct

    request_id = request.external_req_id
    finished = bool(is_finished or request.is_finished())
    state_holder = transfer_manager.request_payload.get(request_id)
    if not isinstance(state_holder, dict) or _STATE_KEY not in state_holder:
        state_holder = {_STATE_KEY: {"seen": 0, "pending": None, "done": False, "sent_at": None}}
        transfer_manager.request_payload[request_id] = state_holder
    state = state_holder[_STATE_KEY]
    if state["done"]:
        return None
    rows = multimodal_output.get("hidden") if hasattr(multimodal_output, "get") else None
    if isinstance(rows, torch.Tensor) and rows.dim() == 2 and rows.shape[0]:
        first = state["seen"]
        state["seen"] += rows.shape[0]
        keep_from = max(0, len(request.prompt_token_ids or []) - 1 - first)
        rows = rows[keep_from:].detach().to("cpu", torch.float32)
        if rows.shape[0]:
            pending = state["pending"]
            state["pending"] = rows if pending is None else torch.cat([pending, rows])
    pending = state["pending"]
    if pending is None or (not finished and pending.shape[0] < 2):
        if finished:  # nothing to send at all: stage 1 never saw this request
            state["done"] = True
        return None
    now = time.monotonic()
    if not finished and state["sent_at"] is not None and now - state["sent_at"] < _send_interval():
        return None  # coalesce: stage 1 takes one chunk per engine step, so chunks sent faster only queue up
    state["sent_at"] = now
    if finished:
        emit, state["pending"], state["done"] = pending, None, True
    else:  # hold back the newest row: the terminal payload must not be empty
        emit, state["pending"] = pending[:-1], pending[-1:]
    _trace("send", id=request_id, rows=int(emit.shape[0]), finished=finished)
    flag = torch.tensor(finished, dtype=torch.bool)
    # The rows ride in `codes.audio`: for a generation stage the chunk receiver counts a chunk as ready only when
    # `codes.audio` is non-empty (a 2-D tensor is kept whole), chunk_transfer_adapter.py `_commit_received_chunk`.
    return OmniPayloadStruct(codes=CodesStruct(audio=emit),
                             meta=MetaStruct(finished=flag, stream_finished=flag, req_id=[request_id]))


class _SpeechHalf(nn.Module):
    """What BatchedUnit2Wav reads from a LlamaOmniForConditionalGeneration: `unit_decoder` and `vocoder`."""

    def __init__(self, config):
        super().__init__()
        from llama_omni_hf.modeling_llama_omni import LlamaOmniUnitDecoder
        from llama_omni_hf.vocoder_llama_omni import LlamaOmniVocoder

        self.config = config
        self.unit_decoder = LlamaOmniUnitDecoder(config)
        self.vocoder = LlamaOmniVocoder(config.vocoder_config).float() if config.vocoder_config else None


class LlamaOmniUnit2Wav(nn.Module):
    """The unit2wav stage model. See the module docstring."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if config.vocoder_config is None:
            raise ValueError("this LLaMA-Omni checkpoint has no vocoder: it cannot serve audio")
        self.hidden_size = vllm_config.model_config.get_hidden_size()
        self.speech = _SpeechHalf(config)
        self.chunk_units = DEFAULT_CHUNK_UNITS
        self._engine = None
        self._done: OrderedDict = OrderedDict()  # recently finished request ids (bounded)
        self.have_multimodal_outputs = True
        self.has_preprocess = False
        self.has_postprocess = False
        self.enable_update_additional_information = True
        self.requires_raw_input_tokens = True
        self.requires_request_ids = True

    @property
    def engine(self):
        if self._engine is None:
            from llama_omni_hf.batched_unit2wav import BatchedUnit2Wav

            self.speech.eval()
            self._engine = BatchedUnit2Wav(self.speech)
        return self._engine

    def embed_input_ids(self, input_ids, **_):
        return torch.zeros((input_ids.shape[0], self.hidden_size), device=input_ids.device)

    def compute_logits(self, hidden_states, sampling_metadata=None):
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        state = {name: tensor for name, tensor in weights if name.startswith(("unit_decoder.", "vocoder."))}
        missing, unexpected = self.speech.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if not m.endswith(("rotary_emb.inv_freq", "original_inv_freq"))]:
            raise ValueError(f"unit2wav weights: missing {missing}, unexpected {unexpected}")
        self.speech.vocoder.float()
        return {f"speech.{name}" for name in state}

    def _forget(self, request_id: str, why: str) -> None:
        """Free a request's state (if any) and remember it as done; logged once per request."""
        self.engine.remove(request_id)
        first_time = request_id not in self._done
        self._done[request_id] = True
        self._done.move_to_end(request_id)
        while len(self._done) > _RECENTLY_DONE:
            self._done.popitem(last=False)
        if first_time:
            _logger().info("unit2wav: request %s freed (%s); %d active", request_id, why, self.engine.num_active)

    def on_requests_finished(self, finished_req_ids: Iterable[str]) -> None:
        """The scheduler's finished ids: normally already freed by their terminal chunk; an aborted request (a
        client that disconnected) is freed here ("aborted"), or only logged ("cancelled") when it was aborted
        before any of its rows reached this stage."""
        for request_id in finished_req_ids:
            if request_id in self.engine:
                self._forget(request_id, "aborted")
            elif request_id not in self._done:
                self._forget(request_id, "cancelled")

    @torch.no_grad()
    def forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None,
                runtime_additional_information=None, **kwargs):
        from vllm_omni.model_executor.models.output_templates import OmniOutput

        infos = list(runtime_additional_information or [])
        counts = kwargs.get("seq_token_counts")
        stage_ids = list(kwargs.get("request_ids") or [])
        num_reqs = len(counts) if counts is not None else len(infos)
        batch, finished, order = {}, set(), []
        for i in range(num_reqs):
            info = infos[i] if i < len(infos) and isinstance(infos[i], dict) else {}
            meta = info.get("meta") if isinstance(info.get("meta"), dict) else {}
            request_id = stage_ids[i] if i < len(stage_ids) else _as_str(meta.get("req_id"))
            order.append(request_id)
            if request_id is None or not info:  # the runner's dummy / prewarm batches carry no payload
                continue
            if request_id in self._done:  # a payload after the terminal one (stale snapshot): nothing new
                order[-1] = None
                continue
            codes = info.get("codes") if isinstance(info.get("codes"), dict) else {}
            rows = codes.get("audio")
            if request_id not in self.engine:
                self.engine.add_request(request_id, chunk_size=self.chunk_units)
            if isinstance(rows, torch.Tensor) and rows.dim() == 2:
                batch[request_id] = rows.to(torch.float32)
            if _as_bool(meta.get("stream_finished")) or _as_bool(meta.get("finished")):
                finished.add(request_id)
        started = time.perf_counter()
        results = self.engine.step(batch, finished=finished) if (batch or finished) else {}
        if results:
            _trace("step", s=round(time.perf_counter() - started, 4),
                   rows={rid: int(rows.shape[0]) for rid, rows in batch.items()}, finished=sorted(finished),
                   units={rid: len(units) for rid, (units, _) in results.items()},
                   samples={rid: int(audio.numel()) for rid, (_, audio) in results.items()})
        for request_id in finished:  # step() removed them; remember and log
            self._forget(request_id, "finished")
        empty = torch.zeros(0, dtype=torch.float32)
        audios = [results[rid][1].float().cpu() if rid in results else empty for rid in order]
        sr = torch.tensor(SAMPLING_RATE, dtype=torch.int32)
        return OmniOutput(text_hidden_states=None, multimodal_outputs={"model_outputs": audios, "sr": [sr] * num_reqs})
