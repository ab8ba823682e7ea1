"""End-to-end check of the LLaMA-Omni pipeline on vLLM-Omni: a tiny serving checkpoint (serving/tiny_checkpoint.py)
served by `python -m serving.pipeline serve` on 127.0.0.1 (our deploy config), one spoken question streamed
with llama_omni_hf.omni_client, the server stopped by PID (its process group). Prints one JSON line: the streamed
text and the in-process greedy answer's text, the audio received (samples, rate, chunks) and its largest
difference from BatchedUnit2Wav run on the in-process final-norm rows (served_audio.npy / expected_audio.npy are
left in WORKDIR), timings. With --restart the server is then stopped (SIGTERM to its process group), started again
with the same command on the same port, and asked again: the answer must be the same, the first server must have
exited with status 0 leaving no process behind; /dev/shm entries that appeared and stayed are listed (vLLM 0.30's
CPU executor leaves some of its message-queue segments behind at each stop).

    .venv-serve/bin/python -m serving.e2e_check WORKDIR [--timeout 900] [--restart]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np

from serving.smoke import _free_port, _wait_ready, group_members, stop

MAX_TOKENS = 24


def question(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(16000 * 2) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def in_process_answer(checkpoint: Path, wav: np.ndarray) -> dict:
    import torch

    from llama_omni_hf.modeling_llama_omni import LlamaOmniForConditionalGeneration
    from llama_omni_hf.processing_llama_omni import LlamaOmniProcessor

    processor = LlamaOmniProcessor.from_pretrained(checkpoint)
    model = LlamaOmniForConditionalGeneration.from_pretrained(checkpoint).eval()
    inputs = processor(audio=wav, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, return_units=False)
    prompt_len = inputs["input_ids"].shape[1]
    ids = out[0, prompt_len:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    text_ids = [i for i in ids if i not in eos]
    # the audio the unit2wav stage should stream: BatchedUnit2Wav fed the in-process final-norm rows (the last
    # prompt row, then one per generated token but the last) in the increments the stage-0 producer sends them
    # (serving/llama_omni_unit2wav.py: one row per decode step, the newest held back, the last two together):
    # the streaming vocoder's windows follow the increments
    from llama_omni_hf.batched_unit2wav import BatchedUnit2Wav

    with torch.no_grad():
        embeds = model._embed_with_speech(out[:, :-1], inputs["input_features"])
        states = model.model(inputs_embeds=embeds).last_hidden_state[0]  # after the final norm
    rows = states[prompt_len - 1:]
    engine = BatchedUnit2Wav(model)
    engine.add_request("r")
    pieces, units = [], []
    for start in range(len(rows) - 2):
        new_units, piece = engine.step({"r": rows[start:start + 1]})["r"]
        units += new_units
        pieces.append(piece)
    new_units, piece = engine.step({"r": rows[max(0, len(rows) - 2):]}, finished={"r"})["r"]
    units += new_units
    audio = torch.cat([*pieces, piece])
    return {"ids": ids, "text": processor.tokenizer.decode(text_ids, skip_special_tokens=True),
            "units": len(units), "audio": audio.float().numpy()}


@contextmanager
def pipeline_server(checkpoint: Path, workdir: Path, timeout: float, result: dict, port: int | None = None,
                    log_name: str = "server.log"):
    """`python -m serving.pipeline serve CHECKPOINT` on 127.0.0.1 (`port`, or a free one; log in WORKDIR/log_name),
    ready within `timeout`; yields (base URL, process). Records `server_pid` and `startup_s` in `result` and, however
    the block ends, stops the server by its process group and records `server_exit` and `left_running`."""
    base = f"http://127.0.0.1:{port or _free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    command = [sys.executable, "-m", "serving.pipeline", "serve", str(checkpoint), "--host", "127.0.0.1",
               "--port", base.rsplit(":", 1)[1], "--served-model-name", "tiny-omni"]
    start = time.monotonic()
    with open(workdir / log_name, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        result["server_pid"] = server.pid
        try:
            _wait_ready(base, server, start + timeout)
            result["startup_s"] = round(time.monotonic() - start, 1)
            yield base, server
        finally:
            result["server_exit"] = stop(server)
            time.sleep(1)
            result["left_running"] = group_members(server.pid)


def ask(base: str, wav: np.ndarray) -> tuple[dict, np.ndarray]:
    """One greedy streamed question: what came back, and the concatenated audio."""
    from llama_omni_hf.omni_client import OmniClient

    client = OmniClient(base, model="tiny-omni")
    text, audio, rates, chunks, first_audio = [], [], set(), 0, None
    t0 = time.monotonic()
    with closing(client.stream([], wav, 16000, temperature=0.0, top_p=1.0, max_tokens=MAX_TOKENS)) as stream:
        for chunk in stream:
            if chunk.text:
                text.append(chunk.text)
            if chunk.audio is not None and len(chunk.audio):
                first_audio = first_audio if first_audio is not None else time.monotonic() - t0
                audio.append(np.asarray(chunk.audio))
                rates.add(chunk.sampling_rate)
                chunks += 1
    served_audio = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    return {"text": "".join(text), "audio_samples": int(served_audio.size), "audio_chunks": chunks,
            "rates": sorted(rates), "first_audio_s": first_audio, "total_s": round(time.monotonic() - t0, 3)}, \
        served_audio


def shared_memory_names() -> set[str]:
    """What /dev/shm holds now (the stages exchange rows through shared memory segments)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir()} if shm.is_dir() else set()


