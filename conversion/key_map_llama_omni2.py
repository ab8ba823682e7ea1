"""The LLaMA-Omni2 conversion as a table: every original key -> its key in LlamaOmni2ForConditionalGeneration
(spec `llama-omni2.md` section 6).

Source keys are prefixed by the file they come from:
    checkpoint:  the released safetensors of ICTNLP/LLaMA-Omni2-* (saved by transformers 4.43, bf16)
    whisper:     openai-whisper's large-v3.pt `model_state_dict` (optional; only COMPARED with the checkpoint's
                 copy of the encoder, which is what the original runs: spec Q14)
The decoder files (`flow.pt`, `hift.pt` of ICTNLP/cosy2_decoder) have their own table, key_map_omni2.py; their
result is nested under `token2wav.` by convert_llama_omni2.py.

A rule is (regex on the prefixed key, target template or None, transform). The first matching rule wins
(`key_map.apply_rule`); a None target drops the key and the transform names the reason. A key matched by no rule
is an error.

Transforms:
    copy           the tensor, cast to the output dtype
    whisper_names  copy, after the openai-whisper -> transformers WhisperEncoder renames (key_map.WHISPER_NAMES)
    compare        (whisper: only) not written; must equal the checkpoint's tensor of the same target within bf16
                   rounding

Not in the table because it depends on which keys exist (`map_keys`): `tts.lm_head.weight` when the checkpoint has
no `speech_generator.model.lm_head.weight` (quirk Q1) is a copy of the TTS embedding, with a loud warning.
"""

from __future__ import annotations

from conversion.key_map import Entry, KeyPlan, apply_rule, whisper_name

TTS_HEAD = "checkpoint:speech_generator.model.lm_head.weight"
TTS_EMBEDDING = "checkpoint:speech_generator.model.model.embed_tokens.weight"
TIED_TTS_HEAD = "tie_tts_head"  # the transform of the Q1 fallback entry

KEY_TABLE: list[tuple[str, str | None, str]] = [
    # released checkpoint
    (r"checkpoint:.*\.rotary_emb\.inv_freq", None, "drop: RoPE frequencies are recomputed from the config"),
    (r"checkpoint:model\.speech_encoder\.(.+)", r"speech_encoder.\1", "whisper_names"),
    (r"checkpoint:model\.speech_projector\.(linear[12]\.(?:weight|bias))", r"speech_adaptor.\1", "copy"),
    (r"checkpoint:model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\..+)", r"model.\1", "copy"),
    (r"checkpoint:lm_head\.weight", "lm_head.weight", "copy"),
    (r"checkpoint:speech_generator\.model\.model\.(.+)", r"tts.model.\1", "copy"),
    (r"checkpoint:speech_generator\.model\.lm_head\.weight", "tts.lm_head.weight", "copy"),
    (r"checkpoint:speech_generator\.input_proj\.([02])\.(weight|bias)", r"tts.input_proj.\1.\2", "copy"),
    (r"checkpoint:speech_generator\.gate\.0\.(weight|bias)", r"tts.gate.\1", "copy"),
    # openai-whisper large-v3.pt (optional): a check of the checkpoint's copy, never written (spec Q14)
    (r"whisper:encoder\.(.+)", r"speech_encoder.\1", "compare"),
    (r"whisper:decoder\..+", None, "drop: the Whisper decoder is not part of LLaMA-Omni2"),
]


def map_keys(source_shapes: dict[str, tuple[int, ...]]) -> tuple[KeyPlan, dict[str, Entry]]:
    """Apply KEY_TABLE to every prefixed source key (shapes only: nothing is read here).

    Returns (plan, comparisons): `plan.entries` are the tensors to write (target -> candidates), `comparisons` the
    large-v3.pt tensors by target, to be checked against the checkpoint's entry of the same target."""
    plan, comparisons = KeyPlan(), {}
    for key, shape in source_shapes.items():
        rule = apply_rule(KEY_TABLE, key, plan)
        if rule is None:
            continue
        target, transform = rule
        if transform in ("whisper_names", "compare"):
            prefix, name = target.split(".", 1)
            renamed = whisper_name(name)
            if renamed is None:
                plan.unmatched.append(key)
                continue
            target = f"{prefix}.{renamed}"
        entry = Entry(target, "copy", [key], tuple(shape))
        if transform == "compare":
            if target in comparisons:
                plan.problems.append(f"{target} comes from two large-v3.pt keys: {comparisons[target].sources[0]} "
                                     f"and {key}")
            comparisons[target] = entry
            continue
        plan.entries.setdefault(target, []).append(entry)
    if TTS_HEAD not in source_shapes and TTS_EMBEDDING in source_shapes:  # quirk Q1
        plan.entries.setdefault("tts.lm_head.weight", []).append(
            Entry("tts.lm_head.weight", TIED_TTS_HEAD, [TTS_EMBEDDING], tuple(source_shapes[TTS_EMBEDDING])))
    return plan, comparisons
