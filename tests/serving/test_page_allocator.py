"""The page allocator's prefix cache: hits, the one-token cap, commit, duplicates, LRU eviction (tails first), failed
calls that change nothing, shared holders, caching off, counters, and a randomized soak that simulates the device:
every page's written tokens are tracked, so a cache hit is checked against what the page really holds, not against
the allocator's own bookkeeping. Page keys are checked against blake2b computed here from the definition."""

import copy
import hashlib
import random

import numpy as np
import pytest

from jaxllm.serving.page_allocator import SCRATCH_PAGE, PageAllocator, page_hashes

C = 4  # page size


def snapshot(alloc: PageAllocator) -> dict:
  """Everything the allocator holds, LRU order included (OrderedDict equality is ordered)."""
  return copy.deepcopy(vars(alloc))


def run(alloc, seq, tokens, prefix=()):
  """A request that computes all of `tokens` at once after its cached prefix: allocate, then commit."""
  assert alloc.allocate(seq, len(tokens), prefix)
  alloc.commit(seq, tokens, len(tokens))
  alloc.check()


def toks(start, n):
  return list(range(start, start + n))


# ---------------------------------------------------------------------------------------------------------- hashing
def test_page_hashes_match_the_definition():
  t = toks(1, 10)  # two full pages and a partial one
  k0 = hashlib.blake2b(np.array(t[:4], "<i4").tobytes(), digest_size=16).digest()
  k1 = hashlib.blake2b(k0 + np.array(t[4:8], "<i4").tobytes(), digest_size=16).digest()
  assert page_hashes(t, C) == [k0, k1]
  assert page_hashes(t, C, num_pages=1) == [k0]
  assert page_hashes(np.array(t, np.int64), C) == [k0, k1]  # arrays and lists hash alike
  assert page_hashes(t[4:], C, parent=k0) == [k1]  # continuing a chain from a saved key
  assert page_hashes(t[:3], C) == []


def test_long_runs_hash_like_page_by_page():
  """Past the first conversion block (pages are converted to bytes a block at a time), from any starting page."""
  rng = np.random.default_rng(0)
  t = rng.integers(0, 2**31 - 1, 137 * C + 3).tolist()
  want, key = [], b""
  for j in range(137):
    key = hashlib.blake2b(key + np.array(t[j * C:(j + 1) * C], "<i4").tobytes(), digest_size=16).digest()
    want.append(key)
  assert page_hashes(t, C) == want
  assert page_hashes(t[50 * C:], C, num_pages=70, parent=want[49]) == want[50:120]
  alloc = PageAllocator(num_pages=200, page_size=C)
  assert alloc.allocate("a", len(t))
  for n in (3 * C, 21 * C + 1, 90 * C, len(t)):  # commits that start and end inside conversion blocks
    alloc.commit("a", t, n)
  assert alloc.match(t) == alloc.pages("a")[:137]
  assert alloc.match(t[:77 * C] + [0]) == alloc.pages("a")[:77]
  alloc.check()


def test_hash_chain_depends_on_every_earlier_page():
  same_tail = [7, 7, 7, 7]
  a = page_hashes([1, 2, 3, 4] + same_tail, C)
  b = page_hashes([1, 2, 3, 5] + same_tail, C)
  assert a[0] != b[0] and a[1] != b[1]
  assert page_hashes(same_tail, C)[0] != a[1]  # the same page at the start is a different prefix too
  assert page_hashes([1, 2, 3, 4] + same_tail, C) == a  # and deterministic


def test_a_page_with_the_same_tokens_after_a_different_start_is_not_a_hit():
  alloc = PageAllocator(num_pages=16, page_size=C)
  run(alloc, "a", [1, 2, 3, 4] + [9, 9, 9, 9] + [0])
  assert alloc.match([5, 6, 7, 8] + [9, 9, 9, 9] + [0]) == []


# ---------------------------------------------------------------------------------------------------------- hits
def test_two_prompts_sharing_three_full_pages_share_them():
  alloc = PageAllocator(num_pages=32, page_size=C)
  shared = toks(100, 3 * C)
  a, b = shared + [1, 2], shared + [3, 4, 5, 6, 7]
  assert alloc.match(a) == []
  run(alloc, "a", a)
  prefix = alloc.match(b)
  assert prefix == alloc.pages("a")[:3]
  run(alloc, "b", b, prefix)
  assert alloc.pages("b")[:3] == alloc.pages("a")[:3]
  assert not set(alloc.pages("b")[3:]) & set(alloc.pages("a"))  # the tails are their own
  assert alloc.num_shared() == 3
  assert alloc.match(toks(100, C) + [0, 0, 0, 0, 0]) == alloc.pages("a")[:1]  # a shorter shared prefix
  assert alloc.match([0] + shared) == []


