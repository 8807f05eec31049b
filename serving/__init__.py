"""The serving stack: paged KV cache, prefill/insert/generate engine, scheduler, HTTP server, scoring jobs.

Until the engine issue (#5) lands, generation runs through `jaxllm.generate` (contiguous cache, batched).
"""
