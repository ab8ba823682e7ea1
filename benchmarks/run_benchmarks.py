#!/usr/bin/env python
"""CPU latency and throughput benchmarks of LLaMA-Omni (issue 3, item 6).

    .venv/bin/python benchmarks/run_benchmarks.py            # ~5 min on 2 cores
    .venv/bin/python benchmarks/run_benchmarks.py --quick    # ~1 min, fewer repeats, shorter answer

Prints a table and writes `benchmarks/results.json` (every sample, medians, machine, load average) and,
with `--markdown docs/benchmarks.md`, the same table as Markdown.

The model is a random-weight, mid-sized LLaMA-Omni built in memory (nothing is downloaded): an LLM of
~157M parameters (hidden 1024, 8 layers, GQA 16/4 heads, 32000-token vocabulary; ~630 MB in fp32), a
Whisper encoder with the release's input shape (128 mels, 1500 positions) but 4 layers of width 384, a unit
decoder of 2 Llama layers of width 512, and the vocoder at the RELEASED size (LlamaOmniVocoderConfig
defaults: 512 initial channels, ~13.5M parameters). The unit decoder is sized so that one of its steps (25
upsampled positions) costs about as many multiply-adds, relative to one LLM token, as in the release
(printed as `unit_decoder_step_macs / llm_token_macs`).

Random weights answer noise, which is fine for timing with two adjustments:
- The answer length is fixed (`min_new_tokens = max_new_tokens`), so EOS never ends a run early.
- A random unit decoder emits almost no units (~0.1 per text token: its 25 copies of a state are nearly
  identical). A forward hook on `unit_decoder.output_proj` adds a fixed per-position pattern to the CTC
  logits so that exactly `--units-per-token` units (default 8: roughly what the paper's first-audio latencies at
  Omega=10 and 100, 236 and 563 ms, imply) come out of every text token, offline and streamed alike. The hook costs one addition
  of a [25, 1001] tensor per step; everything else runs the library's code unchanged.

The full recompute at N=1024 takes minutes and ~8 GB, so by default it is extrapolated from N=64..256 with
cost = a N + b N^2 (projections + attention); `--full-recompute-1024` measures it instead. Checked once on the
2-core machine under load: 112 s measured, 126 s extrapolated.

Nothing here asserts on timings; the tests never run this script.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# OpenMP workers that spin while waiting starve each other when other jobs share the cores (2 torch threads on a
# busy 2-core machine ran the unit decoder 20-40x slower); sleeping waits keep the figures usable. Export
# OMP_WAIT_POLICY=ACTIVE to measure with spinning workers on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a plain checkout too

from transformers import GenerationConfig, LlamaForCausalLM, WhisperFeatureExtractor  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from llama_omni_hf.vocoder_llama_omni import DEFAULT_LEFT_CONTEXT, DEFAULT_LOOKAHEAD  # noqa: E402
from llama_omni_hf.configuration_llama_omni import LlamaOmniConfig  # noqa: E402
from llama_omni_hf.modeling_llama_omni import LlamaOmniForConditionalGeneration  # noqa: E402
from llama_omni_hf.processing_llama_omni import LlamaOmniProcessor  # noqa: E402
from llama_omni_hf.tiny import tiny_config_dict  # noqa: E402
from llama_omni_hf.tiny_tokenizer import build_tiny_llama3_tokenizer  # noqa: E402

QUESTION = "What is the capital of France?"
PAPER = {
    "first_audio_ms_omega10_L40": 226,
    "speech_over_text_time": 1.28,
}
# The released sizes (spec sections 1, 3, 5), for the multiply-add proportion printed next to ours.
RELEASE_SIZES = dict(
    llm=dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    unit_decoder=dict(llm_hidden=4096, hidden=4096, layers=2, heads=32, kv_heads=32, intermediate=11008,
                      classes=1001, upsample=25),
)


# ----------------------------------------------------------------------------------------------- model


def mid_config(tokenizer) -> LlamaOmniConfig:
    """The tiny test layout (every structural feature of the release) scaled up to mid size."""
    config = tiny_config_dict(tokenizer, vocoder=True)
    config["text_config"].update(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=4,
    )
    config["speech_encoder_config"].update(
        d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
    )
    config.update(
        speech_adaptor_hidden_size=1024,
        unit_decoder_num_layers=2, unit_decoder_hidden_size=512, unit_decoder_num_attention_heads=8,
        unit_decoder_num_key_value_heads=8, unit_decoder_intermediate_size=1280,
        unit_decoder_upsample_factor=25, unit_vocab_size=1000,
        vocoder_config={},  # LlamaOmniVocoderConfig defaults = the released vocoder's size
    )
    # The tiny tokenizer's ids (< 1025) are all valid in the 32000-token vocabulary; the <speech>
    # placeholder gets the id after the vocabulary, as in the release (the inputs are remapped below).
    return LlamaOmniConfig(**config)


def llm_token_macs(hidden, layers, heads, kv_heads, intermediate, vocab) -> int:
    """Multiply-adds of one decoded LLM token in the weight matrices (attention over the cache excluded)."""
    head_dim = hidden // heads
    attention = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    return layers * (attention + 3 * hidden * intermediate) + hidden * vocab


def unit_step_macs(llm_hidden, hidden, layers, heads, kv_heads, intermediate, classes, upsample) -> int:
    """Multiply-adds of one incremental unit-decoder step (one text token = `upsample` positions)."""
    head_dim = hidden // heads
    attention = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    per_position = llm_hidden * hidden + layers * (attention + 3 * hidden * intermediate) + hidden * classes
    return upsample * per_position


def vocoder_second_macs(vocoder_config) -> int:
    """Multiply-adds of the HiFi-GAN generator per second of audio (the duration predictor, per unit, is
    negligible): conv_pre, then per stage the up-convolution and the resblocks at the new rate, conv_post."""
    channels = vocoder_config.upsample_initial_channel
    frame = vocoder_config.embedding_dim * channels * 7  # conv_pre, one position per frame
    positions = 1
    for i, (rate, kernel) in enumerate(zip(vocoder_config.upsample_rates, vocoder_config.upsample_kernel_sizes)):
        c_in, c_out = channels // 2**i, channels // 2 ** (i + 1)
        frame += positions * c_in * c_out * kernel
        positions *= rate
        for k, dilations in zip(vocoder_config.resblock_kernel_sizes, vocoder_config.resblock_dilation_sizes):
            frame += positions * 2 * len(dilations) * k * c_out * c_out
    frame += positions * (channels // 2 ** len(vocoder_config.upsample_rates)) * 7  # conv_post
    return frame * vocoder_config.sampling_rate // vocoder_config.code_hop_size


def mac_proportions(config: LlamaOmniConfig) -> dict:
    text = config.text_config
    ours_llm = llm_token_macs(text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
                              text.num_key_value_heads, text.intermediate_size, text.vocab_size)
    ours_unit = unit_step_macs(text.hidden_size, config.unit_decoder_hidden_size, config.unit_decoder_num_layers,
                               config.unit_decoder_num_attention_heads, config.unit_decoder_num_key_value_heads,
                               config.unit_decoder_intermediate_size, config.unit_vocab_size + 1,
                               config.unit_decoder_upsample_factor)
    release_llm = llm_token_macs(**RELEASE_SIZES["llm"])
    release_unit = unit_step_macs(**RELEASE_SIZES["unit_decoder"])
    vocoder = vocoder_second_macs(config.vocoder_config)  # the benchmark's vocoder has the released size
    return {
        "llm_token_macs": ours_llm,
        "unit_decoder_step_macs": ours_unit,
        "unit_step_over_llm_token": ours_unit / ours_llm,
        "release_unit_step_over_llm_token": release_unit / release_llm,
        "vocoder_audio_second_macs": vocoder,
        "vocoder_second_over_llm_token": vocoder / ours_llm,
        "release_vocoder_second_over_llm_token": vocoder / release_llm,
    }


class UnitRateHook:
    """Forward hook on `unit_decoder.output_proj`: adds `margin` to one class per upsampled position, by
    position within each state's `upsample` copies, so every text token yields exactly `units_per_token`
    collapsed units (blank elsewhere). Frames of a state are contiguous and start at a multiple of
    `upsample` both in the full recompute ([1, 25 N, C]) and in incremental steps ([B, 25, C])."""

    def __init__(self, upsample: int, units_per_token: int, num_units: int, seed: int = 0, margin: float = 100.0):
        if not 0 < units_per_token <= upsample:
            raise ValueError(f"--units-per-token must be in 1..{upsample}, got {units_per_token}")
        generator = torch.Generator().manual_seed(seed)
        blank = num_units
        classes = [blank] * upsample
        for k in range(units_per_token):
            position = k * upsample // units_per_token
            while True:  # differ from both neighbours (incl. the wrap to the next token) so nothing merges
                unit = int(torch.randint(num_units, (1,), generator=generator))
                if unit not in (classes[position - 1], classes[(position + 1) % upsample]):
                    break
            classes[position] = unit
        self.classes = classes
        self.upsample = upsample
        self.bias = torch.zeros(upsample, num_units + 1)
        self.bias[torch.arange(upsample), torch.tensor(classes)] = margin

    def __call__(self, module, inputs, output):
        positions = torch.arange(output.shape[-2], device=output.device) % self.upsample
        return output + self.bias.to(output.device, output.dtype)[positions]


def build(seed: int, units_per_token: int):
    tokenizer = build_tiny_llama3_tokenizer()
    config = mid_config(tokenizer)
    processor = LlamaOmniProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer,
        speech_tokens_per_audio=config.speech_tokens_per_audio,
    )
    torch.manual_seed(seed)
    model = LlamaOmniForConditionalGeneration(config).eval()
    text = config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
        do_sample=False,
    )
    hook = None
    if units_per_token:
        hook = UnitRateHook(config.unit_decoder_upsample_factor, units_per_token, config.unit_vocab_size, seed)
        model.unit_decoder.output_proj.register_forward_hook(hook)
    return model, processor, hook


def text_only_lm(model: LlamaOmniForConditionalGeneration) -> LlamaForCausalLM:
    """transformers' own LlamaForCausalLM sharing the LLM's modules (no copy): the text-only baseline."""
    with torch.device("meta"):
        lm = LlamaForCausalLM(model.config.text_config)
    lm.model, lm.lm_head = model.model, model.lm_head
    lm.generation_config = copy.deepcopy(model.generation_config)
    return lm.eval()


def prompt_embeddings(model, input_ids, input_features):
    """Speech encoder + adaptor spliced over the <speech> placeholders (what LlamaOmni's forward does)."""
    is_speech = input_ids == model.config.speech_token_id
    embeds = model.get_input_embeddings()(input_ids.masked_fill(is_speech, 0))
    features = model.get_speech_features(input_features)
    return embeds.masked_scatter(is_speech[..., None], features.reshape(-1, features.shape[-1]).to(embeds.dtype))


def spoken_question():
    try:
        from llama_omni_hf.espeak import synthesize

        return synthesize(QUESTION), f"espeak-ng: {QUESTION!r}"
    except Exception as error:  # no espeak-ng: use the committed example
        import soundfile as sf

        path = REPO / "examples" / "capital_of_france.wav"
        audio, rate = sf.read(str(path), dtype="float32")
        if rate != 16000:
            raise RuntimeError(f"{path} is not 16 kHz") from error
        return audio, str(path.relative_to(REPO))


def model_inputs(model, processor, audio):
    inputs = processor(audio=audio, sampling_rate=16000, return_tensors="pt")
    ids = inputs["input_ids"]
    inputs["input_ids"] = ids.masked_fill(ids == processor.speech_token_id, model.config.speech_token_id)
    return inputs


# ------------------------------------------------------------------------------------------ measuring


class TimingStreamer(BaseStreamer):
    """Records when generate hands over the prompt (first `put`) and each new token."""

    def __init__(self, start: float):
        self.start, self.times = start, []

    def put(self, value):
        self.times.append(time.perf_counter() - self.start)

    def end(self):
        pass

    @property
    def first_token(self) -> float:
        return self.times[1]

    @property
    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.times[1:], self.times[2:])]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def repeat(fn, repeats: int, warmup: int = 1, label: str = ""):
    for _ in range(warmup):
        fn()
    samples = []
    for i in range(repeats):
        samples.append(fn())
        if label:
            print(f"  {label} {i + 1}/{repeats}: {_brief(samples[-1])}", flush=True)
    return samples


