"""CPU workers for vllm-omni stages, named by serving.platform.CpuOmniPlatform.

Each is vLLM's public CPU worker (vllm/v1/worker/cpu_worker.py) running vllm-omni's model runner for its stage
kind, that runner put on top of vLLM's CPU model runner (vllm/v1/worker/cpu_model_runner.py) the way vllm-omni's
own XPU workers put it on vLLM's XPU worker (vllm_omni/platforms/xpu/worker/). Method resolution order:
the omni runner's overrides (hidden states and multimodal outputs to the next stage, connectors) come first,
then the CPU runner's (no device sync or CUDA events, CPU weight loading, warm-up), then vLLM's GPU runner.
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm_omni.worker.gpu_ar_model_runner import GPUARModelRunner
from vllm_omni.worker.gpu_generation_model_runner import GPUGenerationModelRunner
from vllm_omni.worker.mixins import OmniWorkerMixin

logger = init_logger(__name__)


class _CPURunnerBuffers:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The omni runners make new input buffers after CPUModelRunner.__init__ aliased the old ones' device
        # halves to their host halves (CPUModelRunner._postprocess_tensors): alias the new ones too.
        self._postprocess_tensors()


class CPUARModelRunner(_CPURunnerBuffers, GPUARModelRunner, CPUModelRunner):
    """Autoregressive stages (LLM_AR, e.g. a thinker)."""


class CPUGenerationModelRunner(_CPURunnerBuffers, GPUGenerationModelRunner, CPUModelRunner):
    """Non-autoregressive stages (LLM_GENERATION, e.g. a vocoder)."""


class _OmniCPUWorker(OmniWorkerMixin, CPUWorker):
    model_runner_cls: type  # read by vllm_omni/worker/omni_connector_validation.py

    def init_device(self):
        super().init_device()
        # CPUWorker.init_device built vLLM's own runner; the omni hooks live in the v1 omni runners only.
        self.use_v2_model_runner = False
        self.model_runner = self.model_runner_cls(self.vllm_config, self.device)
        logger.info("%s: %s (serving/cpu_workers.py)", type(self).__name__, type(self.model_runner).__name__)


def check_no_chunked_prefill(vllm_config) -> None:
    """Refuse an autoregressive CPU stage whose scheduler may split a prompt over steps.

    After a partial prefill vLLM rewinds the request's seeded sampling generator by 4 Philox steps
    (vllm/v1/worker/gpu_model_runner.py, `_bookkeeping_sync`: `gen.set_offset(gen.get_offset() - 4)`), which a
    CPU torch.Generator cannot do: "RuntimeError: CPU Generator does not use offset" kills the stage, and with it
    every request on the server, the first time a request with a `seed` has its prompt split (e.g. 8 questions
    of ~400 tokens arriving in the same step under max_num_batched_tokens 2048). Failing at startup says why.
    """
    scheduler = vllm_config.scheduler_config
    if scheduler.enable_chunked_prefill:
        raise ValueError(
            "this autoregressive stage runs on vLLM's CPU backend with chunked prefill on: a request with a "
            "`seed` whose prompt is split over steps would crash the stage (vLLM rewinds its sampling generator, "
            "which CPU generators cannot do). Set `enable_chunked_prefill: false` and `max_num_batched_tokens` "
            f">= max_model_len ({vllm_config.model_config.max_model_len}) for this stage in the deploy config, as "
            "serving/deploy/llama_omni_cpu.yaml does.")


class CPUARWorker(_OmniCPUWorker):
    model_runner_cls = CPUARModelRunner

    def init_device(self):
        check_no_chunked_prefill(self.vllm_config)
        super().init_device()


class CPUGenerationWorker(_OmniCPUWorker):
    model_runner_cls = CPUGenerationModelRunner
