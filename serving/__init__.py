"""The serving stack: paged KV cache, prefill/insert/generate engine, continuous-batching scheduler (HTTP server and
scoring jobs to come).

    page_allocator.py  host-side page ids: allocate / grow / free, accounting checked
    engine.py          jit prefill (flash attention, KV into pages) / insert / generate (ragged paged attention) /
                       release over a donated, typed DecodeState; per-slot sampling arrays, so nothing recompiles
    scheduler.py       waiting queue -> admission -> prefill + insert -> generate loop (one call in flight) -> stop
                       rules -> free; preemption by recompute, cancellation, streaming callbacks
    detokenizer.py     incremental text with stop strings and partial UTF-8 held back

`jaxllm.LLM` still generates through `jaxllm.generate` (contiguous cache); moving it onto the scheduler is the next
step of the engine issue (#5).
"""
