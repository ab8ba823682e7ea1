"""End-to-end check of the LLaMA-Omni pipeline on vLLM-Omni: a tiny serving checkpoint (serving/tiny_checkpoint.py)
served by `python -m serving.pipeline serve` on 127.0.0.1 (our deploy config), one spoken question streamed
with llama_omni_hf.omni_client, the server stopped by PID (its process group). Prints one JSON line: the streamed
text and the in-process greedy answer's text, the audio received (samples, rate, chunks) and its largest
difference from BatchedUnit2Wav run on the in-process final-norm rows fed in the increments stage 1 consumed (read
from the server's LLAMA_OMNI_SERVING_TRACE; served_audio.npy is left in WORKDIR), timings. With --restart the
server is then stopped (SIGTERM to its process group), started again with the same command on the same port, and
asked again: the same text, its audio again equal to the replay of its own increments, the first server exited
with status 0 leaving no process behind; /dev/shm entries that appeared and stayed are listed (vLLM 0.30's CPU
executor leaves some of its message-queue segments behind at each stop).

    .venv-serve/bin/python -m serving.e2e_check WORKDIR [--timeout 900] [--restart]
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
    """Greedy `generate` in process: the answer ids and text, and the final-norm rows stage 1 should get (the last
    prompt row, then one per generated token but the last), with the model to vocode them."""
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
    return {"ids": ids, "text": processor.tokenizer.decode(text_ids, skip_special_tokens=True),
            "rows": stage1_rows(model, out, inputs["input_features"], prompt_len), "model": model}


def stage1_rows(model, sequence, input_features, prompt_len: int):
    """Teacher forcing of one prompt + answer `sequence` [1, T]: the final-norm rows stage 1 gets (the last prompt
    row, then one per answer token but the last)."""
    import torch

    with torch.no_grad():
        embeds = model._embed_with_speech(sequence[:, :-1], input_features)
        states = model.model(inputs_embeds=embeds).last_hidden_state[0]  # after the final norm
    return states[prompt_len - 1:]


def served_increments(trace: Path) -> dict[str, list[tuple[int, bool]]]:
    """Per stage-1 request id, the rows each of its engine steps consumed and whether that step finished it, from
    the server's LLAMA_OMNI_SERVING_TRACE (serving/llama_omni_unit2wav.py). The streaming vocoder's windows
    follow these increments (the producer coalesces rows by time), so a reference must replay them."""
    steps: dict[str, list[tuple[int, bool]]] = {}
    for line in trace.read_text().splitlines() if trace.exists() else []:
        event = json.loads(line)
        if event.get("event") != "step":
            continue
        for rid in dict.fromkeys([*event["rows"], *event.get("finished", [])]):
            steps.setdefault(rid, []).append((event["rows"].get(rid, 0), rid in event.get("finished", [])))
    return steps


def increments_for(steps: dict[str, list[tuple[int, bool]]], response_id: str) -> list[tuple[int, bool]] | None:
    """The increments of the stage-1 request serving `response_id` (its id is the response id plus a suffix)."""
    found = [rid for rid in steps if rid.startswith(response_id)]
    return steps[found[0]] if len(found) == 1 else None


def replay(model, rows, increments: list[tuple[int, bool]]) -> tuple[np.ndarray, int]:
    """BatchedUnit2Wav alone on `rows`, fed in `increments`: the audio stage 1 should have streamed, and the
    number of units."""
    import torch

    from llama_omni_hf.batched_unit2wav import BatchedUnit2Wav

    engine = BatchedUnit2Wav(model)
    engine.add_request("r")
    pieces, units, start = [], 0, 0
    with torch.no_grad():
        for count, finished in increments:
            new_units, piece = engine.step({"r": rows[start:start + count]}, finished={"r"} if finished else set())["r"]
            start += count
            units += len(new_units)
            pieces.append(piece)
    if start != len(rows) or not increments or not increments[-1][1]:
        raise ValueError(f"the served increments {increments} do not cover the {len(rows)} rows exactly once")
    return torch.cat(pieces).float().numpy(), units


@contextmanager
def pipeline_server(checkpoint: Path, workdir: Path, timeout: float, result: dict, port: int | None = None,
                    log_name: str = "server.log"):
    """`python -m serving.pipeline serve CHECKPOINT` on 127.0.0.1 (`port`, or a free one; log in WORKDIR/log_name),
    ready within `timeout`; yields (base URL, process); stage 1's trace goes to WORKDIR/<log_name>.trace.jsonl.
    Records `server_pid` and `startup_s` in `result` and, however
    the block ends, stops the server by its process group and records `server_exit` and `left_running`."""
    base = f"http://127.0.0.1:{port or _free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               LLAMA_OMNI_SERVING_TRACE=str(workdir / f"{log_name}.trace.jsonl"))
    Path(env["LLAMA_OMNI_SERVING_TRACE"]).unlink(missing_ok=True)
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
            result["server_errors"] = server_errors(workdir / log_name)


_ERROR_LINE = re.compile(r"^\S*(Error|Exception)\b.*:|is dead|fatal error")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def server_errors(log_path: Path, limit: int = 12) -> list[str]:
    """The lines of a server log that name an exception or a dead stage, without their log prefixes, in order and
    without repeats: the root cause of a failed request is there (the log tail only shows the shutdown)."""
    seen: list[str] = []
    for line in _ANSI.sub("", log_path.read_text(errors="replace")).splitlines():
        message = re.sub(r"^\(.*?\)\s+(\w+\s+\d\d-\d\d \S+ \[\S+\]\s*)?", "", line).strip()
        if _ERROR_LINE.search(message) and message not in seen:
            seen.append(message[:400])
    return seen[:limit]


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


def worker_cpus(server_pid: int) -> dict[str, list[str]]:
    """The CPUs each of the server's model workers (the stage processes' `VLLM::Worker`) may run on, per thread."""
    cpus = {}
    for pid in group_members(server_pid):
        try:
            if "VLLM::Worker" not in Path(f"/proc/{pid}/cmdline").read_text():
                continue
            threads = Path(f"/proc/{pid}/task").iterdir()
            cpus[str(pid)] = sorted({line.split(":", 1)[1].strip() for t in threads
                                     for line in (t / "status").read_text().splitlines()
                                     if line.startswith("Cpus_allowed_list")})
        except OSError:
            continue
    return cpus


def shared_memory_names() -> set[str]:
    """What /dev/shm holds now (the stages exchange rows through shared memory segments)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir()} if shm.is_dir() else set()


