"""Shared fixtures: one tiny checkpoint per session, the model and processor loaded from it, spoken questions.

Everything here is session-scoped and must be treated as read-only by tests; a test that trains or changes
settings takes its own copy (`fresh_model`).
"""

from __future__ import annotations

import os

# The tests start servers and subprocesses next to the test process on 2 cores; spinning OpenMP threads of
# one process then wait on the other's and tiny ops take milliseconds. One thread each keeps it fast.
# (Set before torch is imported; child processes inherit it.)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from llama_omni_hf.tiny import build_tiny_checkpoint

QUESTIONS = {
    "france": "What is the capital of France?",
    "tea": "How do I make a good cup of tea in the morning, and how long should it steep?",
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A complete tiny checkpoint directory (config with auto_map, remote code, weights, processor files).
    Built with a vocoder, as the demo's default, so the remote-code test loads every remote file."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints") / "llama-omni-tiny")


@pytest.fixture(scope="session")
def model(tiny_checkpoint):
    from llama_omni_hf.modeling_llama_omni import LlamaOmniForConditionalGeneration

    return LlamaOmniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="session")
def processor(tiny_checkpoint):
    from llama_omni_hf.processing_llama_omni import LlamaOmniProcessor

    # trust_remote_code: transformers' AutoTokenizer reads the checkpoint's (remote) config first
    return LlamaOmniProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)


@pytest.fixture
def fresh_model(tiny_checkpoint):
    """A private copy for tests that train, freeze or reconfigure."""
    from llama_omni_hf.modeling_llama_omni import LlamaOmniForConditionalGeneration

    return LlamaOmniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="session")
def speech():
    """Spoken questions: mono float32 16 kHz audio from espeak-ng, of different lengths."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/setup.sh installs it)")
    from llama_omni_hf.espeak import synthesize

    audio = {name: synthesize(text) for name, text in QUESTIONS.items()}
    assert len(audio["france"]) < len(audio["tea"])
    for wav in audio.values():
        assert wav.dtype == np.float32 and wav.ndim == 1 and np.abs(wav).max() > 0.05
    return audio


@pytest.fixture(scope="session")
def france_inputs(processor, speech):
    """Processor outputs for one spoken question with the default prompt (read-only)."""
    return processor(audio=speech["france"], sampling_rate=16000, return_tensors="pt")


@pytest.fixture(autouse=True)
def _seeded():
    """Random test inputs are the same in every run and whatever order the tests run in."""
    torch.manual_seed(0)
