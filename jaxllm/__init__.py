"""jaxllm: a JAX inference stack for Llama-family models.

    from jaxllm import LLM, SamplingParams
    llm = LLM("default")
    print(llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32))[0].text)
"""

from jaxllm.config import ModelConfig
from jaxllm.llm import LLM, CompletionOutput, RequestOutput, ScoreOutput
from jaxllm.sampling import SamplingParams
from jaxllm.structured_outputs import StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "ModelConfig", "RequestOutput", "CompletionOutput",
           "ScoreOutput"]
__version__ = "0.1.0"
