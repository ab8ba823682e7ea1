"""Load a converted LLaMA-Omni2 repo with AutoModel/AutoProcessor only and answer one generated test signal.

    python -I conversion/verify_llama_omni2.py OUT [--dtype auto|float32|bfloat16|float16] [--max-new-tokens 8]

Imports nothing from this project and blocks `llama_omni_hf`, so it proves the repo runs from its own remote
code. Greedy text (the repo's generation config), seeded TTS sampling. Prints a human summary and, last, one line
`VERIFY {json}` for scripts and tests; exits 1 unless there is an answer and, when the repo has a token-to-wave
decoder and units came out, finite audio of exactly samples_per_token (960) samples per unit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import time
from pathlib import Path

sys.modules["llama_omni_hf"] = None  # importing it now raises ImportError: the repo must be self-sufficient


def _test_signal():
    """verify_converted.test_signal (a sibling file: `python -I` puts no script directory on sys.path)."""
    spec = importlib.util.spec_from_file_location("verify_converted", Path(__file__).resolve().parent /
                                                  "verify_converted.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.test_signal()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", help="converted directory or hub id")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the TTS sampling and HiFT")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModel, AutoProcessor

    start = time.time()
    processor = AutoProcessor.from_pretrained(args.repo, trust_remote_code=True)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModel.from_pretrained(args.repo, trust_remote_code=True, dtype=dtype).eval()
    loaded = time.time()
    signal = _test_signal()
    inputs = processor(audio=signal, sampling_rate=16000, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, return_dict_in_generate=True, seed=args.seed)
    done = time.time()
    answer = out.sequences[0, inputs["input_ids"].shape[1]:]
    audio = out.audio[0] if getattr(out, "audio", None) is not None else torch.zeros(0)
    units = out.units[0].tolist()
    result = {
        "model_class": type(model).__name__, "dtype": str(model.model.embed_tokens.weight.dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.parameters()), "load_seconds": round(loaded - start, 2),
        "generate_seconds": round(done - loaded, 2), "answer_ids": answer.tolist(),
        "answer_text": processor.tokenizer.decode(answer, skip_special_tokens=True), "unit_count": len(units),
        "first_units": units[:16],
        "audio_samples": int(audio.numel()), "sampling_rate": getattr(out, "sampling_rate", None),
        "audio_peak": float(audio.abs().max()) if audio.numel() else 0.0,
        "has_token2wav": getattr(model, "token2wav", None) is not None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print(f"loaded {result['model_class']} ({result['parameters'] / 1e6:.1f} M parameters, {result['dtype']}) "
          f"in {result['load_seconds']} s; answered a {len(signal) / 16000:.0f} s test tone in "
          f"{result['generate_seconds']} s:")
    print(f"  text ({len(answer)} tokens): {result['answer_text']!r}")
    rate = result["sampling_rate"] or 24000
    print(f"  units: {len(units)}, audio: {result['audio_samples'] / rate:.2f} s (peak {result['audio_peak']:.3f}); "
          f"peak memory {result['peak_rss_bytes'] / 2**30:.2f} GiB")
    print("VERIFY " + json.dumps(result))
    per_unit = model.config.token2wav_config.samples_per_token if result["has_token2wav"] else 0
    audio_ok = (not result["has_token2wav"] or not units
                or (result["audio_samples"] == per_unit * len(units) and bool(torch.isfinite(audio).all())))
    return 0 if len(answer) > 0 and audio_ok else 1


if __name__ == "__main__":
    sys.exit(main())
