"""Load and faults on the served LLaMA-Omni pipeline (issue 12, item 5), one server start (serving/load_check.py)
in .venv-serve by subprocess, as tests/test_serving_pipeline.py:

- 1, 4 and 8 concurrent streamed questions, sampled with a different seed each (so answers differ): every
  stream gets 16 kHz audio; first text / first audio times are recorded, not asserted (with answers of a few
  tokens the audio may only come with the text's end);
- no cross-talk: each stream's audio equals BatchedUnit2Wav on the in-process final-norm rows of ITS OWN served
  token ids (teacher-forced), to 16-bit WAV rounding; where that reference's smallest CTC top-1/top-2 margin is
  below 1e-3 only the audio length is compared;
- a client closing its stream after its first text chunk leaves the other three streams matching, its state in
  the unit2wav stage is freed (the stage logs each freeing with the number of requests still active, which goes
  back to 0), and a later request succeeds;
- bad audio (zero-length WAV, corrupt base64, non-WAV bytes, over 30 s, NaN in a float WAV): HTTP 400 with a
  message saying what is wrong, and the server still up.
Skipped, with the reason, without the serving environment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_serving_platform import ENV, REPO  # noqa: E402


@pytest.fixture(scope="module")
def load_result(tmp_path_factory):
    from test_serving_platform import SERVE_PYTHON, skip_without_serving

    skip_without_serving()

    workdir = tmp_path_factory.mktemp("serving-load")
    run = subprocess.run([str(SERVE_PYTHON), "-m", "serving.load_check", str(workdir), "--timeout", "900"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, (run.stdout[-3000:], run.stderr[-5000:])
    result = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in result, (result.get("error"), result.get("traceback"), result.get("log_tail"))
    assert not result["left_running"], result["left_running"]
    return result


def _matches(stream, result):
    assert "error" not in stream, (stream, result.get("server_errors"))  # the server log's exception lines
    assert stream["rates"] == [16000] and stream["audio_samples"] > 0, stream
    assert stream["check"]["match"], stream


@pytest.mark.parametrize("n", [1, 4, 8])
def test_concurrent_sampled_streams_each_get_their_own_audio(load_result, n):
    streams = load_result["load"][str(n)]
    assert len(streams) == n
    for stream in streams:
        _matches(stream, load_result)
        assert stream["first_audio_s"] is not None and stream["first_text_s"] is not None
    if n > 1:  # the seeds made the answers differ: cross-talk would show
        assert len({tuple(s["token_ids"]) for s in streams}) > 1, streams


def test_a_disconnecting_client_does_not_disturb_the_others(load_result):
    disconnect = load_result["disconnect"]
    first, *others = disconnect["streams"]
    assert first["closed_early"], first
    for stream in others:
        _matches(stream, load_result)
    assert disconnect["server_up"]
    # every stream's stage-1 state was freed (the closed one's by the abort, "cancelled" if it was aborted before
    # any of its rows reached stage 1, or by its end if it was already complete) and nothing stayed active
    freed = disconnect["freed"]
    for response_id in first["response_ids"] + [r for s in others for r in s["response_ids"]]:
        assert freed["found"].get(response_id), (response_id, freed)
    assert freed["found"][first["response_ids"][0]]["why"] in ("aborted", "cancelled", "finished"), freed
    for stream in others:
        assert freed["found"][stream["response_ids"][0]]["why"] == "finished", freed
    assert freed["active_after"] == 0, freed
    _matches(disconnect["later"], load_result)


BAD_AUDIO = ["zero_length_wav", "corrupt_base64", "non_wav_bytes", "over_30_s", "nan_float_wav"]


@pytest.mark.parametrize("case", BAD_AUDIO)
def test_bad_audio_gets_a_clear_error_and_the_server_stays_up(load_result, case):
    response = load_result["bad_audio"][case]
    assert "skipped" not in response, response
    assert response["server_up_after"], response
    assert response["status"] == 400 and response["clear_error"], response
    message = json.loads(response["body"])["error"]["message"]
    assert message.strip(), response
    if case == "over_30_s":  # refused by the thinker's processor (the in-process processor cuts with a warning)
        assert "30 s" in message and "31.0 s" in message, message


def test_the_server_answers_after_everything(load_result):
    final = load_result["final_request"]
    assert final.get("error") is None and final["text"] and final["audio_chunks"] > 0, \
        (final, load_result.get("server_errors"))


def test_stop_strings_are_refused_at_once(load_result):
    """vllm-omni 0.30 aborts only stage 0 on a matched stop string, so the answer would never complete: refused at
    once, saying what to use instead."""
    response = load_result["stop_strings"]
    # vllm-omni validates sampling parameters once the stream has begun: an error event, not an HTTP status
    said = response.get("body", "") + " ".join(response.get("error_events", []))
    assert response["clear_error"] and "stop_token_ids" in said, response
    assert response["s"] < 30 and response["server_up_after"], response


def test_the_server_logged_no_error_but_the_refusals(load_result):
    """A stage that dies (e.g. vLLM's CPU sampler on a split seeded prompt, serving/cpu_workers.py) fails here with
    its root cause, whatever the requests saw; the only exceptions expected are the refused bad requests."""
    expected = ("audio[0] ", "base64", "Invalid data found", "corrupted audio", "`stop` strings")
    unexpected = [line for line in load_result["server_errors"] if not any(tag in line for tag in expected)]
    assert unexpected == [], unexpected