def test_match_leaves_the_last_token_to_compute():
  alloc = PageAllocator(num_pages=32, page_size=C)
  prompt = toks(10, 3 * C)  # exactly three full pages
  run(alloc, "a", prompt)
  assert len(alloc.match(prompt)) == 2  # (12 - 1) // 4
  assert len(alloc.match(prompt + [0])) == 3
  assert len(alloc.match(prompt[:C + 1])) == 1
  assert alloc.match(prompt[:C]) == []
  assert alloc.match(prompt[:1]) == [] and alloc.match([]) == []


def test_match_takes_no_references():
  alloc = PageAllocator(num_pages=32, page_size=C)
  run(alloc, "a", toks(0, 9))
  alloc.free("a")
  before = alloc.num_free, alloc.num_cached
  assert len(alloc.match(toks(0, 9))) == 2
  assert (alloc.num_free, alloc.num_cached) == before == (31, 2)
  alloc.check()


# ---------------------------------------------------------------------------------------------------------- commit
def test_commit_registers_only_computed_full_pages_and_is_idempotent():
  alloc = PageAllocator(num_pages=32, page_size=C)
  t = toks(0, 11)
  assert alloc.allocate("a", len(t))
  alloc.commit("a", t, num_computed=3)  # nothing full yet
  assert alloc.match(t) == []
  alloc.commit("a", t, num_computed=6)  # page 0
  assert alloc.match(t) == alloc.pages("a")[:1]
  alloc.commit("a", t[:7], num_computed=11)  # only 7 tokens known: still page 0 only
  assert alloc.match(t) == alloc.pages("a")[:1]
  alloc.commit("a", t, num_computed=11)
  assert alloc.match(t) == alloc.pages("a")[:2]
  before = snapshot(alloc)
  alloc.commit("a", t, num_computed=11)
  alloc.commit("a", t, num_computed=5)
  assert snapshot(alloc) == before
  alloc.check()


def test_commit_in_steps_equals_commit_at_once():
  t = toks(50, 30)
  steps, once = PageAllocator(num_pages=16, page_size=C), PageAllocator(num_pages=16, page_size=C)
  assert steps.allocate("a", len(t)) and once.allocate("a", len(t))
  for n in (1, 4, 5, 13, 13, 22, 30):
    steps.commit("a", t[:n + 2], n)
  once.commit("a", t, 30)
  assert snapshot(steps) == snapshot(once)


def test_commit_continues_the_chain_after_a_cached_prefix():
  alloc = PageAllocator(num_pages=32, page_size=C)
  run(alloc, "a", toks(0, 9))
  b = toks(0, 8) + toks(200, 9)
  prefix = alloc.match(b)
  assert len(prefix) == 2
  run(alloc, "b", b, prefix)
  c = b[:16] + [1]
  assert alloc.match(c) == alloc.pages("b")[:4]


def test_the_same_prefix_computed_twice_keeps_the_first_page_registered():
  alloc = PageAllocator(num_pages=32, page_size=C)
  t = toks(0, 9)
  assert alloc.allocate("a", len(t)) and alloc.allocate("b", len(t))  # both before either commits
  alloc.commit("a", t, len(t))
  alloc.commit("b", t, len(t))
  alloc.check()
  assert alloc.match(t) == alloc.pages("a")[:2]
  assert alloc.num_shared() == 0
  alloc.free("b")  # b's copies were never registered: they are plain free pages
  assert alloc.num_cached == 0 and alloc.num_free == 31 - 3
  alloc.free("a")
  assert alloc.num_cached == 2 and alloc.num_free == 31
  alloc.check()


# ---------------------------------------------------------------------------------------------------------- eviction
def test_eviction_is_lru_tails_first_and_drops_the_hashes():
  alloc = PageAllocator(num_pages=7, page_size=C)  # 6 pages
  a = toks(0, 3 * C + 1)
  run(alloc, "a", a)  # 3 registered pages + 1 for the last token
  alloc.free("a")
  assert alloc.num_cached == 3 and alloc.num_free == 6
  assert alloc.allocate("b", 4 * C)  # the 3 free pages, then 1 evicted: a's tail
  alloc.check()
  assert alloc.num_cached == 2 and len(alloc.match(a)) == 2
  alloc.commit("b", toks(500, 4 * C), 4 * C)  # b writes over the evicted page: a's old key must not find it
  assert len(alloc.match(a)) == 2
  assert alloc.ensure("b", 5 * C)
  assert len(alloc.match(a)) == 1  # the middle page went next
  assert alloc.ensure("b", 6 * C)
  assert alloc.match(a) == [] and alloc.num_cached == 0 and alloc.num_free == 0
  assert not alloc.ensure("b", 7 * C)
  alloc.check()


