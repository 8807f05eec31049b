"""Flax NNX Llama modules: RMSNorm, RoPE, GQA attention, SwiGLU MLP, decoder layer, the Llama model."""

from jaxllm.layers.llama import DecoderLayer, Llama

__all__ = ["DecoderLayer", "Llama"]