def run(workdir: Path, timeout: float, restart: bool = False) -> dict:
    from serving.tiny_checkpoint import build_tiny_serving_checkpoint

    checkpoint = build_tiny_serving_checkpoint(workdir / "ckpt")
    wav = question()
    expected = in_process_answer(checkpoint, wav)
    expected_audio = expected.pop("audio")
    expected["audio_samples"] = int(expected_audio.size)
    result: dict = {"ok": False, "expected": expected}
    log_path = workdir / "server.log"
    shm_before = shared_memory_names()
    try:
        with pipeline_server(checkpoint, workdir, timeout, result) as (base, _):
            result["served"], served_audio = ask(base, wav)
            if served_audio.size == expected_audio.size:
                result["audio_max_diff"] = float(np.abs(served_audio - expected_audio).max()) if served_audio.size \
                    else 0.0
            np.save(workdir / "served_audio.npy", served_audio)
            np.save(workdir / "expected_audio.npy", expected_audio)
        if restart:
            # the same command on the same port after a SIGTERM stop: nothing of the first server may be in the
            # way (port, shared memory, stage processes), and the answer must be the same
            port = int(base.rsplit(":", 1)[1])
            again: dict = {"shm_left_by_first": sorted(shared_memory_names() - shm_before)}
            result["restart"] = again
            with pipeline_server(checkpoint, workdir, timeout, again, port=port, log_name="server2.log") as (b, _):
                again["served"], audio2 = ask(b, wav)
                again["same_text"] = again["served"]["text"] == result["served"]["text"]
                again["same_audio"] = audio2.size == served_audio.size and bool(np.array_equal(audio2, served_audio))
            again["shm_left"] = sorted(shared_memory_names() - shm_before)
    except Exception as error:  # reported with the log's tail
        result["error"] = f"{type(error).__name__}: {error}"
    served = result.get("served") or {}
    again = result.get("restart") or {}
    result["ok"] = ("error" not in result and not result["left_running"]
                    and served.get("text") == result["expected"]["text"]
                    and served.get("audio_samples", 0) > 0 and served.get("rates") == [16000]
                    # equal to BatchedUnit2Wav on the in-process rows, up to the server's 16-bit WAV encoding
                    and result.get("audio_max_diff", 1.0) <= 1e-4
                    and (not restart or (again.get("same_text") and again.get("same_audio")
                                         and not again.get("left_running") and again.get("server_exit") == 0)))
    if not result["ok"]:
        result["log_tail"] = log_path.read_text(errors="replace")[-6000:]
        if (workdir / "server2.log").exists():
            result["log2_tail"] = (workdir / "server2.log").read_text(errors="replace")[-4000:]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--restart", action="store_true",
                        help="then stop the server, start it again on the same port and ask again")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = run(args.workdir, args.timeout, restart=args.restart)
    print("\nRESULT " + json.dumps(result))  # on its own line (a library may have left a prompt unterminated)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
