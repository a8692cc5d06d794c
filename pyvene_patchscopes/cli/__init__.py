"""The `patchscopes` command line: inspect, run, sweep, demo, jacobian, presets, list, eval, explore.

`main` parses and runs one command line (`entry.py`); each command is a module of `commands/` that registers its
own subcommand; the option groups they share are in `options.py`, the path checks in `paths.py`, what they print
(and the keys of each --json object, `JSON_KEYS`) in `output.py`, and the closed-pipe handling in `streams.py`.
"""

from ..errors import SpecError
from ..spec.layers import LAYERS_HELP, parse_layers
from .commands.demo import DEMO_POSITION, DEMO_PROMPT
from .commands.run import load_spec
from .entry import CLOSED_PIPE_STATUS, ERROR_STATUS, build_parser, json_requested, main, version
from .options import UsageError
from .output import JSON_KEYS, JSON_SCHEMA_VERSION, layer_table

__all__ = [
    "main",
    "build_parser",
    "version",
    "parse_layers",
    "LAYERS_HELP",
    "json_requested",
    "load_spec",
    "layer_table",
    "DEMO_PROMPT",
    "DEMO_POSITION",
    "CLOSED_PIPE_STATUS",
    "ERROR_STATUS",
    "JSON_KEYS",
    "JSON_SCHEMA_VERSION",
    "UsageError",
    "SpecError",
]