def _brief(sample):
    if isinstance(sample, dict):
        return ", ".join(f"{k}={v:.3f}" for k, v in sample.items() if isinstance(v, float))
    return f"{sample:.4f}"


def summarize(samples: list[dict]) -> dict:
    keys = dict.fromkeys(k for s in samples for k, v in s.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool))
    return {k: median([s.get(k) for s in samples]) for k in keys}


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------- the benchmarks


@torch.no_grad()
def bench_encoder(model, inputs, repeats):
    def once():
        start = time.perf_counter()
        prompt_embeddings(model, inputs["input_ids"], inputs["input_features"])
        return time.perf_counter() - start

    return repeat(once, repeats, label="speech encoder + adaptor")


def bench_answers(model, processor, inputs, n_tokens, omegas, repeats):
    """Whole answers, five ways, interleaved round by round so that load changes hit every way alike:
    text-only (transformers' LlamaForCausalLM), generate without and with audio, generate_stream per Omega.
    Ratios to text-only are taken within each round, then the median over rounds."""
    lm = text_only_lm(model)
    gen = dict(do_sample=False, max_new_tokens=n_tokens, min_new_tokens=n_tokens)
    prompt_length = inputs["input_ids"].shape[1]
    sampling_rate = model.config.vocoder_config.sampling_rate
    answers = {}

    @torch.no_grad()
    def text_only():
        cpu, start = time.process_time(), time.perf_counter()
        streamer = TimingStreamer(start)
        embeds = prompt_embeddings(model, inputs["input_ids"], inputs["input_features"])
        out = lm.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], streamer=streamer, **gen)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
        answers["text_only"] = out[0, -n_tokens:].tolist()
        return {"total_s": total, "cpu_s": cpu, "first_token_s": streamer.first_token,
                "step_ms": 1000 * median(streamer.step_times)}

    def with_speech(return_audio):
        @torch.no_grad()
        def once():
            cpu, start = time.process_time(), time.perf_counter()
            streamer = TimingStreamer(start)
            out = model.generate(**inputs, return_audio=return_audio, return_dict_in_generate=True,
                                 streamer=streamer, **gen)
            total, cpu = time.perf_counter() - start, time.process_time() - cpu
            answers["speech"] = out.sequences[0, prompt_length:].tolist()
            result = {"total_s": total, "cpu_s": cpu, "first_token_s": streamer.first_token,
                      "step_ms": 1000 * median(streamer.step_times), "units": len(out.units[0])}
            if return_audio:
                result["vocoder_s"] = total - streamer.times[-1]  # the offline vocoding after the last token
                result["audio_s"] = len(out.audio[0]) / sampling_rate
            return result
        return once

    def streamed(omega):
        def once():
            cpu, start = time.process_time(), time.perf_counter()
            first_token = first_audio = None
            tokens = units = samples = 0
            tokens_at_audio = units_at_audio = None
            stream = model.generate_stream(**inputs, tokenizer=processor.tokenizer, chunk_size=omega, **gen)
            try:
                for chunk in stream:
                    now = time.perf_counter() - start
                    tokens += len(chunk.token_ids)
                    units += len(chunk.units)
                    if first_token is None and len(chunk.token_ids):
                        first_token = now
                    if first_audio is None and len(chunk.audio):
                        first_audio, tokens_at_audio, units_at_audio = now, tokens, units
                    samples += len(chunk.audio)
            finally:
                stream.close()
            return {"first_token_s": first_token, "first_audio_s": first_audio,
                    "total_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
                    "tokens_at_first_audio": tokens_at_audio,
                    "units_at_first_audio": units_at_audio, "units": units, "audio_s": samples / sampling_rate}
        return once

    ways = {
        "text_only": text_only,
        "text_units": with_speech(False),
        "text_units_audio": with_speech(True),
        **{f"stream_omega_{omega}": streamed(omega) for omega in omegas},
    }
    # one warm-up of each code path: plain Llama, generate with units + vocoder, the streaming thread
    for name in ("text_only", "text_units_audio", f"stream_omega_{omegas[0]}"):
        ways[name]()
    samples = {name: [] for name in ways}
    print(f"answers of {n_tokens} tokens, {repeats} rounds", flush=True)
    for round_ in range(repeats):
        for name, fn in ways.items():
            samples[name].append(fn())
            print(f"  round {round_ + 1}/{repeats} {name}: {_brief(samples[name][-1])}", flush=True)
    ratios = {name: [s["total_s"] / t["total_s"] for s, t in zip(runs, samples["text_only"])]
              for name, runs in samples.items() if name != "text_only"}
    cpu_ratios = {name: [s["cpu_s"] / t["cpu_s"] for s, t in zip(runs, samples["text_only"])]
                  for name, runs in samples.items() if name != "text_only"}
    return {
        "samples": samples,
        "median": {name: summarize(runs) for name, runs in samples.items()},
        "ratio_to_text_only": {name: median(r) for name, r in ratios.items()},
        "cpu_ratio_to_text_only": {name: median(r) for name, r in cpu_ratios.items()},
        "ratio_samples": ratios,
        "cpu_ratio_samples": cpu_ratios,
        "same_answer": answers["text_only"] == answers["speech"],
    }


