"""Host-side owner of KV-cache page ids: allocate pages for a sequence, grow it a page at a time, share a prefix, free.

    alloc = PageAllocator(num_pages=1024, page_size=16)     # page 0 is the scratch page, never handed out
    alloc.allocate("req-1", num_tokens=37)                  # -> 3 pages; False (nothing taken) if they are not free
    alloc.ensure("req-1", num_tokens=49)                    # grows to 4 pages as the sequence grows
    alloc.fork("req-1", "req-1/1", num_shared=2, num_tokens=49)   # first 2 pages shared, 2 of its own
    alloc.pages("req-1")                                    # the page ids in order: the sequence's page-table row
    alloc.free("req-1")                                     # its pages back on the free list (shared ones once unused)

The device holds the pages themselves ([L, P, K, C, H] in `jaxllm.layers.paged`); this class only hands out ids.
A page can be held by several sequences (the full prompt pages of n > 1 samples of one prompt): each holder counts
once in its reference count, and the page is free again when the last holder lets go. Shared pages are only ever
read: a sequence writes only positions past its shared prefix, into pages of its own (the engine copies the partly
filled page a fork starts in). Freed pages are reused most-recently-freed first. `check()` asserts that the counts
agree with the holders and that every page is either free or held, which the engine's tests run after thousands of
requests.
"""

from __future__ import annotations

import collections

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
    self._refs: dict[int, int] = {}  # page id -> number of sequences holding it (free pages are absent)

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

  def num_shared(self) -> int:
    """Pages held by more than one sequence."""
    return sum(1 for r in self._refs.values() if r > 1)

  # ------------------------------------------------------------------ changes
  def _take(self, n: int) -> list[int]:
    out = [self._free.pop() for _ in range(n)]
    for p in out:
      self._refs[p] = 1
    return out

  def allocate(self, seq, num_tokens: int) -> bool:
    """Pages for a new sequence of `num_tokens`; False (and nothing taken) if not enough are free."""
    if seq in self._owned:
      raise ValueError(f"sequence {seq!r} already holds pages; free it first.")
    n = self.pages_for(num_tokens)
    if n > len(self._free):
      return False
    self._owned[seq] = self._take(n)
    return True

  def fork(self, parent, seq, num_shared: int, num_tokens: int) -> bool:
    """A new sequence `seq` holding `parent`'s first `num_shared` pages (shared, read-only from now on) and pages of
    its own for the rest of `num_tokens`; False (and nothing taken) if those are not free."""
    if seq in self._owned:
      raise ValueError(f"sequence {seq!r} already holds pages; free it first.")
    shared = self._owned[parent][:num_shared]
    if len(shared) != num_shared:
      raise ValueError(f"{parent!r} holds {len(self._owned[parent])} pages, fewer than num_shared={num_shared}.")
    n = max(self.pages_for(num_tokens) - num_shared, 0)
    if n > len(self._free):
      return False
    for p in shared:
      self._refs[p] += 1
    self._owned[seq] = shared + self._take(n)
    return True

  def ensure(self, seq, num_tokens: int) -> bool:
    """Grows `seq` to hold `num_tokens`; False (and nothing taken) if the extra pages are not free."""
    owned = self._owned[seq]
    extra = self.pages_for(num_tokens) - len(owned)
    if extra > len(self._free):
      return False
    owned.extend(self._take(max(extra, 0)))
    return True

  def free(self, seq) -> None:
    for p in reversed(self._owned.pop(seq)):
      self._refs[p] -= 1
      if not self._refs[p]:
        del self._refs[p]
        self._free.append(p)

  def check(self) -> None:
    """Reference counts equal the holders, and every page but the scratch page is free or held, never both."""
    holders = collections.Counter(p for ps in self._owned.values() for p in ps)
    assert holders == collections.Counter(self._refs), "page reference counts disagree with the holders"
    assert all(len(set(ps)) == len(ps) for ps in self._owned.values()), "a sequence holds a page twice"
    everything = sorted(list(holders) + self._free)
    assert everything == list(range(1, self.num_pages)), (
        f"page accounting broken: {len(holders)} held + {len(self._free)} free != {self.num_pages - 1} pages "
        f"(duplicates or leaks)")
