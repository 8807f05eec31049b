"""Host-side owner of KV-cache page ids, with automatic prefix caching: a full page whose tokens are known is
registered under a hash of its whole prefix, and a later request starting with the same tokens reuses the page
instead of computing it again.

    alloc = PageAllocator(num_pages=1024, page_size=16)     # page 0 is the scratch page, never handed out
    prefix = alloc.match(prompt)                            # cached full pages that start `prompt` (takes nothing)
    alloc.allocate("req-1", num_tokens=len(prefix) * 16 + chunk, prefix=prefix)  # False (nothing changed) if short
    alloc.commit("req-1", token_ids, num_computed)          # full pages now written: register them for reuse
    alloc.ensure("req-1", num_tokens=49)                    # grows a page at a time as the sequence grows
    alloc.pages("req-1")                                    # the page ids in order: the sequence's page-table row
    alloc.free("req-1")                                     # unregistered pages free; registered ones evictable

The device holds the pages themselves (pools [L * P, K, C, H] in `jaxllm.layers.paged`); this class only hands out ids.
Every page but the scratch page is in exactly one of three places:
  held       by one or more sequences, each counting once in its reference count (a shared prefix is only read);
  evictable  registered, held by nobody, in an LRU (an OrderedDict, oldest first); `allocate(prefix=...)` takes it
             back out, and a fresh page evicts from the oldest end, dropping the page's hash;
  free       unregistered and held by nobody; handed out before any cached page is evicted.
A page's key is `page_hashes`: blake2b over the previous page's key and this page's tokens, so a key names the whole
prefix up to the page's end (the same tokens after a different start are a different key). `match` stops one token
short of the prompt, so a request always computes its last token itself and never writes into a page it shares.
Freed pages go back tail first, so the LRU evicts a sequence's tail before its head. The per-step calls (match,
allocate, ensure, commit, free) cost time in the pages they touch, not in `num_pages`; `check()` asserts the
accounting, which the tests run after thousands of random operations.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np

from jaxllm.serving.config import cdiv

SCRATCH_PAGE = 0  # padding tokens and idle slots write here; no sequence ever reads it
_ROOT_KEY = b""  # the parent of a sequence's first page
_TOKEN_DTYPE = np.dtype("<i4")  # the bytes hashed per token: the same on every host


def _page_key(parent: bytes, page_bytes: bytes) -> bytes:
  return hashlib.blake2b(parent + page_bytes, digest_size=16).digest()


def _pages_bytes(token_ids: Sequence[int], page_size: int, start: int, stop: int):
  """The token bytes of pages start..stop-1, converted a block at a time (doubling), so a caller that stops early
  converts little and a long run costs one numpy conversion per block rather than one per page."""
  size, block = page_size * _TOKEN_DTYPE.itemsize, 16
  while start < stop:
    end = min(stop, start + block)
    data = np.asarray(token_ids[start * page_size:end * page_size], _TOKEN_DTYPE).tobytes()
    yield from (data[i * size:(i + 1) * size] for i in range(end - start))
    start, block = end, 2 * block


def page_hashes(token_ids: Sequence[int], page_size: int, num_pages: int | None = None,
                parent: bytes = _ROOT_KEY) -> list[bytes]:
  """The chained keys of the full pages of `token_ids` (at most `num_pages` of them), the first one's parent being
  `parent` (the key of the page before `token_ids[0]`; the default starts a sequence). Key j is
  blake2b(key j-1 + page j's tokens as little-endian int32), 16 bytes: collision-resistant, so no prompt can be
  crafted to land on another user's cached prefix."""
  n = len(token_ids) // page_size
  if num_pages is not None:
    n = min(n, num_pages)
  keys = []
  for page_bytes in _pages_bytes(token_ids, page_size, 0, n):
    parent = _page_key(parent, page_bytes)
    keys.append(parent)
  return keys


class PrefixKeys:
  """The chained keys of the full pages `match` may return for `token_ids` (all but its last token), computed only as
  far as they are read and kept: the data-parallel replicas' allocators all match one prompt and hash it once."""

  def __init__(self, token_ids: Sequence[int], page_size: int):
    self._pages = _pages_bytes(token_ids, page_size, 0, max(len(token_ids) - 1, 0) // page_size)
    self._keys: list[bytes] = []

  def __iter__(self):
    i = 0
    while True:
      if i == len(self._keys):
        page_bytes = next(self._pages, None)
        if page_bytes is None:
          return
        self._keys.append(_page_key(self._keys[-1] if self._keys else _ROOT_KEY, page_bytes))
      yield self._keys[i]
      i += 1


class PageAllocator:

  def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
    if num_pages < 2:
      raise ValueError(f"num_pages={num_pages}: need at least 2 (one is the scratch page).")
    if page_size < 1:
      raise ValueError(f"page_size={page_size} must be >= 1.")
    self.num_pages = num_pages
    self.page_size = page_size
    self.enable_prefix_caching = enable_prefix_caching
    self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first, then most recently freed
    self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # evictable pages, oldest first
    self._owned: dict[object, list[int]] = {}
    self._refs: dict[int, int] = {}  # page id -> number of sequences holding it (unheld pages are absent)
    self._num_shared = 0  # pages with a reference count above 1
    self._page_of: dict[bytes, int] = {}  # key -> the registered page holding those tokens
    self._key_of: dict[int, bytes] = {}  # registered page -> its key (the inverse of _page_of)
    self._committed: dict[object, tuple[int, bytes]] = {}  # seq -> (pages committed, key of the last of them)

  # ------------------------------------------------------------------ queries
  @property
  def num_free(self) -> int:
    """Pages that can be handed out now: free ones and evictable cached ones."""
    return len(self._free) + len(self._lru)

  @property
  def num_cached(self) -> int:
    """Cached pages held by no sequence (evictable, least recently freed first)."""
    return len(self._lru)

  @property
  def capacity(self) -> int:
    """Pages a sequence could ever hold (all but the scratch page)."""
    return self.num_pages - 1

  def pages_for(self, num_tokens: int) -> int:
    return cdiv(num_tokens, self.page_size)

  def pages(self, seq) -> list[int]:
    return self._owned[seq]

  def owns(self, seq) -> bool:
    return seq in self._owned

  def num_shared(self) -> int:
    """Pages held by more than one sequence."""
    return self._num_shared

  # ------------------------------------------------------------------ prefix cache
  def match(self, token_ids: Sequence[int] | PrefixKeys) -> list[int]:
    """The longest run of cached full pages that starts `token_ids` (or whose `PrefixKeys` are given), at most
    (len(token_ids) - 1) // page_size of them (the last token is always left to compute). Takes no references: pass
    the answer to `allocate(prefix=...)` before any other allocate or ensure can evict it. [] when caching is off."""
    if not self.enable_prefix_caching:
      return []
    keys = token_ids if isinstance(token_ids, PrefixKeys) else PrefixKeys(token_ids, self.page_size)
    found = []
    for key in keys:
      page = self._page_of.get(key)
      if page is None:
        break
      found.append(page)
    return found

  def commit(self, seq, token_ids: Sequence[int], num_computed: int) -> list[int]:
    """Registers `seq`'s full pages below min(len(token_ids), num_computed) tokens, written now or by a step already
    dispatched, under their keys; `token_ids` are the sequence's tokens from its start. A page whose key another page
    already holds (the same prefix computed twice) stays unregistered. Hashes only pages not committed before.
    Returns the pages it registered (for `forget`, should the step that writes them never run)."""
    if not self.enable_prefix_caching:
      return []
    C, owned = self.page_size, self._owned[seq]
    done, key = self._committed[seq]
    full = min(len(token_ids), num_computed) // C
    if full <= done:
      return []
    if full > len(owned):
      raise ValueError(f"commit of {full} full pages for {seq!r}, which holds only {len(owned)}.")
    registered = []
    for j, page_bytes in enumerate(_pages_bytes(token_ids, C, done, full), start=done):
      key = _page_key(key, page_bytes)
      if key not in self._page_of:
        self._page_of[key] = owned[j]
        self._key_of[owned[j]] = key
        registered.append(owned[j])
    self._committed[seq] = (full, key)
    return registered

  def forget(self, pages: Sequence[int]) -> None:
    """Unregisters `pages` (what `commit` answered) whose contents will never be written: the step that was to write
    them failed before it ran. An evictable one becomes free; a held one stays with its holders, unregistered. Call it
    after freeing the sequences that committed them (a held page's commit progress is not rolled back)."""
    for p in pages:
      key = self._key_of.pop(p, None)
      if key is None:
        continue
      del self._page_of[key]
      if p in self._lru:
        del self._lru[p]
        self._free.append(p)

  def reset_prefix_cache(self) -> None:
    """Forgets every evictable page's key; they become free. Pages still held keep theirs."""
    for page in self._lru:
      del self._page_of[self._key_of.pop(page)]
      self._free.append(page)
    self._lru.clear()

  # ------------------------------------------------------------------ changes
  def _take(self, n: int) -> list[int]:
    """`n` fresh pages, each with one reference: free ones first, then evicting the least recently used."""
    out = []
    for _ in range(n):
      if self._free:
        page = self._free.pop()
      else:
        page, _ = self._lru.popitem(last=False)
        del self._page_of[self._key_of.pop(page)]
      self._refs[page] = 1
      out.append(page)
    return out

  def allocate(self, seq, num_tokens: int, prefix: Sequence[int] = ()) -> bool:
    """Pages for a new sequence of `num_tokens`: the cached `prefix` (what `match` answered; each page gets a
    reference) then fresh pages. False, with nothing changed, if not enough pages can be freed up."""
    if seq in self._owned:
      raise ValueError(f"sequence {seq!r} already holds pages; free it first.")
    n = self.pages_for(num_tokens)
    if len(prefix) > n:
      raise ValueError(f"num_tokens={num_tokens} needs {n} pages, fewer than the {len(prefix)} prefix pages.")
    if prefix and not self.enable_prefix_caching:
      raise ValueError("a cached prefix was passed, but prefix caching is off.")
    if any(p not in self._key_of for p in prefix) or len(set(prefix)) != len(prefix):
      raise ValueError(f"prefix {list(prefix)} is not a run of cached pages; pass match()'s answer unchanged.")
    reclaimed = sum(1 for p in prefix if p in self._lru)  # evictable now, but about to be held
    if n - len(prefix) > self.num_free - reclaimed:
      return False
    for p in prefix:
      refs = self._refs.get(p, 0) + 1
      self._refs[p] = refs
      if refs == 1:
        del self._lru[p]
      elif refs == 2:
        self._num_shared += 1
    self._owned[seq] = list(prefix) + self._take(n - len(prefix))
    self._committed[seq] = (len(prefix), self._key_of[prefix[-1]] if prefix else _ROOT_KEY)
    return True

  def ensure(self, seq, num_tokens: int) -> bool:
    """Grows `seq` to hold `num_tokens`; False, with nothing changed, if the extra pages cannot be freed up."""
    owned = self._owned[seq]
    extra = self.pages_for(num_tokens) - len(owned)
    if extra > self.num_free:
      return False
    owned.extend(self._take(max(extra, 0)))
    return True

  def free(self, seq) -> None:
    """Drops `seq`'s references. A page nobody holds any more becomes evictable if registered, else free; the tail
    goes first, so the LRU evicts it before the head."""
    self._committed.pop(seq)
    for p in reversed(self._owned.pop(seq)):
      refs = self._refs[p] - 1
      if refs == 1:
        self._num_shared -= 1
      if refs:
        self._refs[p] = refs
        continue
      del self._refs[p]
      if p in self._key_of:
        self._lru[p] = None
      else:
        self._free.append(p)

  def check(self) -> None:
    """Asserts the accounting: every page but the scratch page is free, evictable or held, in one place only;
    reference counts equal the holders; keys and pages map to each other; evictable pages are registered."""
    holders = collections.Counter(p for ps in self._owned.values() for p in ps)
    assert holders == collections.Counter(self._refs), "page reference counts disagree with the holders"
    assert self._num_shared == sum(1 for r in self._refs.values() if r > 1), "shared-page count is stale"
    assert all(len(set(ps)) == len(ps) for ps in self._owned.values()), "a sequence holds a page twice"
    everything = sorted(list(holders) + self._free + list(self._lru))
    assert everything == list(range(1, self.num_pages)), (
        f"page accounting broken: {len(holders)} held + {len(self._free)} free + {len(self._lru)} evictable "
        f"!= {self.num_pages - 1} pages (duplicates or leaks)")
    assert len(self._page_of) == len(self._key_of), "keys and registered pages are not one to one"
    assert all(self._key_of.get(p) == k for k, p in self._page_of.items()), "a key's page maps to another key"
    assert all(p in self._key_of for p in self._lru), "an evictable page is not registered"
    assert SCRATCH_PAGE not in self._key_of, "the scratch page is registered"
    assert self._committed.keys() == self._owned.keys(), "commit progress kept for a sequence that holds nothing"
    assert all(done <= len(self._owned[s]) for s, (done, _) in self._committed.items()), "committed past the end"
    if not self.enable_prefix_caching:
      assert not self._key_of and not self._lru, "pages registered with prefix caching off"
