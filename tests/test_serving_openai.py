"""The served pipeline through the official `openai` Python client (serving/openai_check.py), in .venv-serve by
subprocess: `python -m serving.pipeline serve` on a tiny checkpoint, four different spoken questions streamed at
once with `client.chat.completions.create(..., modalities=["text", "audio"], stream=True)`, each stream's text equal
to the repo's own client's answer (llama_omni_hf.omni_client, one question at a time) and to in-process greedy
`generate`, its 16 kHz audio as long as omni_client's; a `stream=False` answer with the same text and audio; the
model name from `/v1/models`. Skipped, with the reason, without the serving environment (as
tests/test_serving_platform.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_serving_platform import ENV, REPO, serve_venv  # noqa: E402,F401  (the skip-without-venv fixture)


def test_openai_client_streams_several_questions_at_once(serve_venv, tmp_path):
    run = subprocess.run([str(serve_venv), "-m", "serving.openai_check", str(tmp_path), "--timeout", "900"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1500)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, (run.stdout[-3000:], run.stderr[-5000:])
    result = json.loads(lines[-1][len("RESULT "):])
    context = json.dumps({k: v for k, v in result.items() if k != "log_tail"}, indent=1)[-6000:]
    assert not result.get("left_running"), context
    assert "error" not in result, result.get("log_tail")
    assert result["models"] == ["tiny-omni"] and result["model"] == "tiny-omni", context
    streams = result["streams"]
    assert len(streams) == 4 and all("error" not in s for s in streams), context
    for stream, expected in zip(streams, result["expected_texts"]):
        # the openai stream's text is omni_client's, which is in-process greedy generate's
        assert stream["text"] == stream["reference_text"] == expected, context
        assert stream["text_deltas"] > 1 and stream["audio_chunks"] > 1, context
        assert set(stream["modalities"]) == {"text", "audio"}, context
        assert stream["rates"] == [16000] and stream["audio_samples"] == stream["reference_audio_samples"] > 0
    # every question has its own answer (own max_tokens), so mixed-up streams could not pass the checks above
    assert result["distinct_texts"] == 4, context
    assert result["sent_together"], context  # all four requests were in flight before any answer ended
    full = result["non_streamed"]
    assert full["text"] == streams[0]["reference_text"], context
    assert full["rates"] == [16000] and full["audio_samples"] == streams[0]["reference_audio_samples"], context
    assert result["failed"] == [] and result["ok"] and run.returncode == 0, context
