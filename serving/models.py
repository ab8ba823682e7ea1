"""The model architectures `serving` adds, registered in every process that vLLM or vllm-omni starts.

Entry points (pyproject.toml): `vllm_omni.general_plugins` (vllm-omni's stage workers resolve architectures
through their own OmniModelRegistry: a model only in vLLM's ModelRegistry is "not supported" there) and
`vllm.general_plugins` (vLLM's config checks read its ModelRegistry). Registration is lazy ("module:Class"):
nothing is imported until a stage loads the model, and registering twice is harmless.
"""

from __future__ import annotations

ARCHITECTURES = {
    # A plain Llama as a vllm-omni stage model: the smoke check's (serving/smoke.py)
    "LlamaOmniSmokeForCausalLM": "serving.smoke:SmokeLlamaForCausalLM",
    # A weightless LLM_GENERATION stage model turning token ids into 16 kHz audio: the smoke check's stage 1
    "LlamaOmniSmokeWave": "serving.smoke:SmokeWaveForGeneration",
    # LLaMA-Omni (v1) stage 0, the thinker: Whisper encoder + adaptor + vLLM's Llama (serving/llama_omni_thinker.py);
    # under the converted checkpoints' own architecture name too, so plain vLLM serves them as a speech-to-text LLM
    "LlamaOmniThinker": "serving.llama_omni_thinker:LlamaOmniThinker",
    "LlamaOmniForConditionalGeneration": "serving.llama_omni_thinker:LlamaOmniThinker",
    # stage 1, unit2wav: final-norm rows -> units -> 16 kHz audio, batched across requests
    "LlamaOmniUnit2Wav": "serving.llama_omni_unit2wav:LlamaOmniUnit2Wav",
}


def register() -> None:
    from vllm import ModelRegistry
    from vllm_omni.model_executor.models.registry import OmniModelRegistry

    for registry in (ModelRegistry, OmniModelRegistry):
        for architecture, target in ARCHITECTURES.items():
            registry.register_model(architecture, target)
