"""One flag per `EngineConfig` field, for the commands that generate (serve, generate, chat): the name, default and
help text are the dataclass field's own, so a setting is defined once for the flags, `ServerConfig` and `LLM`.

    config = engine_flags.engine_config()     # in a command's main, after absl parsed the flags
"""

from __future__ import annotations

import dataclasses
import typing

from absl import flags

from jaxllm.serving.config import EngineConfig

_DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool, str: flags.DEFINE_string}


def _define_all() -> dict[str, flags.FlagHolder]:
  hints = typing.get_type_hints(EngineConfig)
  holders = {}
  for f in dataclasses.fields(EngineConfig):
    kind = next(t for t in (bool, int, float, str) if t in (typing.get_args(hints[f.name]) or (hints[f.name],)))
    holders[f.name] = _DEFINE[kind](f.name, f.default, f.metadata["help"])
  return holders


_FLAGS = _define_all()


def engine_config() -> EngineConfig:
  """The EngineConfig the command line asks for (raises ValueError naming a bad value)."""
  return EngineConfig(**{name: holder.value for name, holder in _FLAGS.items()})