@torch.no_grad()
def bench_unit_decoder(model, lengths, repeats, full_lengths, seed):
    """Cost of the unit decoding done when text token N is produced: the incremental step (KV cache
    holding the (N-1) * 25 earlier positions) vs the original's recompute over all N states."""
    decoder = model.unit_decoder
    cfg = decoder.config
    hidden = model.config.text_config.hidden_size
    upsample = decoder.upsample_factor
    generator = torch.Generator().manual_seed(seed)
    eos = model.generation_config.eos_token_id
    results = {"incremental_ms": {}, "full_ms": {}}
    print("unit decoder, cost of the step that handles text token N", flush=True)
    for n in lengths:
        past = (n - 1) * upsample
        shape = (1, cfg.num_key_value_heads, past, cfg.head_dim)
        # The values in the cache do not change the cost of a step, only its length does: fill it directly
        # instead of decoding N-1 steps first.
        kv = [(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
              for _ in range(cfg.num_hidden_layers)]
        state_in = torch.randn(1, 1, hidden, generator=generator)

        def step():
            state = model.init_unit_stream(1, eos)
            for layer, (k, v) in enumerate(kv):
                state.cache.update(k, v, layer)
            state.step = n - 1
            state.num_states += n - 1
            start = time.perf_counter()
            model._unit_stream_step(state, None, state_in)
            return 1000 * (time.perf_counter() - start)

        samples = repeat(step, max(repeats, 5), warmup=1)
        results["incremental_ms"][n] = samples
        print(f"  N={n}: incremental {median(samples):.1f} ms", flush=True)
    for n in full_lengths:
        states = torch.randn(n, hidden, generator=generator)

        def full():
            start = time.perf_counter()
            decoder.predict(states)
            return 1000 * (time.perf_counter() - start)

        big = n * upsample > 4000
        samples = repeat(full, 1 if big else repeats, warmup=0 if big else 1)
        results["full_ms"][n] = samples
        print(f"  N={n}: full recompute {median(samples):.0f} ms", flush=True)
    return results


def fit_full_recompute(full_ms: dict) -> tuple[float, float]:
    """Least-squares cost(N) = a N + b N^2 (projections/MLP + attention) through the measured medians."""
    ns = np.array(sorted(full_ms), dtype=float)
    ys = np.array([median(full_ms[int(n)]) for n in ns])
    design = np.stack([ns, ns**2], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, ys, rcond=None)
    return max(a, 0.0), max(b, 0.0)


@torch.no_grad()
def bench_vocoder(model, n_units, units_per_token, omegas, repeats, seed):
    vocoder = model.vocoder
    sampling_rate = vocoder.config.sampling_rate
    generator = torch.Generator().manual_seed(seed)
    units = torch.randint(vocoder.config.num_embeddings, (n_units,), generator=generator)

    def offline():
        cpu, start = time.process_time(), time.perf_counter()
        wave, lengths = vocoder(units[None])
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        return {"compute_s": elapsed, "cpu_s": cpu, "audio_s": int(lengths[0]) / sampling_rate}

    def streamed(omega, independent):
        def once():
            state = vocoder.init_stream(chunk_size=omega, independent=independent)
            compute, first_chunk, samples, calls = 0.0, None, 0, 0
            cpu = time.process_time()
            pieces = [units[i : i + units_per_token].tolist() for i in range(0, n_units, units_per_token)]
            for i, piece in enumerate(pieces):  # units arrive text token by text token, as in generation
                start = time.perf_counter()
                wave = vocoder.stream(state, piece, final=i == len(pieces) - 1)
                elapsed = time.perf_counter() - start
                compute += elapsed
                if len(wave):
                    calls += 1
                    if first_chunk is None:
                        first_chunk = elapsed
                samples += len(wave)
            return {"compute_s": compute, "cpu_s": time.process_time() - cpu, "audio_s": samples / sampling_rate,
                    "first_chunk_s": first_chunk, "calls": calls}
        return once

    print(f"vocoder, {n_units} units", flush=True)
    results = {"offline": repeat(offline, repeats, label="offline")}
    for omega in omegas:
        results[f"stream_omega_{omega}"] = repeat(streamed(omega, False), repeats, label=f"stream Omega={omega}")
        results[f"independent_omega_{omega}"] = repeat(streamed(omega, True), repeats,
                                                       label=f"independent chunks Omega={omega}")
    return results


# ------------------------------------------------------------------------------------------- reporting


def rtf(summary):
    return summary["compute_s"] / summary["audio_s"] if summary.get("audio_s") else None


def table_rows(report) -> list[tuple[str, str, str]]:
    settings = report["settings"]
    omegas = settings["omegas"]
    answers = report["answers"]["median"]
    ratio = report["answers"]["ratio_to_text_only"]
    first = answers[f"stream_omega_{omegas[0]}"]
    rows = [
        ("processor (log-mel of 30 s + prompt)", f"{1000 * report['processor_s']:.0f} ms", "before every figure below"),
        ("speech encoder + adaptor", f"{1000 * report['speech_encoder_s']['median']:.0f} ms",
         "part of the first-token time"),
        ("time to first text token", f"{1000 * first['first_token_s']:.0f} ms",
         f"generate_stream; text-only Llama {1000 * answers['text_only']['first_token_s']:.0f} ms; "
         f"mostly the {settings['prompt_tokens']}-position prefill"),
    ]
    for omega in omegas:
        s = answers[f"stream_omega_{omega}"]
        if s.get("first_audio_s") is None:
            rows.append((f"time to first audio, Omega={omega}", "none", f"only {s['units']:.0f} units in the answer"))
            continue
        rows.append((f"time to first audio, Omega={omega}", f"{1000 * s['first_audio_s']:.0f} ms",
                     f"{s['units_at_first_audio']:.0f} units, {_count(s['tokens_at_first_audio'], 'text token')} out"
                     + ("; paper 226 ms (L40 GPU, 8B)" if omega == 10 else "")))
    text_only = answers["text_only"]
    rows.append((f"text-only answer, {settings['answer_tokens']} tokens", f"{text_only['total_s']:.2f} s",
                 f"LlamaForCausalLM, same weights; {text_only['step_ms']:.0f} ms per token after the first"))
    cpu_ratio = report["answers"]["cpu_ratio_to_text_only"]

    def both(name):
        return f"{ratio[name]:.2f}x wall, {cpu_ratio[name]:.2f}x CPU"

    rows.append(("text+units / text-only (generate, no audio)", both("text_units"),
                 f"{answers['text_units']['step_ms']:.0f} ms per token after the first"))
    audio = answers["text_units_audio"]
    rows.append(("text+speech / text-only (generate, return_audio)", both("text_units_audio"),
                 f"incl. {audio['vocoder_s']:.2f} s vocoding {audio['audio_s']:.1f} s of audio at the end; paper 1.28x"))
    for omega in omegas:
        rows.append((f"text+speech / text-only (generate_stream, Omega={omega})", both(f"stream_omega_{omega}"),
                     "vocoding overlaps generation"))
    unit = report["unit_decoder"]["median_ms"]
    for n in settings["unit_lengths"]:
        inc = unit["incremental"][str(n)]
        full = unit["full"].get(str(n))
        note = "full measured"
        if full is None:
            full, note = unit["full_estimated"][str(n)], "full extrapolated from a N + b N^2 fit"
        rows.append((f"unit decoder step at N={n}: incremental vs full", f"{inc:.1f} vs {full:.0f} ms",
                     f"incremental {full / inc:.0f}x faster; {note}"))
    vocoder = report["vocoder"]
    rtf_ = vocoder["rtf"]
    rows.append(("vocoder real-time factor, offline", f"{rtf_['offline']:.2f}",
                 f"compute s per s of audio; {settings['vocoder_units']} units"))
    for omega in omegas:
        first_chunk = vocoder["median"][f"stream_omega_{omega}"]["first_chunk_s"]
        rows.append((f"vocoder real-time factor, streamed Omega={omega}", f"{rtf_[f'stream_omega_{omega}']:.2f}",
                     f"original's independent chunks {rtf_[f'independent_omega_{omega}']:.2f}; "
                     f"first chunk {1000 * first_chunk:.0f} ms"))
    return rows


def _count(n, noun):
    n = int(round(n))
    return f"{n} {noun}{'' if n == 1 else 's'}"


def print_table(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    line = "  ".join("-" * w for w in widths)
    print(line)
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print(line)


def markdown(report, rows) -> str:
    s = report["settings"]
    m = report["machine"]
    params = report["model"]["params_millions"]
    props = report["model"]["macs"]
    command = "benchmarks/run_benchmarks.py" + (" --quick" if s["quick"] else "")
    out = [
        "# Benchmarks",
        "",
        f"`.venv/bin/python {command}` on {report['date'][:10]}: {m['cpu']}, {m['logical_cpus']} logical CPUs, "
        f"`torch.set_num_threads({s['threads']})`, OMP_WAIT_POLICY={m['omp_wait_policy']}, torch {m['torch']}, "
        f"transformers {m['transformers']}. Load average {report['load_average']['start']} at the start and "
        f"{report['load_average']['end']} at the end: other jobs shared the cores, so absolute times are noisy "
        "(ratios are taken within a round and hold up better).",
        "",
        f"Model: random weights, mid size. LLM {params['llm']:.0f}M parameters (hidden 1024, 8 layers, GQA 16/4 heads, "
        f"32000-token vocabulary; {report['model']['llm_fp32_mb']:.0f} MB in fp32); Whisper-shaped encoder "
        f"{params['speech_encoder']:.1f}M (128 mels, 1500 positions, 4 layers of 384); unit decoder "
        f"{params['unit_decoder']:.1f}M (2 Llama layers of 512, x25 upsampling, 1000 units), sized so that one of its "
        f"steps costs {props['unit_step_over_llm_token']:.2f} LLM tokens of multiply-adds (release: "
        f"{props['release_unit_step_over_llm_token']:.2f}); vocoder at the released size, {params['vocoder']:.1f}M "
        f"(512 channels). Caveat: one second of vocoded audio costs {props['vocoder_second_over_llm_token']:.0f} "
        f"LLM tokens of multiply-adds here but {props['release_vocoder_second_over_llm_token']:.1f} with the "
        "released 8B LLM, so the vocoder's share of the text+speech ratios below is far larger than it would be "
        "for the release; the text+units ratio has the release's proportions. The answer is forced to "
        f"{s['answer_tokens']} tokens, and the unit decoder is steered to "
        f"{s['units_per_token']} units per text token (a random one emits almost none; see the script's docstring). "
        f"Prompt: a spoken question ({s['question']}), {s['prompt_tokens']} positions.",
        "",
        "| measure | value | notes |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        "How each figure is measured (medians; one warm-up of each code path first):",
        "",
        "- Every time starts once the processor's outputs exist (the question is already log-mel features).",
        f"- Whole answers, {s['repeats']} rounds; each round runs every variant once, in turn: text-only, "
        "`generate(return_audio=False)`, `generate(return_audio=True)`, `generate_stream` at each Omega. "
        "Ratios are total times over the text-only time of the same round: wall-clock, and CPU time of the "
        "process (all threads; less disturbed by other jobs taking the cores).",
        "- Text-only: transformers' own `LlamaForCausalLM` sharing the LLM's modules (no copy), fed the same prompt "
        "embeddings (speech encoder + adaptor, inside its time) as `inputs_embeds`. It produces the same answer "
        f"tokens as `generate` (checked: {report['answers']['same_answer']}).",
        "- First text token / first audio: from calling `generate_stream` to the first chunk carrying token ids / "
        "audio samples (vocoding the first chunk included).",
        "- Unit decoder: the work done when text token N arrives. Incremental = one `_unit_stream_step` (25 "
        "positions against a KV cache of (N-1) x 25 positions; the cache is filled with random keys and values, "
        "which cost the same as real ones), at least 5 runs; full = `unit_decoder.predict` over all N states, which "
        "the original does at every step; sequences over 4000 positions are timed once. The full recompute at "
        "N=1024 is extrapolated unless `--full-recompute-1024` is given (checked once under load: 112 s measured, "
        "126 s extrapolated).",
        f"- Vocoder: {s['vocoder_units']} random units. Real-time factor = compute seconds per second of audio (< 1 "
        "is faster than real time). Streamed = units fed text token by text token "
        f"({s['units_per_token']} per call) to `vocoder.stream` with its defaults ({DEFAULT_LEFT_CONTEXT} units of "
        f"left context, {DEFAULT_LOOKAHEAD} of look-ahead); independent chunks = the original's method (`independent=True`).",
        "",
    ]
    return "\n".join(out)


def machine_info(threads):
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "platform": platform.platform()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1 minute: shorter answer, fewer repeats")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, help="timed runs per measure (default 3, quick 1)")
    parser.add_argument("--answer-tokens", type=int, help="forced answer length (default 48, quick 16)")
    parser.add_argument("--units-per-token", type=int, default=8,
                        help="units the unit decoder is steered to emit per text token (0: leave the random model alone)")
    parser.add_argument("--full-recompute-1024", action="store_true",
                        help="measure the full recompute at N=1024 too (~2-4 min and ~8 GB on 2 cores) "
                             "instead of extrapolating it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results.json"))
    parser.add_argument("--markdown", help="also write the table as Markdown to this file (e.g. docs/benchmarks.md)")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: print the table of an existing --output JSON (and --markdown)")
    args = parser.parse_args(argv)
    if args.render_only:
        report = json.loads(Path(args.output).read_text())
        rows = table_rows(report)
        print_table(rows)
        if args.markdown:
            _write(args.markdown, markdown(report, rows))
        return

    repeats = args.repeats or (1 if args.quick else 3)
    n_tokens = args.answer_tokens or (16 if args.quick else 48)
    omegas = [10, 40]
    unit_lengths = [64, 256, 1024]
    full_lengths = [64, 256] if args.quick else [64, 128, 256]
    if args.full_recompute_1024:
        full_lengths.append(1024)
    vocoder_units = 100 if args.quick else 200

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    load_start = load_average()
    started = time.perf_counter()
    print(f"torch threads: {torch.get_num_threads()} (of {os.cpu_count()} logical CPUs), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; load average {load_start}")

    model, processor, hook = build(args.seed, args.units_per_token)
    params = {name: sum(p.numel() for p in getattr(model, name).parameters()) / 1e6
              for name in ("speech_encoder", "speech_adaptor", "unit_decoder", "vocoder")}
    params["llm"] = (sum(p.numel() for p in model.model.parameters()) + model.lm_head.weight.numel()) / 1e6
    macs = mac_proportions(model.config)
    print("parameters (M): " + ", ".join(f"{k} {v:.1f}" for k, v in params.items()), flush=True)
    print(f"multiply-adds relative to one LLM token: unit-decoder step {macs['unit_step_over_llm_token']:.2f} "
          f"(release {macs['release_unit_step_over_llm_token']:.2f}), one second of vocoded audio "
          f"{macs['vocoder_second_over_llm_token']:.0f} (release {macs['release_vocoder_second_over_llm_token']:.2f})",
          flush=True)

    audio, audio_source = spoken_question()
    processor_times = repeat(lambda: _timed(lambda: model_inputs(model, processor, audio)), repeats)
    inputs = model_inputs(model, processor, audio)

    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(torch.get_num_threads()),
        "settings": {"quick": args.quick, "threads": torch.get_num_threads(), "repeats": repeats,
                     "answer_tokens": n_tokens, "units_per_token": args.units_per_token, "omegas": omegas,
                     "unit_lengths": unit_lengths, "vocoder_units": vocoder_units, "seed": args.seed,
                     "question": audio_source, "prompt_tokens": int(inputs["input_ids"].shape[1])},
        "model": {"params_millions": params, "macs": macs,
                  "llm_fp32_mb": params["llm"] * 4, "unit_pattern": hook.classes if hook else None},
        "paper": PAPER,
        "load_average": {"start": load_start},
        "processor_s": median(processor_times),
    }

    encoder_samples = bench_encoder(model, inputs, repeats)
    report["speech_encoder_s"] = {"samples": encoder_samples, "median": median(encoder_samples)}
    report["answers"] = bench_answers(model, processor, inputs, n_tokens, omegas, repeats)
    same_answer = report["answers"]["same_answer"]
    report["load_average"]["after_answers"] = load_average()

    unit = bench_unit_decoder(model, unit_lengths, repeats, full_lengths, args.seed)
    a, b = fit_full_recompute(unit["full_ms"])
    report["unit_decoder"] = {
        "samples_ms": {kind: {str(k): v for k, v in d.items()} for kind, d in unit.items()},
        "median_ms": {
            "incremental": {str(k): median(v) for k, v in unit["incremental_ms"].items()},
            "full": {str(k): median(v) for k, v in unit["full_ms"].items()},
            "full_estimated": {str(n): a * n + b * n * n for n in unit_lengths if n not in unit["full_ms"]},
        },
        "full_fit_ms": {"a_per_token": a, "b_per_token_squared": b, "points": sorted(unit["full_ms"])},
    }
    report["load_average"]["after_unit_decoder"] = load_average()

    vocoder = bench_vocoder(model, vocoder_units, args.units_per_token or 8, omegas, repeats, args.seed)
    vocoder_median = {k: summarize(v) for k, v in vocoder.items()}
    report["vocoder"] = {"samples": vocoder, "median": vocoder_median,
                         "rtf": {k: rtf(v) for k, v in vocoder_median.items()}}
    report["load_average"]["end"] = load_average()
    report["wall_time_s"] = time.perf_counter() - started

    rows = table_rows(report)
    report["table"] = [list(r) for r in rows]
    print()
    print(f"LLaMA-Omni CPU benchmark: {torch.get_num_threads()} threads, {n_tokens}-token answers, medians of "
          f"{repeats}; load average {load_start} -> {report['load_average']['end']}; "
          f"wall time {report['wall_time_s']:.0f} s")
    print_table(rows)
    if not same_answer:
        print("WARNING: the text-only baseline produced a different answer than generate()")

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {output}")
    if args.markdown:
        _write(args.markdown, markdown(report, rows))


def _write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
