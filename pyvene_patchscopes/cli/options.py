"""The option groups commands share (model and device, source, layers, output), their argparse types, and the
model options read back: each help line names its default and its choices."""

from __future__ import annotations

import argparse
import re
from typing import Any

from ..core.plugins import PLUGIN_GROUP
from ..errors import PatchscopeError
from ..models import EMBEDDED, MAP_STRATEGIES
from ..presets import PRESETS
from ..spec.layers import LAYERS_HELP
from .output import json_help

DEFAULT_MODEL = "smollm2-135m"
DTYPES = "float32 (fp32), bfloat16 (bf16), float16 (fp16), auto"


class UsageError(PatchscopeError):
    """A command line that argparse could not read (unknown flag, missing value, bad number)."""

    def __init__(self, message: str, command: str | None = None):
        super().__init__(message)
        self.command = command  # the subcommand whose parser refused it; None for the top level


# ---- argparse types ---------------------------------------------------------------------------------
def parse_position(text: str) -> int | str:
    """An ASCII integer is a token index; anything else is a substring of the prompt."""
    return int(text) if re.fullmatch(r"-?[0-9]{1,9}", text.strip()) else text


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not re.fullmatch(r"\s*[0-9]{1,9}\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed (allowed: an integer >= 1)")
    return int(text)


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 for any free one."""
    if text.strip() == "0":
        return 0
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (allowed: 0..65535, 0 for any free port)")
    return value


# ---- the groups ---------------------------------------------------------------------------------------
def output_options(parser: argparse.ArgumentParser, command: str) -> None:
    """--json, with the keys of `command`'s object."""
    parser.add_argument("--json", action="store_true", help=json_help(command))


def model_options(
    parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL, shown: str = "%(default)s"
) -> None:
    """The model and where it runs: --model, --device, --dtype, --device-map, --offload-folder, --import."""
    group = parser.add_argument_group("model and device")
    group.add_argument(
        "--model",
        default=default,
        help=f"an embedded name ({', '.join(EMBEDDED)}), a Hugging Face id or a local folder (default: {shown})",
    )
    group.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, mps, or auto (each process's own GPU under accelerate launch) (default: cpu)",
    )
    group.add_argument(
        "--dtype",
        default=None,
        help=f"{DTYPES} (default: auto, the checkpoint's own, for hub ids and folders; float32 for embedded models)",
    )
    group.add_argument(
        "--device-map",
        default=None,
        help=f"split or offload the model: {', '.join(MAP_STRATEGIES)}"
        " (instead of --device) (default: none, all on --device)",
    )
    group.add_argument(
        "--offload-folder", default=None, help="with --device-map: where it offloads weights to disk (default: none)"
    )
    group.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first, for the mappings and interventions it registers (repeatable); "
        f"installed plugins (entry-point group {PLUGIN_GROUP}) are imported too (default: none)",
    )


def source_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The source S, i and the preset that reads it: --source-prompt, --source-position, --preset, --target-prompt,
    --max-new-tokens."""
    parser.add_argument(
        "--source-prompt",
        required=required,
        help="S: the prompt whose hidden states are read (required)"
        if required
        else "S: the prompt whose hidden states are read (default: none; give it or --prompts)",
    )
    parser.add_argument(
        "--source-position",
        default="-1",
        help="i: a token index or a substring of the prompt (default: %(default)s, the last token)",
    )
    parser.add_argument(
        "--preset",
        default="token-identity",
        help=f"the Patchscope: {', '.join(PRESETS)} (default: %(default)s; see: patchscopes presets)",
    )
    parser.add_argument(
        "--target-prompt", default=None, help="T: replaces the preset's target prompt (default: the preset's own)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens generated greedily after the patched prompt (default: the preset's own, as in "
        "Python: token-identity 4, logit-lens 0, future-lens 3, attribute 20; 0: the next token "
        "only, faster)",
    )


def layers_option(
    parser: argparse.ArgumentParser, flag: str, default: str | None, what: str, shown: str = "%(default)s"
) -> None:
    """A layer list, read by `spec.layers.parse_layers`."""
    parser.add_argument(flag, default=default, help=f"{what}: {LAYERS_HELP} (default: {shown})")


def verify_option(parser: argparse.ArgumentParser) -> None:
    """--verify: each row's reading put back against control words (`verify`, default `VerifySettings()`)."""
    parser.add_argument(
        "--verify",
        action="store_true",
        help="test each reading by putting it back where it was read, against 32 control words (verify, on the "
        "source model), and print its verdict: supported, not supported or cannot tell; --json adds the verify "
        "columns (default: off)",
    )


# ---- the model options, read ------------------------------------------------------------------------
def device(args: argparse.Namespace) -> str:
    """--device, with 'auto' meaning this process's own GPU under accelerate launch, else the CPU."""
    from ..execution.distributed import device as own_device

    return own_device() if args.device == "auto" else args.device or "cpu"


def placement(args: argparse.Namespace) -> dict[str, Any]:
    """load_model's device options: --device, or --device-map (with --offload-folder)."""
    if getattr(args, "device_map", None) is None:
        return {"device": device(args)}
    return {"device_map": args.device_map, "offload_folder": getattr(args, "offload_folder", None)}


def load(args: argparse.Namespace):
    """The model of --model, placed and typed as the options say."""
    from ..models import load_model

    return load_model(args.model, dtype=args.dtype, **placement(args))


def check_model_options(args: argparse.Namespace) -> None:
    """--model, --device, --dtype and --device-map checked before anything slow happens (`load_model` checks them
    too, but a command may write or load something else first)."""
    from ..models import check_device, check_device_map, model_source, resolve_dtype

    if getattr(args, "model", None) is not None:
        model_source(args.model)
    if getattr(args, "device", None) not in (None, "auto"):
        check_device(args.device)
    resolve_dtype(getattr(args, "dtype", None), auto=True)
    if getattr(args, "device_map", None) is not None:
        check_device_map(args.device_map)


__all__ = [
    "DEFAULT_MODEL",
    "UsageError",
    "parse_position",
    "positive_int",
    "port_number",
    "output_options",
    "model_options",
    "source_options",
    "layers_option",
    "device",
    "placement",
    "load",
    "check_model_options",
    "verify_option",
]
