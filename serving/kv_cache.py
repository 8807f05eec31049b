"""KV-cache sizing: how many pages the engine allocates, from the settings and the device memory left.

    num_pages = size_kv_cache(config, model_config, dtype, activation_sharding)

`EngineConfig.num_pages` wins when given. Otherwise the budget is `kv_cache_memory_fraction` of the free memory of the
fullest device holding the cache (vLLM's defaults: 0.9 on an accelerator; on CPU the smaller of 4 GiB and half the
free RAM), divided by the bytes one page takes there (its share of the KV heads when they are sharded), and capped at
what every sequence needs at max_model_len.
"""

from __future__ import annotations

import os

import jax

from jaxllm.pallas_kernels.kv_quant import bytes_per_token_head
from jaxllm.serving.config import EngineConfig, cdiv

CPU_KV_CACHE_BYTES = 4 << 30  # vLLM's CPU default KV space; the CPU default fraction is also capped at this


def page_bytes(engine_config: EngineConfig, model_config, dtype, num_shards: int = 1) -> int:
  """Bytes one KV page (all layers, K and V; with a quantized dtype, the scales too) takes on each device holding a
  1/num_shards slice of its heads. dtype: the KV values' dtype."""
  mc = model_config
  per_page = (2 * mc.num_layers * mc.num_kv_heads * engine_config.page_size
              * bytes_per_token_head(mc.head_dim, dtype))
  return cdiv(per_page, num_shards)


def free_device_bytes(devices) -> tuple[int, bool]:
  """(bytes free on the fullest device, whether that came from the accelerator's allocator). CPU devices report no
  memory stats; their figure is the host's available RAM."""
  free = []
  for d in devices:
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "bytes_limit" in stats:
      free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  if free:
    return min(free), True
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), False


def size_kv_cache(config: EngineConfig, model_config, dtype, activation_sharding=None) -> int:
  """Number of KV pages (dtype: the KV values' dtype): `config.num_pages` if given, else the memory budget's worth, at
  most `pages_wanted`.

  Raises a ValueError when the pages cannot hold even one sequence of max_model_len (vLLM's "max_model_len is larger
  than the KV cache can hold"), naming the figures and the flags that change them."""
  if config.num_pages is not None:
    if config.num_pages < config.pages_per_seq + 1:  # else a sequence that fills the pool preempts itself forever
      raise ValueError(
          f"num_pages={config.num_pages} leaves {config.num_pages - 1} pages of {config.page_size} tokens (one is "
          f"scratch), fewer than one sequence of max_model_len={config.max_model_len} needs "
          f"({config.pages_per_seq}); raise num_pages to at least {config.pages_per_seq + 1} or lower max_model_len.")
    return config.num_pages
  devices, shards = jax.local_devices()[:1], 1
  if activation_sharding is not None:
    mesh = activation_sharding.mesh
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    shape = (model_config.num_layers, 1, model_config.num_kv_heads, config.page_size, model_config.head_dim)
    spec = activation_sharding.named(("layers", None, "kv_heads", None, "head_dim"), shape).spec
    for axes in spec:
      for a in (axes if isinstance(axes, tuple) else (axes,) if axes else ()):
        shards *= mesh.shape[a]
  free, accelerator = free_device_bytes(devices)
  fraction = config.kv_cache_memory_fraction
  if fraction is None:
    budget = 0.9 * free if accelerator else min(CPU_KV_CACHE_BYTES, 0.5 * free)
  else:
    budget = fraction * free
  per_page = page_bytes(config, model_config, dtype, shards)
  pages = min(int(budget // per_page), config.pages_wanted)
  if pages < config.pages_per_seq + 1:
    raise ValueError(
        f"the KV cache budget ({budget / 2**30:.2f} GiB per device, {per_page} bytes per page of "
        f"{config.page_size} tokens) holds {max(pages - 1, 0)} pages, fewer than one sequence of "
        f"max_model_len={config.max_model_len} needs ({config.pages_per_seq}); lower max_model_len, or raise "
        "kv_cache_memory_fraction or num_pages.")
  return pages
