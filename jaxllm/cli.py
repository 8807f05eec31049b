"""The `jaxllm` command: `jaxllm SUBCOMMAND --flag=value ...`.

Each subcommand is a module of `jaxllm.commands` with its own absl flags and `main(argv)`; only the chosen one is
imported, so flags never collide across subcommands. `jaxllm SUBCOMMAND --help` lists its flags.
"""

import importlib
import sys

COMMANDS = {
    "generate": "Generate text from a prompt (or chat with --chat).",
    "chat": "Interactive chat on a terminal; one --prompt otherwise.",
    "convert": "Convert a GGUF / HF checkpoint to jaxllm's orbax format for fast reloads.",
    "serve": "OpenAI-compatible HTTP server (completions, chat, streaming, metrics).",
    "score": "Batch scoring: log-likelihoods / perplexities of a JSONL or ArrayRecord dataset (resumable).",
    "plan": "Capacity plan: weight / KV bytes per device and per-layer collectives for a model on a mesh.",
}


def _usage() -> str:
  lines = ["usage: jaxllm SUBCOMMAND [--flags]", "", "subcommands:"]
  lines += [f"  {name:<10} {doc}" for name, doc in COMMANDS.items()]
  return "\n".join(lines)


def _command_help(name: str, module) -> str:
  """The subcommand's docstring and its flags (its own and the shared engine and device flags), which absl's --help would leave
  out: they are not defined in the program's main module."""
  from absl import flags

  text = [f"usage: jaxllm {name} [--flags]", "", (module.__doc__ or "").strip(), ""]
  shared = ("jaxllm.commands.engine_flags", "jaxllm.commands.device_flags")  # if the command uses them
  for mod in (module, *(sys.modules.get(m) for m in shared)):
    if mod is not None:
      text += [flags.FLAGS.module_help(mod), ""]
  return "\n".join(text).rstrip()


def run() -> None:
  if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
    print(_usage())
    sys.exit(0 if len(sys.argv) >= 2 else 2)
  name = sys.argv[1]
  if name not in COMMANDS:
    print(f"jaxllm: unknown subcommand {name!r}.\n\n{_usage()}", file=sys.stderr)
    sys.exit(2)
  import logging

  from absl import app

  # jax logs at INFO which accelerator plugins it could not find; that is noise on a CPU or GPU host.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  from jaxllm.commands import parse_flags

  module = importlib.import_module(f"jaxllm.commands.{name}")
  if any(a in ("-h", "--help", "--helpshort") for a in sys.argv[2:]):
    print(_command_help(name, module))
    sys.exit(0)
  app.run(module.main, argv=[f"jaxllm {name}"] + sys.argv[2:], flags_parser=parse_flags)


if __name__ == "__main__":
  run()
