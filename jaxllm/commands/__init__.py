"""Subcommands of the `jaxllm` CLI (see `jaxllm.cli`)."""

import sys

from absl import flags


def parse_flags(argv):
  """absl flag parsing that reports a bad flag in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"{argv[0]}: {e}\nPass --help to see the flags.", file=sys.stderr)
    sys.exit(2)


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)
