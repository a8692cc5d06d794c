"""The commands, one module each: `register(commands)` adds its subcommand (options, help lines, an example) and
sets `execute(args)` to run it."""

from . import (
    demo,
    eval as eval_command,
    explore,
    families,
    inspect,
    jacobian,
    list as list_command,
    presets,
    run,
    sweep,
)

# In the order `patchscopes --help` lists them.
COMMANDS = (inspect, run, sweep, demo, jacobian, eval_command, list_command, presets, families, explore)

__all__ = ["COMMANDS"]
