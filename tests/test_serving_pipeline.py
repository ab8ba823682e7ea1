"""LLaMA-Omni's two-stage vllm-omni pipeline (serving/pipeline.py), checked in .venv-serve by subprocess:

- stage 1 (serving/llama_omni_unit2wav.py) fed like the engine feeds it (runtime_additional_information, two
  requests, three chunks, the last one `stream_finished`) returns exactly BatchedUnit2Wav's audio on the model's
  own weights, and frees every request; the stage-0 producer sends the last prompt row and one row per generated
  token, holding the newest back until the request finishes, and coalesces rows sent within its interval;
- end to end (serving/e2e_check.py): `python -m serving.pipeline serve` on a tiny checkpoint on 127.0.0.1, one
  spoken question streamed with llama_omni_hf.omni_client: the text equals in-process greedy `generate`'s, 16 kHz
  audio arrives and equals BatchedUnit2Wav on the in-process final-norm rows fed in the increments stage 1
  consumed (the producer coalesces rows by time; the server's trace says how), to 16-bit WAV rounding, the server
  stopped by PID leaves no process; then a restart: stopped by SIGTERM (status 0), the same command on the same
  port serves the same text, its audio again equal to the replay of its own increments. (Shared-memory segments left in /dev/shm are recorded, not
  asserted: vLLM 0.30's CPU executor leaves one or two of its message-queue segments behind at every stop, by
  whatever signal, and other servers on the machine make the count unattributable.)
Skipped, with the reason, without the serving environment (as tests/test_serving_platform.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_serving_platform import ENV, REPO, serve_venv  # noqa: E402,F401  (the skip-without-venv fixture)

STAGE1 = """
import json, sys, types, torch
from safetensors.torch import load_file
from transformers import AutoConfig
import serving
from serving.tiny_checkpoint import build_tiny_serving_checkpoint
from serving.llama_omni_unit2wav import LlamaOmniUnit2Wav, thinker_rows_async_chunk
from llama_omni_hf.modeling_llama_omni import LlamaOmniForConditionalGeneration
from llama_omni_hf.batched_unit2wav import BatchedUnit2Wav

ckpt = str(build_tiny_serving_checkpoint(sys.argv[1] + "/ckpt"))
config = AutoConfig.from_pretrained(ckpt, trust_remote_code=True)
H = config.text_config.hidden_size
model_config = types.SimpleNamespace(hf_config=config, get_hidden_size=lambda: H)
stage = LlamaOmniUnit2Wav(vllm_config=types.SimpleNamespace(model_config=model_config))
loaded = stage.load_weights(load_file(ckpt + "/model.safetensors").items())
reference = BatchedUnit2Wav(LlamaOmniForConditionalGeneration.from_pretrained(ckpt).eval())
torch.manual_seed(0)
rows = {r: torch.randn(12, H) for r in ("a", "b")}
for r in rows:
    reference.add_request(r)
want, got = {r: [] for r in rows}, {r: [] for r in rows}
for i in range(0, 12, 4):
    fin = {"a", "b"} if i == 8 else set()
    out = reference.step({r: rows[r][i:i + 4] for r in rows}, finished=fin)
    infos = [{"codes": {"audio": rows[r][i:i + 4]}, "meta": {"req_id": [r], "stream_finished": torch.tensor(bool(fin))}}
             for r in rows]
    served = stage(runtime_additional_information=infos, seq_token_counts=[1, 1])
    assert [int(s) for s in served.multimodal_outputs["sr"]] == [16000, 16000]
    for r, audio in zip(rows, served.multimodal_outputs["model_outputs"]):
        got[r].append(audio)
        want[r].append(out[r][1])
diffs = {r: (torch.cat(want[r]) - torch.cat(got[r])).abs().max().item() for r in rows}
lengths = {r: int(torch.cat(got[r]).numel()) for r in rows}

# keyed by the runner's own request ids (what `finished_req_ids` holds), not the payload's upstream id: an
# aborted request is freed by on_requests_finished; a payload arriving after a request's terminal one is ignored
def chunk(r, n, fin):
    return {"codes": {"audio": rows[r][:n]}, "meta": {"req_id": ["upstream-" + r],
                                                      "stream_finished": torch.tensor(fin)}}
ids = dict(request_ids=["stage-a", "stage-b"], seq_token_counts=[1, 1])
stage(runtime_additional_information=[chunk("a", 4, False), chunk("b", 4, False)], **ids)
keyed = sorted(stage.engine._requests)
stage.on_requests_finished({"stage-a"})
after_abort = sorted(stage.engine._requests)
out = stage(runtime_additional_information=[chunk("a", 4, False), chunk("b", 8, True)], **ids)
stale = int(out.multimodal_outputs["model_outputs"][0].numel())
out = stage(runtime_additional_information=[chunk("b", 4, True)], request_ids=["stage-b"], seq_token_counts=[1])
stale_after_finish = int(out.multimodal_outputs["model_outputs"][0].numel())
stage.on_requests_finished({"stage-c"})  # aborted before any rows came: nothing held, and it cannot start later
out = stage(runtime_additional_information=[chunk("a", 4, False)], request_ids=["stage-c"], seq_token_counts=[1])
stale += int(out.multimodal_outputs["model_outputs"][0].numel())
lifecycle = {"keyed": keyed, "after_abort": after_abort, "stale": stale, "stale_after_finish": stale_after_finish,
             "active": stage.engine.num_active}

