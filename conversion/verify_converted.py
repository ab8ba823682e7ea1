"""Load a converted repo with AutoModel/AutoProcessor only and answer one generated test signal, greedily.

    python -I conversion/verify_converted.py OUT [--dtype auto|float32|bfloat16|float16] [--max-new-tokens 8]

Imports nothing from this project and blocks `llama_omni_hf`, so it proves the repo runs from its own remote
code. Prints a human summary and, last, one line `VERIFY {json}` for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

sys.modules["llama_omni_hf"] = None  # importing it now raises ImportError: the repo must be self-sufficient


def test_signal(seconds: float = 2.0, rate: int = 16000):
    """A vowel-like tone (140 Hz with decaying harmonics, slow vibrato, fade in/out), peak 0.5."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(140 + 6 * np.sin(2 * np.pi * 5 * t)) / rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.minimum(1, np.minimum(t, t[-1] - t) / 0.1)
    wave = wave * envelope
    return (0.5 * wave / np.abs(wave).max()).astype(np.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", help="converted directory or hub id")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModel, AutoProcessor

    start = time.time()
    processor = AutoProcessor.from_pretrained(args.repo, trust_remote_code=True)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModel.from_pretrained(args.repo, trust_remote_code=True, dtype=dtype).eval()
    loaded = time.time()
    inputs = processor(audio=test_signal(), sampling_rate=16000, return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=args.max_new_tokens,
                         return_dict_in_generate=True)
    done = time.time()
    answer = out.sequences[0, inputs["input_ids"].shape[1]:]
    audio = out.audio[0] if getattr(out, "audio", None) is not None else torch.zeros(0)
    result = {
        "model_class": type(model).__name__, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.parameters()), "load_seconds": round(loaded - start, 2),
        "generate_seconds": round(done - loaded, 2), "answer_ids": answer.tolist(),
        "answer_text": processor.tokenizer.decode(answer, skip_special_tokens=True),
        "units": out.units[0].tolist(), "audio_samples": int(audio.numel()),
        "audio_peak": float(audio.abs().max()) if audio.numel() else 0.0,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print(f"loaded {result['model_class']} ({result['parameters'] / 1e6:.1f} M parameters, {result['dtype']}) "
          f"in {result['load_seconds']} s; answered a {len(test_signal()) / 16000:.0f} s test tone in "
          f"{result['generate_seconds']} s:")
    print(f"  text ({len(answer)} tokens): {result['answer_text']!r}")
    print(f"  units: {len(result['units'])}, audio: {result['audio_samples'] / 16000:.2f} s "
          f"(peak {result['audio_peak']:.3f}); peak memory {result['peak_rss_bytes'] / 2**30:.2f} GiB")
    print("VERIFY " + json.dumps(result))
    ok = len(answer) > 0 and (result["audio_samples"] > 0 or not result["units"] or model.vocoder is None)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
