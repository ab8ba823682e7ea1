"""Stage 0 of LLaMA-Omni on vLLM (serving/llama_omni_thinker.py), checked in .venv-serve by subprocess: a tiny
converted checkpoint with head_dim 32 (serving/tiny_checkpoint.py) served by vLLM's offline engine on the CPU
answers two questions, batched, with exactly the greedy text tokens of the in-process `generate`.
Skipped, with the reason, without the serving environment (as tests/test_serving_platform.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_serving_platform import ENV, REPO, serve_venv  # noqa: E402,F401  (the skip-without-venv fixture)

CHECK = """
import json, sys
import numpy as np, torch

def main(workdir):
    from serving.tiny_checkpoint import build_tiny_serving_checkpoint
    from llama_omni_hf.modeling_llama_omni import LlamaOmniForConditionalGeneration
    from llama_omni_hf.processing_llama_omni import LlamaOmniProcessor

    ckpt = str(build_tiny_serving_checkpoint(workdir + "/ckpt"))
    proc = LlamaOmniProcessor.from_pretrained(ckpt)
    model = LlamaOmniForConditionalGeneration.from_pretrained(ckpt).eval()
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    wavs = [(0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
            for f in (220, 700)]
    sid = proc.speech_token_id
    hf, prompts = [], []
    for wav in wavs:
        inputs = proc(audio=wav, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False, return_units=False)
        ids = inputs["input_ids"][0].tolist()
        hf.append(out[0, len(ids):].tolist())
        first = ids.index(sid)  # vLLM expands the one <speech> id itself
        prompts.append(ids[:first + 1] + [i for i in ids[first:] if i != sid])
    del model
    from vllm import LLM, SamplingParams
    llm = LLM(model=ckpt, trust_remote_code=True, max_model_len=1024, max_num_seqs=4, enforce_eager=True,
              dtype="float32", limit_mm_per_prompt={"audio": 1})
    res = llm.generate([{"prompt_token_ids": p, "multi_modal_data": {"audio": (w, 16000)}}
                        for p, w in zip(prompts, wavs)], SamplingParams(temperature=0.0, max_tokens=16))
    print("RESULT " + json.dumps({"hf": hf, "vllm": [list(r.outputs[0].token_ids) for r in res],
                                  "prompt_lens": [len(r.prompt_token_ids) for r in res],
                                  "hf_prompt_lens": [len(p) - 1 + 300 for p in prompts]}))

if __name__ == "__main__":
    main(sys.argv[1])
"""


def test_thinker_greedy_tokens_equal_in_process_generate(serve_venv, tmp_path):
    script = tmp_path / "check_thinker.py"
    script.write_text(textwrap.dedent(CHECK))
    env = dict(ENV, VLLM_CPU_KVCACHE_SPACE="1")
    run = subprocess.run([str(serve_venv), str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, (run.stdout[-3000:], run.stderr[-5000:])
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["prompt_lens"] == result["hf_prompt_lens"]  # <speech> -> 300 placeholders
    assert result["vllm"] == result["hf"]