# the producer: prompt of 5 ids, prefill in two chunks (3 + 2 rows), then 3 decode steps, finished at the last
class Request:
    external_req_id = "x"
    prompt_token_ids = [1, 2, 3, 4, 5]
    def __init__(self): self.done = False
    def is_finished(self): return self.done
import os
def produce(interval):
    os.environ["LLAMA_OMNI_SEND_INTERVAL_S"] = interval
    manager = types.SimpleNamespace(request_payload={})
    request = Request()
    sent = []
    for n, last in ((3, False), (2, False), (1, False), (1, False), (1, True)):
        request.done = last
        base = manager.request_payload.get("x", {}).get("_llama_omni_rows", {}).get("seen", 0)
        hidden = torch.arange(base, base + n, dtype=torch.float32)[:, None].repeat(1, H)
        payload = thinker_rows_async_chunk(manager, {"hidden": hidden}, request, is_finished=last)
        if payload is not None:
            sent.append(([int(v) for v in payload.codes.audio[:, 0]], bool(payload.meta.stream_finished)))
    return sent
sent, coalesced = produce("0"), produce("3600")
print("RESULT " + json.dumps({"loaded": len(loaded), "diffs": diffs, "lengths": lengths,
                              "active": stage.engine.num_active, "sent": sent, "coalesced": coalesced,
                              "lifecycle": lifecycle}))
"""


def _run(serve_venv, tmp_path, code_or_args, timeout):
    if isinstance(code_or_args, str):
        script = tmp_path / "check.py"
        script.write_text(textwrap.dedent(code_or_args))
        args = [str(script), str(tmp_path)]
    else:
        args = code_or_args
    run = subprocess.run([str(serve_venv), *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=timeout)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, (run.stdout[-3000:], run.stderr[-5000:])
    return run, json.loads(lines[-1][len("RESULT "):])


def test_unit2wav_stage_equals_batched_unit2wav_and_producer_sends_the_right_rows(serve_venv, tmp_path):
    run, result = _run(serve_venv, tmp_path, STAGE1, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert result["loaded"] > 0
    assert result["diffs"] == {"a": 0.0, "b": 0.0}
    assert min(result["lengths"].values()) > 0
    assert result["active"] == 0  # finished requests are freed
    # rows 0..2 and 3..4 are the prompt's (only row 4, the last, is kept); rows 5, 6, 7 come one per step;
    # each emission but the last keeps the newest row back
    assert result["sent"] == [[[4], False], [[5], False], [[6, 7], True]]
    # with a send interval no step reaches, only the first send goes at once and the rest waits for the end
    assert result["coalesced"] == [[[4], False], [[5, 6, 7], True]]
    # the runner's ids key the state; abort frees; nothing restarts a freed request
    assert result["lifecycle"] == {"keyed": ["stage-a", "stage-b"], "after_abort": ["stage-b"], "stale": 0,
                                   "stale_after_finish": 0, "active": 0}, result["lifecycle"]


def test_served_text_equals_in_process_generate_and_audio_arrives(serve_venv, tmp_path):
    run, result = _run(serve_venv, tmp_path, ["-m", "serving.e2e_check", str(tmp_path), "--timeout", "900",
                                              "--restart"], timeout=1800)
    served = result.get("served") or {}
    assert not result["left_running"], result
    assert "error" not in result, result.get("log_tail")
    assert served["text"] == result["expected"]["text"], result
    assert served["audio_samples"] > 0 and served["rates"] == [16000], result
    # the streamed audio is BatchedUnit2Wav's on the in-process final-norm rows fed in the increments stage 1
    # consumed (the server's trace), up to 16-bit WAV encoding; every row exactly once, the last step finishing
    audio = result["audio"]
    assert audio["expected_samples"] == served["audio_samples"] and audio["max_diff"] <= 1e-4, audio
    assert audio["match"] and audio["units"] > 0, audio
    # the two stage workers are not pinned to one and the same core (vLLM's "auto" OMP binding would put both on
    # core 0: the CPU deploy config sets nobind)
    workers = result["worker_cpus"]
    assert len(workers) == 2, workers
    if (os.cpu_count() or 1) > 1:
        assert not all(cpus == ["0"] for cpus in workers.values()), workers
    # the restart
    again = result["restart"]
    assert result["server_exit"] == 0 and again["server_exit"] == 0, result
    assert not again["left_running"], again
    assert again["served"]["text"] == served["text"], again
    assert again["audio"]["match"] and again["audio"]["max_diff"] <= 1e-4, again
    assert run.returncode == 0