def test_eviction_order_across_sequences_and_reuse_refreshes():
  alloc = PageAllocator(num_pages=9, page_size=C)  # 8 pages
  a, b = toks(0, 2 * C + 1), toks(100, 2 * C + 1)
  run(alloc, "a", a)
  run(alloc, "b", b)
  alloc.free("a")  # a's pages are older than b's
  alloc.free("b")
  hit = alloc.match(a)
  run(alloc, "a2", a, hit)  # a used again: its pages leave the LRU ...
  alloc.free("a2")  # ... and come back as the most recent
  assert alloc.num_cached == 4 and alloc.num_free == 8
  assert alloc.allocate("x", 5 * C)  # 4 free + 1 evicted: b's tail, the least recently used
  assert len(alloc.match(b)) == 1 and len(alloc.match(a)) == 2
  assert alloc.ensure("x", 6 * C)
  assert alloc.match(b) == [] and len(alloc.match(a)) == 2
  assert alloc.ensure("x", 7 * C)
  assert len(alloc.match(a)) == 1  # then a's tail, then a's head
  alloc.check()


def test_reset_prefix_cache_frees_unreferenced_pages_only():
  alloc = PageAllocator(num_pages=32, page_size=C)
  a, b = toks(0, 9), toks(100, 9)
  run(alloc, "a", a)
  run(alloc, "b", b)
  alloc.free("a")
  alloc.reset_prefix_cache()
  alloc.check()
  assert alloc.num_cached == 0 and alloc.num_free == 31 - 3
  assert alloc.match(a) == [] and len(alloc.match(b)) == 2


def test_forget_unregisters_what_a_failed_step_committed():
  """commit answers the pages it registered; forget drops their keys (a freed one becomes free, not evictable) and
  leaves earlier registrations alone."""
  alloc = PageAllocator(num_pages=32, page_size=C)
  t = toks(0, 13)
  assert alloc.allocate("a", len(t))
  assert alloc.commit("a", t, num_computed=5) == alloc.pages("a")[:1]  # an earlier step's page
  registered = alloc.commit("a", t, num_computed=13)  # the failed step's
  assert registered == alloc.pages("a")[1:3] and alloc.commit("a", t, num_computed=13) == []
  alloc.free("a")
  assert alloc.num_cached == 3
  alloc.forget(registered)
  alloc.check()
  assert alloc.num_cached == 1 and alloc.num_free == 31 and len(alloc.match(t)) == 1


# ---------------------------------------------------------------------------------------------------------- failures
def test_failed_allocate_changes_nothing_and_does_not_evict_its_own_prefix():
  alloc = PageAllocator(num_pages=5, page_size=C)  # 4 pages
  a = toks(0, 2 * C + 1)
  run(alloc, "a", a)
  alloc.free("a")  # 2 evictable, 2 free
  b = a[:2 * C] + toks(300, 9)
  prefix = alloc.match(b)
  assert len(prefix) == 2 and alloc.num_free == 4
  before = snapshot(alloc)
  assert not alloc.allocate("b", 5 * C, prefix)  # 3 fresh pages, but only 2 are not its own prefix
  assert snapshot(alloc) == before
  assert not alloc.allocate("c", 5 * C)
  assert snapshot(alloc) == before
  assert alloc.allocate("b", 4 * C, prefix)
  alloc.check()
  assert alloc.pages("b")[:2] == prefix and alloc.num_free == 0
  before = snapshot(alloc)
  assert not alloc.ensure("b", 4 * C + 1)
  assert snapshot(alloc) == before


def test_bad_arguments_raise():
  alloc = PageAllocator(num_pages=16, page_size=C)
  run(alloc, "a", toks(0, 9))
  with pytest.raises(ValueError, match="already holds"):
    alloc.allocate("a", 4)
  with pytest.raises(ValueError, match="not a run of cached pages"):
    alloc.allocate("b", 12, [alloc.pages("a")[2]])  # the unregistered last page
  with pytest.raises(ValueError, match="fewer than the 2 prefix pages"):
    alloc.allocate("b", 4, alloc.pages("a")[:2])
  with pytest.raises(ValueError, match="num_pages=1"):
    PageAllocator(num_pages=1, page_size=C)
  with pytest.raises(ValueError, match="page_size=0"):
    PageAllocator(num_pages=8, page_size=0)
  alloc.check()


