"""The saved checkpoint is self-sufficient remote code: it loads and runs where `llama_omni_hf` cannot be
imported, through transformers' Auto classes, and gives what the package gives in-process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter, outside the repo, with the (editable-installed) package blocked.
REMOTE_SCRIPT = textwrap.dedent(
    r"""
    import importlib.abc
    import sys

    class BlockLlamaOmniHf(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "llama_omni_hf" or name.startswith("llama_omni_hf."):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockLlamaOmniHf())
    try:
        import llama_omni_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("llama_omni_hf is importable: the test would prove nothing")

    import json
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

    checkpoint, audio_path, out_path = sys.argv[1:4]
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    inputs = processor(audio=np.load(audio_path), sampling_rate=16000, return_tensors="pt")
    result = {"inputs": dict(inputs), "classes": {"config": type(config).__module__ + "." + type(config).__name__,
                                                  "processor": type(processor).__module__ + "." + type(processor).__name__}}
    for auto in (AutoModel, AutoModelForCausalLM):
        model = auto.from_pretrained(checkpoint, trust_remote_code=True).eval()
        with torch.no_grad():
            result[auto.__name__] = model(**inputs).logits
        result["classes"][auto.__name__] = type(model).__module__ + "." + type(model).__name__
    result["classes"]["vocoder"] = type(model.vocoder).__module__ + "." + type(model.vocoder).__name__
    output = model.generate(**inputs, do_sample=False, max_new_tokens=4, eos_token_id=[1],
                            return_dict_in_generate=True, return_audio=False)
    result["sequences"], result["units"] = output.sequences, output.units
    # streamed: the same answer chunk by chunk, with audio from the remote vocoder
    chunks = list(model.generate_stream(**inputs, tokenizer=processor.tokenizer, do_sample=False, max_new_tokens=4,
                                        eos_token_id=[1], chunk_size=2))
    result["streamed"] = {"sequences": chunks[-1].sequences, "units": chunks[-1].all_units,
                          "audio_samples": sum(len(c.audio) for c in chunks)}
    # saved and reloaded (remote code travels with the save): the same logits
    saved = out_path + ".saved"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    reloaded = AutoModel.from_pretrained(saved, trust_remote_code=True).eval()
    with torch.no_grad():
        result["reloaded"] = reloaded(**AutoProcessor.from_pretrained(saved, trust_remote_code=True)(
            audio=np.load(audio_path), sampling_rate=16000, return_tensors="pt")).logits
    result["classes"]["loaded"] = sorted(name for name in sys.modules if "llama_omni" in name.lower())
    torch.save(result, out_path)
    """
)


@torch.no_grad()
def test_checkpoint_runs_through_auto_classes_without_the_package(tiny_checkpoint, model, france_inputs, speech,
                                                                   tmp_path):
    audio_path, out_path = tmp_path / "question.npy", tmp_path / "remote.pt"
    np.save(audio_path, speech["france"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    work_dir = tmp_path / "elsewhere"  # not the repo: the package cannot come from the current directory
    work_dir.mkdir()
    completed = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tiny_checkpoint), str(audio_path), str(out_path)],
        cwd=work_dir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    remote = torch.load(out_path, weights_only=False)

    classes = remote["classes"]
    assert not any(name.startswith("llama_omni_hf") for name in classes["loaded"]), classes["loaded"]
    for key in ("config", "processor", "AutoModel", "AutoModelForCausalLM", "vocoder"):
        assert classes[key].startswith("transformers_modules."), (key, classes[key])
    assert classes["AutoModel"].endswith(".LlamaOmniForConditionalGeneration")
    assert classes["processor"].endswith(".LlamaOmniProcessor")

    # the remote processor builds exactly the in-process inputs
    assert set(remote["inputs"]) == set(france_inputs)
    for key, value in france_inputs.items():
        torch.testing.assert_close(remote["inputs"][key], value, rtol=0, atol=0)
    # the same logits as the package model in this process
    expected = model(**france_inputs).logits
    for auto in ("AutoModel", "AutoModelForCausalLM"):
        torch.testing.assert_close(remote[auto], expected, rtol=1e-5, atol=1e-6)
    local = model.generate(**france_inputs, do_sample=False, max_new_tokens=4, eos_token_id=[1],
                           return_dict_in_generate=True, return_audio=False)
    assert remote["sequences"].tolist() == local.sequences.tolist()
    assert [u.tolist() for u in remote["units"]] == [u.tolist() for u in local.units]
    streamed = remote["streamed"]
    assert streamed["sequences"].tolist() == local.sequences.tolist()
    assert streamed["units"].tolist() == local.units[0].tolist()
    if len(local.units[0]):
        assert streamed["audio_samples"] > 0
    torch.testing.assert_close(remote["reloaded"], expected, rtol=1e-5, atol=1e-6)


def test_remote_files_are_listed_in_auto_map(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    for auto in ("AutoConfig", "AutoModel", "AutoModelForCausalLM"):
        module, _ = config["auto_map"][auto].split(".")
        assert (tiny_checkpoint / f"{module}.py").is_file()
    processor_config = json.loads((tiny_checkpoint / "processor_config.json").read_text())
    module, _ = processor_config["auto_map"]["AutoProcessor"].split(".")
    assert (tiny_checkpoint / f"{module}.py").is_file()
    # the remote files import each other relatively, never the package
    for path in tiny_checkpoint.glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+llama_omni_hf", path.read_text(), re.M), path.name


@pytest.mark.parametrize("name", ["configuration_llama_omni.py", "modeling_llama_omni.py",
                                  "processing_llama_omni.py", "vocoder_llama_omni.py",
                                  "transformers_compat.py", "configuration_llama_omni2.py",
                                  "token2wav_llama_omni2.py", "modeling_llama_omni2.py",
                                  "processing_llama_omni2.py"])
def test_remote_files_need_only_torch_transformers_numpy(name):
    """transformers refuses to load remote code whose imports (outside try blocks, in functions too) are not
    installed: a Hub user has torch, transformers and numpy, nothing of ours (soundfile is optional)."""
    import sys

    from transformers.dynamic_module_utils import get_imports

    third_party = {m for m in get_imports(REPO / "llama_omni_hf" / name) if m not in sys.stdlib_module_names}
    assert third_party <= {"torch", "transformers", "numpy"}, third_party
