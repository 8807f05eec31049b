"""Host-side owner of KV-cache page ids: allocate pages for a sequence, grow it a page at a time, free it.

    alloc = PageAllocator(num_pages=1024, page_size=16)     # page 0 is the scratch page, never handed out
    alloc.allocate("req-1", num_tokens=37)                  # -> 3 pages; False (nothing taken) if they are not free
    alloc.ensure("req-1", num_tokens=49)                    # grows to 4 pages as the sequence grows
    alloc.pages("req-1")                                    # the page ids in order: the sequence's page-table row
    alloc.free("req-1")                                     # all its pages back on the free list

The device holds the pages themselves ([L, P, K, C, H] in `jaxllm.layers.paged`); this class only hands out ids.
Freed pages are reused most-recently-freed first. `check()` asserts that every page is either free or owned by
exactly one sequence, which the engine's tests run after thousands of requests.
"""

from __future__ import annotations

SCRATCH_PAGE = 0  # padding tokens and idle slots write here; no sequence ever reads it


class PageAllocator:

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 2:
      raise ValueError(f"num_pages={num_pages}: need at least 2 (one is the scratch page).")
    if page_size < 1:
      raise ValueError(f"page_size={page_size} must be >= 1.")
    self.num_pages = num_pages
    self.page_size = page_size
    self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
    self._owned: dict[object, list[int]] = {}

  # ------------------------------------------------------------------ queries
  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def capacity(self) -> int:
    """Pages a sequence could ever hold (all but the scratch page)."""
    return self.num_pages - 1

  def pages_for(self, num_tokens: int) -> int:
    return -(-num_tokens // self.page_size)

  def pages(self, seq) -> list[int]:
    return self._owned[seq]

  def owns(self, seq) -> bool:
    return seq in self._owned

  def can_fit(self, num_tokens: int, seq=None) -> bool:
    have = len(self._owned.get(seq, ())) if seq is not None else 0
    return self.pages_for(num_tokens) - have <= len(self._free)

  # ------------------------------------------------------------------ changes
  def allocate(self, seq, num_tokens: int) -> bool:
    """Pages for a new sequence of `num_tokens`; False (and nothing taken) if not enough are free."""
    if seq in self._owned:
      raise ValueError(f"sequence {seq!r} already holds pages; free it first.")
    n = self.pages_for(num_tokens)
    if n > len(self._free):
      return False
    self._owned[seq] = [self._free.pop() for _ in range(n)]
    return True

  def ensure(self, seq, num_tokens: int) -> bool:
    """Grows `seq` to hold `num_tokens`; False (and nothing taken) if the extra pages are not free."""
    owned = self._owned[seq]
    extra = self.pages_for(num_tokens) - len(owned)
    if extra > len(self._free):
      return False
    owned.extend(self._free.pop() for _ in range(max(extra, 0)))
    return True

  def free(self, seq) -> None:
    self._free.extend(reversed(self._owned.pop(seq)))

  def check(self) -> None:
    """Every page but the scratch page is free or owned by exactly one sequence."""
    owned = [p for ps in self._owned.values() for p in ps]
    everything = sorted(owned + self._free)
    assert everything == list(range(1, self.num_pages)), (
        f"page accounting broken: {len(owned)} owned + {len(self._free)} free != {self.num_pages - 1} pages "
        f"(duplicates or leaks)")
