"""`llama-omni answer`: the command-line answer to a spoken question, against the model called directly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from llama_omni_hf.cli import main

MAX_NEW_TOKENS = "4"


@pytest.fixture(scope="module")
def question_wav(speech, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "question.wav"
    sf.write(path, speech["france"], 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def direct_answer(model, processor, question_wav):
    """What the model gives when called directly on the same file."""
    samples, rate = sf.read(question_wav, dtype="float32")
    inputs = processor(audio=samples, sampling_rate=rate, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=int(MAX_NEW_TOKENS),
                             return_dict_in_generate=True, return_audio=True)
    answer = out.sequences[0, inputs["input_ids"].shape[1]:]
    return processor.decode(answer, skip_special_tokens=True).strip(), out.units[0].tolist(), out.audio[0]


def test_answer_prints_the_text_and_units_and_writes_the_speech(tiny_checkpoint, question_wav, direct_answer,
                                                                capsys, tmp_path):
    text, units, audio = direct_answer
    wav = tmp_path / "answer.wav"
    code = main(["answer", str(question_wav), "--model", str(tiny_checkpoint), "--max-new-tokens", MAX_NEW_TOKENS,
                 "--units", "--output-wav", str(wav)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == f"{text}\nunits: {' '.join(map(str, units))}\n"
    written, rate = sf.read(wav, dtype="float32")
    assert rate == 16000 and len(written) == len(audio) > 0
    np.testing.assert_allclose(written, audio.numpy(), atol=1e-4)  # 16-bit PCM


def _write(path, content):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.wav", r"llama-omni: error: audio file not found: .*missing\.wav"),
        (lambda d: _write(d / "empty.wav", b""), r"llama-omni: error: audio file is empty"),
        (lambda d: _write(d / "notes.wav", b"not audio at all\n" * 50),
         r"llama-omni: error: cannot read notes\.wav as audio"),
    ],
    ids=["missing", "empty", "not-audio"],
)
def test_unreadable_files_give_one_clear_line(make, message, tmp_path, capsys):
    # checked before any model is loaded (no --model: the embedded default is never built)
    code = main(["answer", str(make(tmp_path))])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert re.search(message, captured.err), captured.err


def test_silent_recording_is_rejected_with_the_processor_message(tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(16000, np.float32), 16000)
    code = main(["answer", str(path), "--model", str(tiny_checkpoint)])
    captured = capsys.readouterr()
    assert code == 2
    assert "llama-omni: error: audio[0] is silent (peak below 1e-4): there is no speech to answer" in captured.err


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("llama-omni")
    assert script.exists(), "pip install -e . creates the `llama-omni` command"
    completed = subprocess.run([str(script), "answer", "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and "--model" in completed.stdout


@pytest.mark.parametrize(
    "options, message",
    [
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nonsense"], "device"),
        (["--output-wav", "/no/such/directory/answer.wav"], "its directory does not exist"),
        (["--temperature", "-1"], "--temperature >= 0"),
        (["--top-p", "0"], "0 < --top-p <= 1"),
    ],
)
def test_bad_options_fail_before_generating(options, message, tiny_checkpoint, question_wav, capsys):
    code = main(["answer", str(question_wav), "--model", str(tiny_checkpoint), *options])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_model_directory_is_named(question_wav, capsys):
    code = main(["answer", str(question_wav), "--model", "./no/such/model"])
    assert code == 2 and "model directory not found: ./no/such/model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def omni2_checkpoint(tmp_path_factory):
    from llama_omni_hf.tiny import build_tiny_omni2_checkpoint

    return build_tiny_omni2_checkpoint(tmp_path_factory.mktemp("cli-omni2") / "omni2")


def test_answer_with_a_llama_omni2_checkpoint_writes_24khz_speech_in_the_chosen_voice(omni2_checkpoint, question_wav,
                                                                                       capsys, tmp_path):
    """The same command for the other family: text, units and the 24 kHz answer equal the model called directly
    with the same voice (greedy TTS is not a CLI option, so both sides seed the global RNG the same way)."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(omni2_checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(omni2_checkpoint, trust_remote_code=True)
    samples, rate = sf.read(question_wav, dtype="float32")
    inputs = processor(audio=samples, sampling_rate=rate, return_tensors="pt")
    torch.manual_seed(7)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=int(MAX_NEW_TOKENS), return_dict_in_generate=True,
                         return_audio=True, speaker="zh")
    text = processor.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    wav = tmp_path / "answer.wav"
    torch.manual_seed(7)
    code = main(["answer", str(question_wav), "--model", str(omni2_checkpoint), "--max-new-tokens", MAX_NEW_TOKENS,
                 "--units", "--speaker", "zh", "--output-wav", str(wav)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == f"{text}\nunits: {' '.join(map(str, out.units[0].tolist()))}\n"
    written, written_rate = sf.read(wav, dtype="float32")
    assert written_rate == 24000 and len(written) == len(out.audio[0]) > 0
    np.testing.assert_allclose(written, out.audio[0].numpy(), atol=1e-4)  # 16-bit PCM
    assert main(["answer", str(question_wav), "--model", str(omni2_checkpoint), "--speaker", "fr"]) == 2
    assert "unknown speaker 'fr'" in capsys.readouterr().err


def test_speaker_is_refused_for_a_llama_omni_checkpoint(tiny_checkpoint, question_wav, capsys):
    assert main(["answer", str(question_wav), "--model", str(tiny_checkpoint), "--speaker", "en"]) == 2
    assert "--speaker chooses a LLaMA-Omni2 voice" in capsys.readouterr().err