# ---------------------------------------------------------------------------------------------------------- sharing
def test_refcounts_with_several_holders_of_one_prefix():
  alloc = PageAllocator(num_pages=32, page_size=C)
  shared = toks(0, 2 * C)
  run(alloc, "s0", shared + [1])
  for i in range(1, 4):
    prefix = alloc.match(shared + [i, i])
    assert prefix == alloc.pages("s0")[:2]
    run(alloc, f"s{i}", shared + [i, i], prefix)
  assert alloc.num_shared() == 2 and alloc.num_free == 31 - 2 - 4
  for i in range(3):
    alloc.free(f"s{i}")
    alloc.check()
    assert alloc.num_cached == 0  # still held by someone
  assert alloc.num_shared() == 0 and alloc.pages("s3")[:2] == alloc.match(shared + [0])
  alloc.free("s3")
  assert alloc.num_cached == 2 and alloc.num_free == 31
  alloc.check()


# ---------------------------------------------------------------------------------------------------------- off
def test_caching_off_is_a_plain_allocator():
  alloc = PageAllocator(num_pages=8, page_size=C, enable_prefix_caching=False)
  t = toks(0, 9)
  run(alloc, "a", t)
  assert alloc.pages("a") == [1, 2, 3]  # low ids first
  assert alloc.match(t + [0]) == []
  run(alloc, "b", t)
  assert alloc.num_shared() == 0 and not set(alloc.pages("a")) & set(alloc.pages("b"))
  alloc.free("a")
  assert alloc.num_cached == 0 and alloc.num_free == 4
  assert alloc.allocate("c", 4) and alloc.pages("c") == [1]  # most recently freed first: the head
  with pytest.raises(ValueError, match="caching is off"):
    alloc.allocate("d", 12, [2])
  alloc.free("b")
  alloc.free("c")
  alloc.check()
  assert alloc.num_free == alloc.capacity == 7


# ---------------------------------------------------------------------------------------------------------- soak
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soak_against_a_simulated_device(seed):
  """Random requests over a small pool, built from a few shared stems so prefixes repeat, with chunked prefill,
  decode, growth, frees and the odd cache reset. The test keeps its own copy of every page's contents (what the
  device would hold); every hit must hold exactly the tokens asked for, and no write may land in a page another
  sequence holds."""
  rng = random.Random(seed)
  alloc = PageAllocator(num_pages=40, page_size=C)
  stems = [[rng.randrange(50) for _ in range(rng.randrange(4, 30))] for _ in range(4)]
  device: dict[int, list] = {}  # page -> its C token slots as written
  live: dict[str, dict] = {}  # seq -> {"tokens": all known tokens, "computed": how many are in the KV cache}
  hits = 0

  def write(seq, lo, hi):
    s, pages = live[seq], alloc.pages(seq)
    for pos in range(lo, hi):
      page = pages[pos // C]
      assert page != SCRATCH_PAGE
      assert not any(page in alloc.pages(o) for o in live if o != seq), "write into a shared page"
      device.setdefault(page, [None] * C)[pos % C] = s["tokens"][pos]
    s["computed"] = hi
    alloc.commit(seq, s["tokens"], hi)

  for step in range(4000):
    op = rng.random()
    if op < 0.35 or not live:  # a new request
      stem = rng.choice(stems)
      prompt = stem[:rng.randrange(len(stem) + 1)] + [rng.randrange(50) for _ in range(rng.randrange(1, 12))]
      prefix = alloc.match(prompt)
      for j, page in enumerate(prefix):
        assert device[page] == prompt[j * C:(j + 1) * C], "a cache hit holds other tokens"
      hits += len(prefix)
      done = len(prefix) * C
      chunk = rng.randrange(1, len(prompt) - done + 1)
      before = snapshot(alloc)
      seq = f"r{step}"
      if alloc.allocate(seq, done + chunk, prefix):
        live[seq] = {"tokens": prompt, "computed": done}
        write(seq, done, done + chunk)
      else:
        assert snapshot(alloc) == before
    elif op < 0.8:  # a step of a live sequence: the next prefill chunk, or one decode token
      seq = rng.choice(list(live))
      s = live[seq]
      if s["computed"] == len(s["tokens"]):
        s["tokens"] = s["tokens"] + [rng.randrange(50)]
      hi = min(len(s["tokens"]), s["computed"] + rng.randrange(1, 9))
      before = snapshot(alloc)
      if alloc.ensure(seq, hi):
        write(seq, s["computed"], hi)
      else:
        assert snapshot(alloc) == before
        alloc.free(seq)  # preempted
        del live[seq]
    elif op < 0.995:
      seq = rng.choice(list(live))
      alloc.free(seq)
      del live[seq]
    else:
      alloc.reset_prefix_cache()
    alloc.check()
    assert alloc.num_free + sum(1 for _ in {p for s in live for p in alloc.pages(s)}) == alloc.capacity

  assert hits > 100
  for seq in list(live):
    alloc.free(seq)
  alloc.check()
  assert alloc.num_free == alloc.capacity and alloc.num_shared() == 0
  alloc.reset_prefix_cache()
  assert alloc.num_cached == 0 and alloc.num_free == alloc.capacity
  alloc.check()
