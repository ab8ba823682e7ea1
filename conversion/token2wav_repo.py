"""The converted token2wav repo's files besides the weights: config.json with auto_map, remote code, model card."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from conversion.original_formats import ConversionError

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "llama_omni_hf"
AUTO_MAP = {
    "AutoConfig": "configuration_llama_omni2.LlamaOmni2Token2WavConfig",
    "AutoModel": "token2wav_llama_omni2.LlamaOmni2Token2Wav",
}
ARCHITECTURES = ["LlamaOmni2Token2Wav"]
ENTRY_FILES = ("configuration_llama_omni2.py", "token2wav_llama_omni2.py")


def remote_code_files(package_dir: Path = PACKAGE_DIR, entries=ENTRY_FILES) -> list[str]:
    """The entry files and every sibling they import with `from .x import ...`, transitively: transformers fetches
    a remote module's relative imports from the same repo, so all of them must be uploaded."""
    found, queue = [], list(entries)
    while queue:
        name = queue.pop(0)
        if name in found:
            continue
        path = package_dir / name
        if not path.is_file():
            raise ConversionError(f"remote-code file {path} is missing; is llama_omni_hf complete?")
        found.append(name)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                modules = [node.module] if node.module else [alias.name for alias in node.names]
                queue.extend(f"{m.split('.')[0]}.py" for m in modules)
    return found


def write_repo_files(directory: Path, config, card: str) -> list[str]:
    """config.json (auto_map, architectures), the remote code and README.md into `directory`."""
    config.auto_map = dict(AUTO_MAP)
    config.architectures = list(ARCHITECTURES)
    config.save_pretrained(directory)
    files = remote_code_files()
    for name in files:
        shutil.copyfile(PACKAGE_DIR / name, Path(directory) / name)
    (Path(directory) / "README.md").write_text(card)
    return files


def render_card(config, summary: dict) -> str:
    from transformers import __version__ as converted_with

    from llama_omni_hf.transformers_compat import MIN_TRANSFORMERS_VERSION

    speakers = ", ".join(f'`"{name}"`' for name in config.speakers)
    yaml_lines = "\n".join(f"- {line}" for line in summary["yaml"]) or "- (nothing to report)"
    sources = "\n".join(f"- {name}: {value}" for name, value in summary["sources"].items())
    voices = "\n".join(f"- `{name}`: {value}" for name, value in summary["speakers"].items())
    return f"""---
license: other
library_name: transformers
tags:
- llama-omni2
- cosyvoice2
- text-to-speech
- vocoder
- custom_code
---

# LLaMA-Omni2 speech decoder (CosyVoice2 token-to-wave) for 🤗 transformers

The speech decoder of [LLaMA-Omni2](https://arxiv.org/abs/2505.02625): CosyVoice 2's flow-matching model and HiFT
vocoder as released in `ICTNLP/cosy2_decoder`, in plain torch as transformers remote code. It turns the 6561-way
speech tokens (25 Hz) that LLaMA-Omni2's TTS model writes into a {config.sampling_rate // 1000} kHz waveform
({config.samples_per_token} samples per token). No CosyVoice, Matcha-TTS, onnxruntime or hyperpyyaml needed.

| part | what | parameters |
|---|---|---|
| flow | token embedding, chunk-causal Conformer encoder (x2 upsampling), conditional flow matching (10 Euler steps, CFG {config.inference_cfg_rate}) through a causal U-Net | {summary["flow_parameters"] / 1e6:.2f} M |
| HiFT | F0 predictor, harmonic source, upsampling {config.upsample_rates}, iSTFT (weight norm folded) | {summary["hift_parameters"] / 1e6:.2f} M |
| voices | CAM++ x-vectors: {speakers} (default `"{config.default_speaker}"`) | {len(config.speakers)} x {config.spk_embed_dim} |

## Licence

The weights are CosyVoice 2's pretrained flow-matching model and vocoder (FunAudioLLM), as redistributed by
ICTNLP for LLaMA-Omni2; this repository only re-packages them and grants no rights beyond those releases. The
LLaMA-Omni2 authors state that their models are for academic research only and may NOT be used commercially
(contact `fengyang@ict.ac.cn`). Check both releases' terms before use.

## Usage

Needs `transformers>={MIN_TRANSFORMERS_VERSION}` (converted with {converted_with}) and `trust_remote_code=True`:

```python
import soundfile as sf
from transformers import AutoModel

token2wav = AutoModel.from_pretrained("THIS_REPO", trust_remote_code=True)  # float32, as the original runs
wave = token2wav.token2wav([1630, 4212, 3123, 2187, 5412, 3027, 1891, 4401], speaker="en")  # float32 [N * {config.samples_per_token}]
sf.write("speech.wav", wave.numpy(), token2wav.sampling_rate)

state = token2wav.init_stream(speaker="en")  # streamed: feed tokens as they come
chunk = token2wav.stream(state, [1630, 4212, 3123, 2187, 5412, 3027, 1891], final=True)
```

`speaker` is one of the stored voices or any CAM++ x-vector of {config.spk_embed_dim} floats.

## How this repository was made

Converted with `conversion/convert_cosy2_decoder.py` of the llama-omni-hf project from:

{sources}

Every key of `flow.pt` and `hift.pt` was mapped by a table and every shape checked against the model;
HiFT's weight norm was folded exactly as torch computes it.

**Flow noise.** The original draws its fixed initial noise `[1, {config.num_mels}, {config.noise_frames}]` at
start-up from torch's global RNG without seeding it there (its state depends on the yaml's seeding and on every
module built before), so it is in no file and the real LLaMA-Omni2 audio cannot be reproduced bit for bit. Here: {summary["noise"]}. It is stored as the buffer `flow.noise`.

**Voices** (stored as `speakers.<name>`):

{voices}

**cosyvoice.yaml check:**

{yaml_lines}
"""