def check_audio(expected: dict, served: dict, served_audio: np.ndarray, trace: Path) -> dict:
    """The served audio against BatchedUnit2Wav replaying, on the in-process rows, the increments stage 1 consumed
    (from the trace; the server's only request)."""
    steps = served_increments(trace)
    if len(steps) != 1:
        return {"match": False, "why": f"expected one traced request, found {sorted(steps)}"}
    increments = next(iter(steps.values()))
    try:
        reference, units = replay(expected["model"], expected["rows"], increments)
    except ValueError as error:
        return {"match": False, "why": str(error)}
    check = {"increments": len(increments), "units": units, "expected_samples": int(reference.size)}
    if reference.size == served_audio.size:
        check["max_diff"] = float(np.abs(served_audio - reference).max()) if reference.size else 0.0
    # equal up to the server's 16-bit WAV encoding
    check["match"] = served["rates"] == [16000] and served_audio.size > 0 and check.get("max_diff", 1.0) <= 1e-4
    return check


def run(workdir: Path, timeout: float, restart: bool = False) -> dict:
    from serving.tiny_checkpoint import build_tiny_serving_checkpoint

    checkpoint = build_tiny_serving_checkpoint(workdir / "ckpt")
    wav = question()
    expected = in_process_answer(checkpoint, wav)
    result: dict = {"ok": False, "expected": {"ids": expected["ids"], "text": expected["text"]}}
    log_path = workdir / "server.log"
    shm_before = shared_memory_names()
    try:
        with pipeline_server(checkpoint, workdir, timeout, result) as (base, server):
            result["served"], served_audio = ask(base, wav)
            result["worker_cpus"] = worker_cpus(server.pid)
        result["audio"] = check_audio(expected, result["served"], served_audio, workdir / "server.log.trace.jsonl")
        np.save(workdir / "served_audio.npy", served_audio)
        if restart:
            # the same command on the same port after a SIGTERM stop: nothing of the first server may be in the
            # way (port, stage processes), and the answer must be the same
            port = int(base.rsplit(":", 1)[1])
            again: dict = {"shm_left_by_first": sorted(shared_memory_names() - shm_before)}
            result["restart"] = again
            with pipeline_server(checkpoint, workdir, timeout, again, port=port, log_name="server2.log") as (b, _):
                again["served"], audio2 = ask(b, wav)
            again["audio"] = check_audio(expected, again["served"], audio2, workdir / "server2.log.trace.jsonl")
            again["same_text"] = again["served"]["text"] == result["served"]["text"]
            again["shm_left"] = sorted(shared_memory_names() - shm_before)
    except Exception as error:  # reported with the log's tail
        result["error"] = f"{type(error).__name__}: {error}"
    served = result.get("served") or {}
    again = result.get("restart") or {}
    result["ok"] = ("error" not in result and not result["left_running"]
                    and served.get("text") == result["expected"]["text"]
                    and (result.get("audio") or {}).get("match", False)
                    and (not restart or (again.get("same_text") and again["audio"].get("match")
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
