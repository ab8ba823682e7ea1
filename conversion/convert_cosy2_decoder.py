"""Convert ICTNLP/cosy2_decoder (CosyVoice2's flow.pt + hift.pt) into a Hugging Face repo for LlamaOmni2Token2Wav.

    python -m conversion.convert_cosy2_decoder --decoder-dir models/cosy2_decoder --output cosy2-token2wav-hf \\
        --prompt-wav en=prompt_en.wav --prompt-wav zh=prompt_zh.wav [--campplus FILE] \\
        [--speaker NAME=FILE ...] [--flow-noise seed0|FILE] [--config CONFIG.json] [--overwrite] [--verify]

Reads flow.pt / hift.pt with torch.load(weights_only=True), maps every key by the table in key_map_omni2.py, folds
HiFT's weight norm, adds the flow's fixed noise (spec Q5) and the speaker x-vectors (spec §4), checks every key
and shape against LlamaOmni2Token2Wav, and writes OUT atomically (a temporary directory next to it, renamed at the
end: an error leaves no OUT). cosyvoice.yaml, when present, is read as data and checked against the config.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `conversion` and `llama_omni_hf` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from conversion.cosyvoice_yaml import read_and_check_yaml
from conversion.decoder_inputs import make_noise, read_flow, read_hift
from conversion.key_map import Entry, check_against_model
from conversion.key_map_omni2 import fold_weight_norm, map_decoder_keys
from conversion.original_formats import ConversionError, read_json
from conversion.speaker_embedding import campplus_session, campplus_xvector, read_speaker_file
from conversion.token2wav_repo import render_card, write_repo_files
from conversion.writing import atomic_directory

FLOW_FILE, HIFT_FILE, YAML_FILE, CAMPPLUS_FILE = "flow.pt", "hift.pt", "cosyvoice.yaml", "campplus.onnx"


# --------------------------------------------------------------------------- inputs


def check_speaker_sources(speaker_files: dict, prompt_wavs: dict):
    """At least one voice, each from one source (checked before any file is read)."""
    clash = sorted(set(speaker_files) & set(prompt_wavs))
    if clash:
        raise ConversionError(f"speaker(s) {clash} given by both --speaker and --prompt-wav; pick one")
    if not speaker_files and not prompt_wavs:
        raise ConversionError(
            "no speaker voice given: a converted repo needs at least one x-vector (its default voice). Either\n"
            "  --prompt-wav en=prompt_en.wav [--prompt-wav zh=prompt_zh.wav] [--campplus campplus.onnx]  "
            "(the prompt wavs of the LLaMA-Omni2 GitHub repo, llama_omni2/inference/; campplus.onnx from the "
            "decoder directory; needs onnxruntime: pip install 'llama-omni-hf[convert-speakers]'), or\n"
            "  --speaker en=en.npy [--speaker zh=zh.pt]  (precomputed CAM++ x-vectors [192] or [1, 192] as "
            ".npy, .pt or .safetensors)")


def collect_speakers(config, speaker_files: dict, campplus, prompt_wavs: dict) -> tuple[dict, dict]:
    """name -> float32 [spk_embed_dim] from the given files and/or CAM++ on prompt wavs; name -> provenance."""
    check_speaker_sources(speaker_files, prompt_wavs)
    vectors, how = {}, {}
    for name, path in speaker_files.items():
        vectors[name] = read_speaker_file(path, name, config.spk_embed_dim)
        how[name] = f"x-vector read from `{Path(path).name}`"
    if prompt_wavs:
        if campplus is None:
            raise ConversionError("--prompt-wav needs the CAM++ model: --campplus campplus.onnx (or put it in "
                                  "--decoder-dir)")
        session = campplus_session(campplus)
        for name, wav in prompt_wavs.items():
            vectors[name] = campplus_xvector(session, wav, name, config.spk_embed_dim)
            how[name] = f"CAM++ (`{Path(campplus).name}`) on `{Path(wav).name}`, the original's front end"
    return vectors, how


def with_changes(config, **changes):
    try:
        return type(config).from_dict({**config.to_dict(), **changes})
    except (ValueError, TypeError) as err:
        raise ConversionError(f"invalid token2wav config: {err}") from None


# --------------------------------------------------------------------------- the conversion


def expected_state(config) -> dict[str, tuple[int, ...]]:
    """Key -> shape of LlamaOmni2Token2Wav(config), built on the meta device (no memory)."""
    from llama_omni_hf.token2wav_llama_omni2 import LlamaOmni2Token2Wav

    with torch.device("meta"):
        model = LlamaOmni2Token2Wav(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def plan_conversion(source_shapes: dict, extra_shapes: dict, config) -> dict[str, Entry]:
    """Prefixed source key (`flow:` / `hift:`) -> shape, plus the converter's own targets (noise, x-vectors) ->
    one Entry per LlamaOmni2Token2Wav key. Every target key produced, every shape equal, every source key used:
    otherwise a ConversionError listing all the differences. Shapes only: nothing is read here."""
    plan = map_decoder_keys(source_shapes)
    entries = {}
    for target, candidates in plan.entries.items():
        if len(candidates) > 1:  # e.g. `X.bias` and `generator.X.bias` in one hift.pt
            plan.problems.append(f"{target} comes from several keys: {[c.sources for c in candidates]}")
        entries[target] = candidates[0]
    for target, shape in extra_shapes.items():
        entries[target] = Entry(target, "copy", [f"converter:{target}"], tuple(shape))
    problems = check_against_model(entries, expected_state(config), plan)
    if problems:
        raise ConversionError("the decoder files do not match LlamaOmni2Token2Wav:\n" + "\n".join(problems))
    return entries


def convert_decoder_state_dicts(flow_sd: dict, hift_sd: dict, config, noise: torch.Tensor,
                                speakers: dict) -> dict[str, torch.Tensor]:
    """Original flow.pt / hift.pt state dicts (+ noise [1, 80, F], x-vectors name -> [192]) -> LlamaOmni2Token2Wav's
    state dict, float32 (the LLaMA-Omni2 converter nests it under `token2wav.`)."""
    sources = {f"flow:{k}": v for k, v in flow_sd.items()}
    sources.update({f"hift:{k}": v for k, v in hift_sd.items()})
    extras = {"flow.noise": noise, **{f"speakers.{name}": v for name, v in speakers.items()}}
    sources.update({f"converter:{k}": v for k, v in extras.items()})
    entries = plan_conversion({k: tuple(v.shape) for k, v in sources.items() if not k.startswith("converter:")},
                              {k: tuple(v.shape) for k, v in extras.items()}, config)
    out = {}
    for target, entry in entries.items():
        if entry.transform == "fold_weight_norm":
            out[target] = fold_weight_norm(*(sources[k] for k in entry.sources))
        else:
            tensor = sources[entry.sources[0]]
            out[target] = tensor.to(torch.float32).contiguous() if tensor.is_floating_point() else tensor.contiguous()
    return out


def prepare(decoder_dir, config=None, flow_noise: str = "seed0", speaker_files=None, campplus=None,
            prompt_wavs=None) -> tuple[dict, object, dict]:
    """Read and check everything; nothing is written. Returns (tensors, config, summary)."""
    from llama_omni_hf.configuration_llama_omni2 import LlamaOmni2Token2WavConfig

    decoder_dir = Path(decoder_dir)
    speaker_files, prompt_wavs = dict(speaker_files or {}), dict(prompt_wavs or {})
    check_speaker_sources(speaker_files, prompt_wavs)
    if not decoder_dir.is_dir():
        raise ConversionError(f"--decoder-dir {decoder_dir} is not a directory (download ICTNLP/cosy2_decoder)")
    config = config if config is not None else LlamaOmni2Token2WavConfig()
    flow_sd, hift_sd = read_flow(decoder_dir / FLOW_FILE), read_hift(decoder_dir / HIFT_FILE)
    shown = Path(decoder_dir.absolute().name)  # the card names the download, not this machine's paths
    yaml_lines, sources = [], {"flow": f"`{shown / FLOW_FILE}`", "HiFT": f"`{shown / HIFT_FILE}`"}
    if (decoder_dir / YAML_FILE).is_file():
        report = read_and_check_yaml(decoder_dir / YAML_FILE, config)
        if report.errors:
            raise ConversionError(f"{decoder_dir / YAML_FILE} does not match the config:\n    " +
                                  "\n    ".join(report.errors))
        config = with_changes(config, **report.overrides) if report.overrides else config
        yaml_lines = [report.summary(), *report.warnings, *report.notes]
        sources["config check"] = f"`{shown / YAML_FILE}`"
    else:
        yaml_lines = [f"no {YAML_FILE} in the decoder directory: the released hyper-parameters (spec §1.5) were used "
                      "unchecked; the key and shape check against flow.pt / hift.pt still applies"]
    if prompt_wavs and campplus is None and (decoder_dir / CAMPPLUS_FILE).is_file():
        campplus = decoder_dir / CAMPPLUS_FILE
    vectors, voices = collect_speakers(config, speaker_files, campplus, prompt_wavs)
    names = [n for n in config.speakers if n in vectors] + [n for n in vectors if n not in config.speakers]
    default = config.default_speaker if config.default_speaker in names else names[0]
    config = with_changes(config, speakers=names, default_speaker=default)
    noise, noise_how = make_noise(flow_noise, config)
    tensors = convert_decoder_state_dicts(flow_sd, hift_sd, config, noise, vectors)
    count = lambda prefix: sum(t.numel() for k, t in tensors.items() if k.startswith(prefix))  # noqa: E731
    summary = dict(tensors=len(tensors), flow_parameters=count("flow.") - noise.numel(),
                   hift_parameters=count("hift."), noise=noise_how, speakers=voices, yaml=yaml_lines,
                   sources=sources, source_tensors={"flow": len(flow_sd), "hift": len(hift_sd)})
    return tensors, config, summary


def convert_cosy2_decoder(decoder_dir, output_dir, config=None, flow_noise: str = "seed0", speaker_files=None,
                          campplus=None, prompt_wavs=None, overwrite: bool = False) -> dict:
    """prepare, then write OUT atomically (model.safetensors, config.json, remote code, README.md)."""
    from safetensors.torch import save_file

    tensors, config, summary = prepare(decoder_dir, config, flow_noise, speaker_files, campplus, prompt_wavs)
    summary["output_dir"] = str(Path(output_dir).absolute())
    with atomic_directory(Path(output_dir), overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(_ordinary_file_mode())  # safetensors creates it private (0600)
        summary["remote_code"] = write_repo_files(tmp, config, render_card(config, summary))
    summary["config"] = config
    return summary


def _ordinary_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# --------------------------------------------------------------------------- command line


def _named(values: list[str], option: str) -> dict[str, str]:
    named = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name.isidentifier() or not path:
            raise ConversionError(f"{option} {value!r}: expected NAME=FILE with NAME like en or zh")
        if name in named:
            raise ConversionError(f"{option}: speaker {name!r} given twice")
        named[name] = path
    return named


def read_config(path) -> object:
    from llama_omni_hf.configuration_llama_omni2 import LlamaOmni2Token2WavConfig

    data = read_json(Path(path), "--config")
    data = {k: v for k, v in data.items() if k not in ("auto_map", "architectures")}
    try:
        return LlamaOmni2Token2WavConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise ConversionError(f"--config {path}: {err}") from None


def print_summary(s: dict):
    print(f"wrote {s['output_dir']}: {s['tensors']} tensors (from {s['source_tensors']['flow']} flow.pt and "
          f"{s['source_tensors']['hift']} hift.pt tensors); flow {s['flow_parameters'] / 1e6:.2f} M, HiFT "
          f"{s['hift_parameters'] / 1e6:.2f} M parameters (weight norm folded), float32")
    print(f"flow noise: {s['noise']}")
    for name, how in s["speakers"].items():
        print(f"speaker {name}: {how}")
    for line in s["yaml"]:
        print(("WARNING: " if line.startswith("!!!") else "yaml: ") + line)


def run_verify(output_dir: Path, units: int) -> int:
    """Load OUT with AutoModel in a fresh interpreter (llama_omni_hf blocked) and decode a few tokens."""
    script = Path(__file__).resolve().parent / "verify_token2wav.py"
    command = [sys.executable, "-I", str(script), str(output_dir), "--units", str(units)]
    print(f"verifying in a clean subprocess: {' '.join(command)}", flush=True)
    return subprocess.run(command, cwd=str(Path(output_dir).parent)).returncode


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder-dir", required=True, help="ICTNLP/cosy2_decoder download (flow.pt, hift.pt, "
                   "optional cosyvoice.yaml and campplus.onnx)")
    p.add_argument("--output", required=True, help="the repo directory to write (must not exist, see --overwrite)")
    p.add_argument("--flow-noise", default="seed0", help="seed0 (default) or a .pt/.npy tensor [1, 80, F>=15000]")
    p.add_argument("--speaker", action="append", metavar="NAME=FILE", help="a precomputed x-vector (.npy/.pt/"
                   ".safetensors, [192] or [1, 192]); repeatable")
    p.add_argument("--campplus", help="CAM++ onnx model (default: campplus.onnx in --decoder-dir)")
    p.add_argument("--prompt-wav", action="append", metavar="NAME=WAV", help="a prompt wav whose CAM++ x-vector "
                   "becomes voice NAME (en: prompt_en.wav, zh: prompt_zh.wav); repeatable")
    p.add_argument("--config", help="JSON of LlamaOmni2Token2WavConfig fields (default: the released sizes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (atomically)")
    p.add_argument("--verify", action="store_true", help="then load OUT in a clean subprocess and decode once")
    p.add_argument("--verify-units", type=int, default=12, help="speech tokens decoded by --verify")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = convert_cosy2_decoder(
            args.decoder_dir, args.output, read_config(args.config) if args.config else None, args.flow_noise,
            _named(args.speaker, "--speaker"), args.campplus, _named(args.prompt_wav, "--prompt-wav"), args.overwrite)
    except ConversionError as err:
        print(f"error: {err}\n{args.output} was not written.", file=sys.stderr)
        return 2
    print_summary(summary)
    if args.verify:
        return run_verify(Path(args.output), args.verify_units)
    return 0


if __name__ == "__main__":
    sys.exit(main())
