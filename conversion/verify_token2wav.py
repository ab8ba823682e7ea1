"""Load a converted token2wav repo with AutoModel only and decode a few speech tokens.

    python -I conversion/verify_token2wav.py OUT [--units 12]

Imports nothing from this project and blocks `llama_omni_hf`, so it proves the repo runs from its own remote
code. Prints a human summary and, last, one line `VERIFY {json}` for scripts and tests; exits 1 unless the
waveform is finite, not silent and exactly units x samples_per_token long.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

sys.modules["llama_omni_hf"] = None  # importing it now raises ImportError: the repo must be self-sufficient


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", help="converted directory or hub id")
    parser.add_argument("--units", type=int, default=12, help="how many speech tokens to decode")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModel

    start = time.time()
    model = AutoModel.from_pretrained(args.repo, trust_remote_code=True).eval()
    loaded = time.time()
    config = model.config
    units = (torch.arange(args.units) * 977 + 31) % config.vocab_size  # a fixed, varied token sequence
    wave = model.token2wav(units, speaker=config.default_speaker, generator=torch.Generator().manual_seed(0))
    done = time.time()
    expected = args.units * config.samples_per_token
    result = {
        "model_class": type(model).__name__, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.parameters()), "speakers": list(config.speakers),
        "units": args.units, "samples": int(wave.numel()), "expected_samples": expected,
        "sampling_rate": config.sampling_rate, "finite": bool(torch.isfinite(wave).all()),
        "peak": float(wave.abs().max()) if wave.numel() else 0.0,
        "load_seconds": round(loaded - start, 2), "decode_seconds": round(done - loaded, 2),
    }
    print(f"loaded {result['model_class']} ({result['parameters'] / 1e6:.1f} M parameters, {result['dtype']}, voices "
          f"{result['speakers']}) in {result['load_seconds']} s; {args.units} tokens -> {result['samples']} samples "
          f"({result['samples'] / config.sampling_rate:.2f} s, peak {result['peak']:.3f}) in "
          f"{result['decode_seconds']} s")
    print("VERIFY " + json.dumps(result))
    ok = result["finite"] and result["samples"] == expected and result["peak"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
