"""Long texts encoded in a child process: a server's multi-megabyte prompt never holds its GIL or its CPU share.

    proc = TokenizerProcess(hf_tokenizer.to_str(), nice=10)
    ids = proc.encode_batch([text])[0]            # int32 array, the ids `tokenizers` gives in-process
    proc.close()

Why a process (vLLM splits its API server from its engine for the same reason): `tokenizers` releases the GIL while
it encodes, but turning a 3.5 MB text's 2M ids into a Python list (`Encoding.ids`) holds it for ~60 ms in one call,
and freeing that list ~30 ms more; every engine step and every stream of a server waits those out. The child does
that work under its own GIL, at a lower CPU priority, and hands back the ids as int32 bytes over a pipe (the reads
release the GIL), so the server can check a prompt's length, or write `/tokenize`'s answer in slices, without ever
building the list.

The child is a plain `python -c` running `_CHILD` (only `tokenizers` and numpy: no jax, no jaxllm import), fed the
tokenizer's JSON once. Protocol (little-endian): request = u32 count, then per text u64 byte length + UTF-8 bytes;
answer = b"\\0" + count x u64 id counts + the int32 ids, or b"\\1" + u64 length + an error message. One request at a
time (a lock): concurrent long texts wait for each other, which also bounds the CPU hostile clients can take. A child
that died is started again by the next call; the child exits when its stdin closes (`close()`, or this process gone).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence

import numpy as np

_CHILD = r"""
import os, struct, sys
import numpy as np
from tokenizers import Tokenizer

inp, out = sys.stdin.buffer, sys.stdout.buffer

def read(n):
    data = inp.read(n)
    if len(data) < n:
        sys.exit(0)
    return data

nice, size = struct.unpack("<iQ", read(12))
if nice:
    os.nice(nice)
tok = Tokenizer.from_str(read(size).decode())
tok.no_truncation()
tok.no_padding()
while True:
    (count,) = struct.unpack("<I", read(4))
    texts = [read(struct.unpack("<Q", read(8))[0]) for _ in range(count)]
    try:
        encodings = tok.encode_batch_fast([t.decode() for t in texts], add_special_tokens=False)
        ids = [np.asarray(e.ids, np.int32) for e in encodings]
        del encodings
        out.write(b"\0" + struct.pack(f"<{count}Q", *(len(a) for a in ids)))
        for a in ids:
            out.write(a.tobytes())
    except Exception as e:
        message = f"{type(e).__name__}: {e}".encode()
        out.write(b"\1" + struct.pack("<Q", len(message)) + message)
    out.flush()
"""


class TokenizerProcessDied(RuntimeError):
  """The child ended in the middle of a request (killed, out of memory); the next request starts a new one."""


class TokenizerProcess:
  """A `tokenizers.Tokenizer` (given as its JSON, `to_str()`) encoding texts in a child process at `nice`."""

  def __init__(self, spec: str, nice: int = 0):
    self._spec = spec.encode()
    self._nice = int(nice)
    self._lock = threading.Lock()
    self._proc: subprocess.Popen | None = None
    with self._lock:
      self._start()

  def _start(self) -> None:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}  # the child's one thread does the work, at its priority
    self._proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  env=env)
    self._proc.stdin.write(struct.pack("<iQ", self._nice, len(self._spec)) + self._spec)
    self._proc.stdin.flush()

  @property
  def pid(self) -> int | None:
    return None if self._proc is None else self._proc.pid

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Each text's ids (int32 arrays), as `encode_batch_fast(texts, add_special_tokens=False)` gives them."""
    parts = [t.encode() for t in texts]  # a lone surrogate raises UnicodeEncodeError (a ValueError) here
    with self._lock:
      if self._proc is None or self._proc.poll() is not None:
        self._start()
      proc = self._proc
      try:
        proc.stdin.write(struct.pack("<I", len(parts)))
        for p in parts:
          proc.stdin.write(struct.pack("<Q", len(p)))
          proc.stdin.write(p)
        proc.stdin.flush()
        status = self._read(1)
        if status == b"\1":
          (size,) = struct.unpack("<Q", self._read(8))
          raise ValueError(f"the tokenizer could not encode the text: {self._read(size).decode()}")
        counts = struct.unpack(f"<{len(parts)}Q", self._read(8 * len(parts)))
        flat = np.frombuffer(self._read(4 * sum(counts)), np.int32)
      except (BrokenPipeError, EOFError) as e:
        proc.kill()
        self._proc = None
        raise TokenizerProcessDied(f"the tokenizer process (pid {proc.pid}) died: {e}") from None
    return np.split(flat, np.cumsum(counts)[:-1])

  def _read(self, n: int) -> bytes:
    data = self._proc.stdout.read(n)
    if len(data) < n:
      raise EOFError(f"it answered {len(data)} of {n} bytes")
    return data

  def close(self) -> None:
    with self._lock:
      if self._proc is not None:
        self._proc.stdin.close()
        try:
          self._proc.wait(5)
        except subprocess.TimeoutExpired:
          self._proc.kill()
        self._proc.stdout.close()
        self._proc = None
