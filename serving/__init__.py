"""The serving stack: one mixed ragged engine step over a paged KV cache, the scheduler around it, and its users.

    config.py          EngineConfig (the one carrier of engine settings) and the shape buckets
    kv_cache.py        how many KV pages fit the device memory
    page_allocator.py  host-side page ids with automatic prefix caching (hashed full pages, LRU eviction)
    engine.py          the step: decode tokens + prefill chunks through the model and ragged paged attention, then
                       the LM head and sampler (two jitted programs, the state donated); prefill / insert / generate
    scheduler.py       token-budgeted continuous batching: decodes, prefill chunks, admissions with prefix hits,
                       preemption by recompute, one step in flight while the host absorbs the previous one
    detokenizer.py     incremental text with stop strings and partial UTF-8 held back
    engine_loop.py     the scheduler on its own thread for an asyncio caller
    server.py          the OpenAI-compatible HTTP server (protocol.py: the request schemas)
    scoring.py         log-likelihoods by full forward passes; score_job.py: the grain batch job
"""
