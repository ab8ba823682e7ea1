"""`llama-omni` command line: answer spoken questions, write tiny checkpoints (LLaMA-Omni or LLaMA-Omni2).

    llama-omni answer question.wav [--model DIR_OR_HUB_ID] [--output-wav answer.wav] [--stream] [--speaker en]
    llama-omni tiny OUT_DIR [--omni2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _dtype(name):
    import torch

    return {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"unknown device {device!r} (use cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch has no usable CUDA GPU; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but it is not available here; use --device cpu")


def load_model(model_id: str | None, device: str = "cpu", dtype: str = "auto"):
    """AutoModel + AutoProcessor with remote code; None = the embedded tiny random-weight checkpoint."""
    from transformers import AutoModel, AutoProcessor

    if model_id is None:
        from .tiny import default_tiny_checkpoint

        model_id = str(default_tiny_checkpoint())
        print(f"[llama-omni] using the embedded TINY RANDOM-WEIGHT checkpoint at {model_id}: it demonstrates the "
              "pipeline only, its answers are noise. Pass --model for a real model.", file=sys.stderr)
    elif (model_id.startswith((".", "/", "~")) or model_id.count("/") > 1) and not Path(model_id).expanduser().is_dir():
        raise ValueError(f"model directory not found: {model_id}")
    _check_device(device)
    model = AutoModel.from_pretrained(model_id, trust_remote_code=True, dtype=_dtype(dtype)).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
    return model, processor


def _answer(args) -> int:
    import numpy as np
    import soundfile

    from .audio_io import load_audio

    # fail on a bad file or option before loading the model and generating
    recordings = [load_audio(path) for path in args.audio]
    if args.output_wav and not Path(args.output_wav).resolve().parent.is_dir():
        raise ValueError(f"cannot write {args.output_wav}: its directory does not exist")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1 or args.chunk_size < 1:
        raise ValueError("need --temperature >= 0, 0 < --top-p <= 1, --max-new-tokens >= 1 and --chunk-size >= 1")
    model, processor = load_model(args.model, args.device, args.dtype)
    omni2 = model.config.model_type == "llama_omni2"
    speech_decoder = getattr(model, "token2wav" if omni2 else "vocoder", None)
    if args.speaker is not None and not omni2:
        raise ValueError("--speaker chooses a LLaMA-Omni2 voice; this is a LLaMA-Omni checkpoint (one voice)")
    if args.speaker is not None and speech_decoder is not None:
        speech_decoder.speaker_embedding(args.speaker)  # an unknown voice fails before generating
    stream_options = dict(speaker=args.speaker) if omni2 else dict(chunk_size=args.chunk_size)
    options = dict(max_new_tokens=args.max_new_tokens)
    if args.temperature > 0:
        options.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        options.update(do_sample=False)
    for index, (samples, rate) in enumerate(recordings):
        inputs = processor(audio=samples, sampling_rate=rate, return_tensors="pt").to(model.device)
        if args.stream:
            audio, units, rate = [], None, None
            for chunk in model.generate_stream(**inputs, tokenizer=processor.tokenizer, **stream_options, **options):
                print(chunk.text, end="", flush=True)
                audio.append(chunk.audio.numpy())
                units = chunk.all_units if chunk.is_final else units
                rate = chunk.sampling_rate
            print()
            waveform = np.concatenate(audio) if speech_decoder is not None else None
        else:
            if omni2:
                options["speaker"] = args.speaker
            output = model.generate(**inputs, return_dict_in_generate=True,
                                    return_audio=bool(args.output_wav) and speech_decoder is not None, **options)
            answer = output.sequences[0, inputs["input_ids"].shape[1]:]
            print(processor.decode(answer, skip_special_tokens=True).strip())
            units = output.units[0]
            waveform = output.audio[0].cpu().numpy() if output.audio is not None else None
            rate = output.sampling_rate
        if args.units:
            print("units:", " ".join(map(str, units.tolist())))
        if args.output_wav:
            if waveform is None:
                print("[llama-omni] this checkpoint has no vocoder / token-to-wave decoder: no speech written",
                      file=sys.stderr)
                continue
            target = Path(args.output_wav)
            if len(args.audio) > 1:
                target = target.with_name(f"{target.stem}_{index}{target.suffix}")
            soundfile.write(target, waveform, rate)
            print(f"[llama-omni] speech answer written to {target} ({len(waveform) / rate:.2f} s at {rate} Hz)",
                  file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llama-omni", description="LLaMA-Omni: spoken question -> text and speech")
    commands = parser.add_subparsers(dest="command", required=True)
    answer = commands.add_parser("answer", help="answer spoken questions (like the original's infer.py)")
    answer.add_argument("audio", nargs="+", help="audio files (wav/flac/ogg; mp3 etc. with ffmpeg)")
    answer.add_argument("--model", default=None, help="local directory or hub id (default: embedded tiny checkpoint)")
    answer.add_argument("--device", default="cpu")
    answer.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    answer.add_argument("--max-new-tokens", type=int, default=256)
    answer.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the original's default)")
    answer.add_argument("--top-p", type=float, default=1.0)
    answer.add_argument("--stream", action="store_true", help="print the text as it is generated")
    answer.add_argument("--chunk-size", type=int, default=10, help="Omega: units per vocoded chunk when streaming")
    answer.add_argument("--speaker", default=None,
                        help="LLaMA-Omni2 only: the voice (e.g. en, zh; default: the checkpoint's default voice)")
    answer.add_argument("--units", action="store_true", help="also print the speech units")
    answer.add_argument("--output-wav", default=None, help="write the spoken answer here (needs a vocoder)")
    tiny = commands.add_parser("tiny", help="write a tiny random-weight checkpoint repo")
    tiny.add_argument("output_dir")
    tiny.add_argument("--omni2", action="store_true", help="a LLaMA-Omni2 checkpoint (default: LLaMA-Omni)")
    tiny.add_argument("--no-vocoder", action="store_true", help="text + units only")
    args = parser.parse_args(argv)
    try:
        if args.command == "answer":
            return _answer(args)
        from .tiny import build_tiny_checkpoint, build_tiny_omni2_checkpoint

        if args.omni2:
            path = build_tiny_omni2_checkpoint(args.output_dir, token2wav=not args.no_vocoder)
        else:
            path = build_tiny_checkpoint(args.output_dir, vocoder=not args.no_vocoder)
        print(f"tiny checkpoint written to {path}")
        return 0
    except (ValueError, OSError) as error:  # bad audio, bad model path: one readable line, no traceback
        print(f"llama-omni: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
