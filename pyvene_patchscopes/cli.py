"""The `patchscopes` command line: inspect, run, sweep, demo, jacobian, presets, list, eval, explore."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from .errors import PatchscopeError, SpecError, UninformativeScopeWarning
from .core.files import expand, is_dir, is_file, not_a_file
from .core.outputs import FIGURE_FORMATS, INPUT, check_apart, check_file, check_folder, finite, refuse_special
from .core.plugins import PLUGIN_GROUP, import_module, load_plugins
from .result import show_text
from .spec import Patchscope

JSON_SCHEMA_VERSION = 1
CLOSED_PIPE_STATUS = 141  # 128 + SIGPIPE (13): what a shell reports for a tool that a closed pipe ended
ERROR_STATUS = 2
DEMO_PROMPT = "Amazon's former CEO attended Oscars"
DEMO_POSITION = "CEO"
DEMO_HEATMAP = "demo_heatmap.png"  # what `demo` writes into its --out folder
# The options that name what a command reads, as (attribute, flag): each is a path only where it exists.
INPUT_OPTIONS = (("spec", "spec"), ("prompts", "--prompts"), ("data", "--data"), ("lens", "--lens"),
                 ("adapter", "--adapter"), ("model", "--model"), ("target_model", "--target-model"))


LAYERS_HELP = "all, 5, 0-29, 0,3,6, 0-29:3 (every 3rd); negative layers count from the end"
_LAYER_PART = re.compile(r"^\s*(-?[0-9]{1,6})\s*(?:-\s*(-?[0-9]{1,6})\s*(?::\s*([0-9]{1,6})\s*)?)?$")


class UsageError(PatchscopeError):
    """A command line that argparse could not read (unknown flag, missing value, bad number)."""

    def __init__(self, message: str, command: str | None = None):
        super().__init__(message)
        self.command = command  # the subcommand whose parser refused it; None for the top level


def parse_layers(text: str | None, n_layers: int, flag: str = "--layers") -> list[int]:
    """'all', '5', '0-29', '0,3,6' or '0-12:3' (every 3rd) -> layer indices, each checked against n_layers.

    Single layers keep their sign (-1 stays -1); a range's ends may be negative and are counted from the end.
    Every value is checked before any list is built, so a huge range costs nothing.
    """
    if text is None or text.strip() == "all":
        return list(range(n_layers))
    layers: list[int] = []
    for part in text.split(","):
        match = _LAYER_PART.match(part)
        if match is None:
            raise SpecError(f"{flag}={text!r}: {part!r} is not a layer or a range (allowed: {LAYERS_HELP})")
        lo, hi, step = (None if g is None else int(g) for g in match.groups())
        for value in (lo, hi):
            if value is not None and not -n_layers <= value < n_layers:
                raise SpecError(f"{flag}={text!r}: layer {value} is out of range (allowed: "
                                f"{-n_layers}..{n_layers - 1})")
        if hi is None:
            layers.append(lo)
            continue
        lo, hi = lo % n_layers, hi % n_layers
        if lo > hi or step == 0:
            raise SpecError(f"{flag}={text!r}: {part.strip()!r} is an empty range (allowed: start <= end and a "
                            "step >= 1)")
        layers.extend(range(lo, hi + 1, step or 1))
    return layers


def parse_position(text: str) -> int | str:
    """An ASCII integer is a token index; anything else is a substring of the prompt."""
    return int(text) if re.fullmatch(r"-?[0-9]{1,9}", text.strip()) else text


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not re.fullmatch(r"\s*[0-9]{1,9}\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed (allowed: an integer >= 1)")
    return int(text)


def paths_of(args: argparse.Namespace) -> list[tuple[str, str | Path, str]]:
    """Every path this command line names, as (flag, path, role) for `outputs.check_apart`: what it reads (`INPUT`:
    an existing file or folder; a hub id, a catalogue name or a missing file is no path here, and its reader
    refuses it), the files it writes ("file") and the folders it writes into ("folder"). A sweep reads its --out
    folder, all of it, as well as writing there: a rerun resumes from what is in it."""
    paths: list[tuple[str, str | Path, str]] = []
    for attr, flag in INPUT_OPTIONS:
        value = getattr(args, attr, None)
        if isinstance(value, str) and _exists(value) and (attr != "spec" or _names_a_path(value)):
            paths.append((flag, value, INPUT))
    out = getattr(args, "out", None)
    if args.command == "sweep" and out is not None:
        paths.append(("--out", out, INPUT))
    paths += [(flag, path, "file") for flag, path in output_files(args)]
    for flag, folder in (("--out", out if args.command in ("sweep", "eval") else None),
                         ("--offload-folder", getattr(args, "offload_folder", None))):
        if folder is not None:
            paths.append((flag, folder, "folder"))
    return paths


def output_files(args: argparse.Namespace) -> list[tuple[str, str | Path]]:
    """The files this command line writes, as (flag, file)."""
    files = [(flag, getattr(args, attr)) for flag, attr in (("--plot", "plot"), ("--html", "html"))
             if getattr(args, attr, None) is not None]
    if args.command == "demo":
        files.append(("--out", Path(args.out) / DEMO_HEATMAP))
    if args.command == "jacobian" and args.out:
        files += [("--out", path) for path in output_paths(args.out)]
    return files


def _exists(value: str) -> bool:
    try:
        return os.path.lexists(os.path.expanduser(value))
    except (OSError, ValueError):
        return False


def _names_a_path(spec: str) -> bool:
    from .persist import looks_like_path

    return looks_like_path(spec)


def check_options(args: argparse.Namespace) -> None:
    """Before any work, for every command: that no output is, holds or lies inside another path of the command
    line (`outputs.check_apart`), and that the placement flags agree."""
    check_apart(paths_of(args))
    check_placement(args)


def check_placement(args: argparse.Namespace) -> None:
    """--device and --device-map place the model two ways: one of them; --offload-folder only with --device-map."""
    device, device_map = getattr(args, "device", None), getattr(args, "device_map", None)
    if device is not None and device_map is not None:
        raise UsageError(f"--device={device!r} and --device-map={device_map!r} are both given (allowed: one of them: "
                         "--device for one device, --device-map to split or offload the model)")
    offload = getattr(args, "offload_folder", None)
    if offload is not None and device_map is None:
        raise UsageError(f"--offload-folder={offload!r} is given without --device-map, so nothing would be offloaded "
                         "(allowed: --offload-folder beside --device-map)")


def check_outputs(args: argparse.Namespace, files: dict[str, str | None], figures: Sequence[str] = ()) -> dict[str, Path]:
    """Every output file of the command, checked before any work (see `outputs.check_file`): flag -> path.

    `figures` are the flags whose file matplotlib writes; their suffix must name a format it can write. How the
    outputs lie to the inputs and to each other `check_options` has checked already.
    """
    return {flag: check_file(value, flag, FIGURE_FORMATS if flag in figures else None)
            for flag, value in files.items() if value is not None}


def _device(args: argparse.Namespace) -> str:
    """--device, with 'auto' meaning this process's own GPU under accelerate launch, else the CPU."""
    from .execution.distributed import device

    return device() if args.device == "auto" else args.device or "cpu"


def _placement(args: argparse.Namespace) -> dict[str, Any]:
    """load_model's device options: --device, or --device-map (with --offload-folder)."""
    if getattr(args, "device_map", None) is None:
        return {"device": _device(args)}
    return {"device_map": args.device_map, "offload_folder": getattr(args, "offload_folder", None)}


def _load(args: argparse.Namespace):
    from .models import load_model

    return load_model(args.model, dtype=args.dtype, **_placement(args))


def _check_model_options(args: argparse.Namespace) -> None:
    """--model, --device, --dtype and --device-map checked before anything slow happens (`load_model` checks them
    too, but a command may write or load something else first)."""
    from .models import check_device, check_device_map, model_source, resolve_dtype

    if getattr(args, "model", None) is not None:
        model_source(args.model)
    if getattr(args, "device", None) not in (None, "auto"):
        check_device(args.device)
    resolve_dtype(getattr(args, "dtype", None), auto=True)
    if getattr(args, "device_map", None) is not None:
        check_device_map(args.device_map)


class ClosedPipe(BaseException):
    """Standard output or error is a pipe whose reader has gone (`| head`). A BaseException, as KeyboardInterrupt
    is, so that no ``except OSError`` or ``except Exception`` on the way (a model loader under its progress bar, a
    dataset reader, a logging handler) takes it for a failure of its own; `main` ends quietly on it."""


class _Stream:
    """A standard stream, as `main` hands it to the command: every way to write to it (`write`, `writelines`,
    `flush`, and the same on its `buffer`) turns a closed pipe into `ClosedPipe`, in whichever thread writes.

    Once the pipe has closed, every later write raises it too, so the main thread learns of it at its next write
    even where another thread met it first. `on_close` says what a closed pipe does: "raise" (a command: it ends),
    "drop" (a server's log: the lines are dropped and it keeps serving), or None once `main` has returned (a
    library that kept the stream, a logging handler, then writes to the stream itself).
    """

    def __init__(self, stream: Any, owner: "_Stream | None" = None):
        self._stream = stream
        self._owner = owner or self  # a `buffer` shares its text stream's state
        self.closed_pipe = False
        self.on_close: str | None = "raise"

    def _guard(self, method: Any, *args: Any, dropped: Any = None) -> Any:
        owner = self._owner
        if owner.on_close is None:
            return method(*args)
        if not owner.closed_pipe:
            try:
                return method(*args)
            except BrokenPipeError:
                owner.closed_pipe = True
        if owner.on_close == "drop":
            return dropped
        raise ClosedPipe

    def write(self, text: Any) -> int:
        return self._guard(self._stream.write, text, dropped=len(text))

    def writelines(self, lines: Any) -> None:
        self._guard(self._stream.writelines, lines)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def release(self) -> None:
        """Hand the stream back (`main` returns): flush what is left, and point it at /dev/null if its pipe has
        closed, here or before, and only then: standard error may still carry a later error."""
        self.on_close = "drop"
        try:
            self.flush()
        except (OSError, ValueError):  # a full disk, a closed file: the interpreter's own final flush says so
            pass
        self.on_close = None
        if self.closed_pipe:
            _silence(self._stream)

    @property
    def buffer(self) -> "_Stream":
        return _Stream(self._stream.buffer, self._owner)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding: the stream's own
        return getattr(self._stream, name)


def _emit(args: argparse.Namespace, payload: dict[str, Any], table: str) -> None:
    """Print the command's output: `table` for people, or with --json one object, `schema` and `command` (the
    subcommand's name) followed by `payload`.

    A closed pipe raises `ClosedPipe` (see `main`); any other failure to write (a full disk) is the one-line error.
    """
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch, the main process speaks for all
        return
    text = json.dumps(finite({"schema": JSON_SCHEMA_VERSION, "command": args.command, **payload}), indent=2,
                      allow_nan=False) if args.json else table
    try:
        print(text, flush=True)
    except OSError as err:  # say so once, and let nothing flush again at exit
        _silence(sys.stdout)
        raise PatchscopeError(f"cannot write the output to standard output ({err.strerror or type(err).__name__})") \
            from None


def _silence(stream: Any) -> None:
    """Point the stream's file at /dev/null, so that the interpreter's final flush cannot fail (it would print
    "Exception ignored" and turn the exit status into 120)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture): nothing to silence
        pass


NO_INFORMATION_NOTE = ("* l* = the last layer, patched before the target's last position: no later layer reads it "
                       "and the readout never sees it, so the row says nothing about the source")


def layer_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'l':>3} {'l*':>3}  {'top token':<14} {'p':>6}  generation", "-" * 64]
    for row in rows:
        token = show_text(row["token"], 11) + ("" if row.get("informative", True) else "*")
        generation = "" if row["generation"] is None else show_text(row["generation"], 30)
        lines.append(f"{row['source_layer']:>3} {row['target_layer']:>3}  {token:<14} {row['prob']:>6.3f}  "
                     + generation)
    if not all(row.get("informative", True) for row in rows):
        lines.append(NO_INFORMATION_NOTE)
    return "\n".join(lines)


def _rows(results) -> list[dict[str, Any]]:
    return [{"source_layer": r.scope.source.layer, "target_layer": r.scope.target.layer,
             "source_position": r.source_position, "target_position": r.target_position,
             "token": r.token, "prob": round(r.prob, 6), "generation": r.generation, "informative": r.informative,
             "top": [{"token": t.token, "prob": round(t.prob, 6)} for t in r.top]} for r in results]


# ---- commands ---------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> None:
    from .execution.engine import run
    from .presets import build, get_preset

    preset = get_preset(args.preset)  # fail on a bad name before loading a model
    if args.lens is not None and not preset.needs_lens:
        raise UsageError(f"--lens is for --preset jacobian-lens, not {args.preset!r} (see: patchscopes inspect --help)")
    check_local_inputs(args)
    html = check_outputs(args, {"--html": args.html}).get("--html")
    handle = _load(args)
    models, options = [handle], {}
    if args.adapter is not None:  # M* = the model with a PEFT adapter (a LatentQA decoder, an Activation Oracle)
        from .models import load_model

        decoder = load_model(args.model, dtype=args.dtype, adapter=args.adapter, **_placement(args))
        models.append(decoder)
    if preset.needs_lens:
        from .jlens import JacobianLens

        options["lens"] = (JacobianLens.from_file(args.lens, model=handle) if args.lens is not None
                           else JacobianLens.from_catalogue(model=handle))
    layers = (options["lens"].source_layers if "lens" in options and args.layers in (None, "all")
              else parse_layers(args.layers, handle.n_layers))
    if args.target_prompt:
        options["target_prompt"] = args.target_prompt
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    if preset.needs_tokenizer:  # T = S cut at i; the oracle's chat template
        options["tokenizer"] = handle.tokenizer
    preset.check(args.target_layer, handle.n_layers, "--target-layer")  # a fixed l* (the lenses): that one only
    scopes = [build(args.preset, args.source_prompt, parse_position(args.source_position), layer,
                    args.target_layer, handle.name, n_layers=handle.n_layers, **options) for layer in layers]
    if len(models) > 1:
        scopes = [s.replace(target=dataclasses.replace(s.target, model=models[1].name)) for s in scopes]
    results = run(scopes, models, top=args.top, progress=not args.json)
    rows = _rows(results)
    if preset.target_layer is not None:  # a fixed l* shows as the sweep's column does (29 on SmolLM2, not -1)
        fixed = preset.target_layers(None, handle.n_layers)[0]
        rows = [{**row, "target_layer": fixed} for row in rows]
    header = (f"{args.preset} on {handle.name}: {args.source_prompt!r} @ {args.source_position!r} "
              f"(token {results[0].source_position})\n")
    if html is not None:
        from .export import layers_table, write_page

        write_page(html, f"Patchscopes inspect: {args.preset} on {handle.name}", [("table", layers_table(results))])
    note = f"\ninteractive table written to {args.html}" if args.html else ""
    _emit(args, {"model": handle.name, "preset": args.preset,
                 "source_prompt": args.source_prompt, "source_position": args.source_position,
                 "target_prompt": results[0].scope.target.prompt, "layers": rows, "html": args.html},
          header + layer_table(rows) + note)


def check_local_inputs(args: argparse.Namespace) -> None:
    """Before any model loads: --lens names a file, and --adapter a folder wherever it names a local path (an
    ``org/name`` that is no path here is a hub id)."""
    kind = None if args.lens is None else not_a_file(expand(args.lens))
    if kind is not None:
        raise SpecError(f"--lens={args.lens!r} {kind} (allowed: a Jacobian lens .pt file in the reference format)")
    adapter = args.adapter
    local = adapter is not None and (_exists(adapter) or adapter.startswith((".", "/", "~")))
    if local and not is_dir(expand(adapter)):
        raise SpecError(f"--adapter={adapter!r} {'is not a folder' if _exists(adapter) else 'does not exist'} "
                        "(allowed: a PEFT adapter folder holding adapter_config.json and adapter_model.safetensors, "
                        "or a hub id org/name)")


def cmd_run(args: argparse.Namespace) -> None:
    from .execution.engine import run
    from .models import load_model

    scope = load_spec(args.spec)
    changes = {k: v for k, v in (("source_prompt", args.source_prompt), ("source_layer", args.source_layer),
                                 ("target_layer", args.target_layer)) if v is not None}
    if args.source_position is not None:
        changes["source_position"] = parse_position(args.source_position)
    if scope.reroute is not None and "source_prompt" in changes:
        raise PatchscopeError("--source-prompt cannot change a multihop spec; build one with presets.multihop")
    if args.model is not None:
        _check_model_options(args)
        changes.update(on_model(scope, args.model))
    scope = scope.replace(**changes)
    models = {name: load_model(name, dtype=args.dtype, **_placement(args))
              for name in {scope.source.model, scope.target_model}}
    scope = load_spec(args.spec, models).replace(**changes)  # checks models of the saved spec's names, if loaded
    result = run(scope, models, top=args.top)[0]
    source = scope.source
    where = (f"vector {source.name!r} {list(source.tensor.shape)}" if scope.vector_source
             else f"{source.prompt!r} @ {source.position!r} (token {result.source_position})")
    lines = [f"source {where}, layer {source.layer} -> target layer {scope.target.layer}"]
    lines += [f"  {show_text(t.token):<16} {t.prob:.4f}" for t in result.top]
    if result.generation is not None:
        lines.append(f"generation: {show_text(result.generation)}")
    if result.null_top is not None:  # a vector's reading, beside the target read with nothing written
        null = f"{show_text(result.null_top[0].token)} {result.null_top[0].prob:.4f}" + (
            "" if result.null_generation is None else f", generation {show_text(result.null_generation)}")
        lines.append(f"null reading (target unpatched): {null}; the reading "
                     f"{'agrees with' if result.agrees_with_null else 'differs from'} it")
    _emit(args, {"result": result.to_dict()}, "\n".join(lines))


def on_model(scope: Patchscope, model: str) -> dict[str, Any]:
    """`Patchscope.replace` changes that run a single-model spec on `model` (``run NAME --model X``); a
    cross-model spec is refused, since its mapping was made for its own two models."""
    if scope.target_model != scope.source.model:
        raise PatchscopeError(f"--model={model!r} cannot replace the models of a cross-model spec "
                              f"(Source.model={scope.source.model!r}, Target.model={scope.target_model!r}; allowed: "
                              "--model with single-model specs only, or edit the spec's source and target models)")
    from dataclasses import replace

    target = None if scope.target.model is None else model
    return {"source": replace(scope.source, model=model), "target": replace(scope.target, model=target)}


def load_spec(spec: str, models: Any = None) -> Patchscope:
    """A catalogue name, or a path (see `persist.looks_like_path`): a JSON file or a folder from Patchscope.save."""
    from .persist import looks_like_path

    if looks_like_path(spec) and is_file(spec):
        return Patchscope.load_json(spec)
    return Patchscope.load(Path(spec) if looks_like_path(spec) else spec, models=models)


def cmd_list(args: argparse.Namespace) -> None:
    from .persist import catalogue, describe

    entries = {name: describe(name) for name in catalogue()}
    width = max((len(n) for n in entries), default=0) + 2
    table = "\n".join(f"{name:<{width}}{text}" for name, text in entries.items())
    _emit(args, {"catalogue": entries}, table)


def cmd_sweep(args: argparse.Namespace) -> None:
    from .presets import get_preset
    from .execution.sweeps import load_sweep, sweep
    from .export import sweep_figure, sweep_page

    from .core.files import read_text

    preset = get_preset(args.preset)
    if (args.prompts is None) == (args.source_prompt is None):
        raise SpecError("give exactly one of --source-prompt and --prompts")
    prompts = args.source_prompt if args.prompts is None else \
        [line for line in read_text(args.prompts, "--prompts file").splitlines() if line.strip()]
    if not prompts:
        raise SpecError(f"--prompts={args.prompts!r} holds no prompt (allowed: a text file, one prompt per line)")
    outputs = check_outputs(args, {"--plot": args.plot, "--html": args.html}, figures=("--plot",))
    plot, html = outputs.get("--plot"), outputs.get("--html")
    handle = _load(args)
    options: dict[str, Any] = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    if args.target_prompt:
        options["target_prompt"] = args.target_prompt
    target_layers = None if args.target_layers is None else "same" if args.target_layers == "same" else \
        parse_layers(args.target_layers, handle.n_layers, "--target-layers")
    target_layers = preset.target_layers(target_layers, handle.n_layers, "--target-layers",  # a fixed l*: only there
                                         shown=args.target_layers)
    result = sweep(prompts, handle, preset=args.preset, source_position=parse_position(args.source_position),
                   source_layers=parse_layers(args.source_layers, handle.n_layers, "--source-layers"),
                   target_layers=target_layers,
                   progress=not args.json, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                   out=args.out, readout=args.readout, **options)
    if args.out is not None:  # the cells are in the folder; print what this process did, not every cell
        if int(os.environ.get("RANK", "0")) == 0 and (plot is not None or html is not None):
            loaded = load_sweep(result.path, handle)
            if plot is not None:
                sweep_figure(loaded, plot)
            if html is not None:
                sweep_page(loaded, html)
        _emit(args, {"model": handle.name, "preset": args.preset, "out": str(result.path),
                     "spec_hash": result.manifest["spec_hash"], "computed_units": result.computed,
                     "skipped_units": result.skipped, "plot": args.plot, "html": args.html},
              f"sweep written to {result.path} (units computed here: {len(result.computed)}, already there: "
              f"{len(result.skipped)}); read it with load_sweep({str(result.path)!r})")
        return
    if plot is not None:
        sweep_figure(result, plot)
    if html is not None:
        sweep_page(result, html)
    records = result.to_records()
    frame = result.to_pandas()
    frame["token"] = [show_text(t) + ("" if ok else "*") for t, ok in zip(frame["token"], frame["informative"])]
    table = frame[["source_layer", "target_layer", "token", "prob"]].to_string(index=False)
    table += "" if frame["informative"].all() else "\n" + NO_INFORMATION_NOTE
    note = f"\nheatmap written to {args.plot}" if args.plot else ""
    note += f"\ninteractive heatmap written to {args.html}" if args.html else ""
    _emit(args, {"model": handle.name, "preset": args.preset, "plot": args.plot,
                 "html": args.html, "cells": records}, table + note)


def cmd_demo(args: argparse.Namespace) -> None:
    """The paper's Figure 1 on the embedded model: what does 'CEO' in the Amazon sentence encode per layer?"""
    from .execution.engine import run
    from .export import sweep_figure
    from .presets import build
    from .execution.sweeps import sweep

    _check_model_options(args)  # before the folder is made
    out = check_folder(args.out, "--out")
    check_file(out / DEMO_HEATMAP, "--out")
    handle = _load(args)
    layers = list(range(handle.n_layers))
    scopes = [build("token-identity", DEMO_PROMPT, DEMO_POSITION, layer, model=handle.name, max_new_tokens=4)
              for layer in layers]
    rows = _rows(run(scopes, handle, progress=not args.json))
    grid = sweep(DEMO_PROMPT, handle, preset="token-identity", source_position=DEMO_POSITION,
                 max_new_tokens=0, progress=not args.json)
    heatmap = out / DEMO_HEATMAP
    sweep_figure(grid, heatmap)
    decoded = [r["source_layer"] for r in rows if "ceo" in (r["generation"] or "").lower()]
    reading = (
        f"How to read this: row l patches the hidden state of 'CEO' after layer l into the few-shot identity "
        f"prompt at the same layer, and the generation is what the model says that state is; "
        f"it decodes 'CEO' itself at {len(decoded)} of {len(layers)} layers"
        + (f" ({decoded[0]}..{decoded[-1]})" if decoded else "") + ".\n"
        f"The heatmap {heatmap} shows the top next token for every (source layer l, target layer l*) pair; "
        "darker cells are more confident. Reading up a column shows how long the word survives in the residual "
        "stream; the upper-left corner (late l patched into early l*) shows whether a late state still reads back "
        "as the word."
    )
    table = (f"Patchscope demo (paper Fig. 1) on {handle.name}: {DEMO_PROMPT!r} @ {DEMO_POSITION!r}\n"
             + layer_table(rows) + "\n\n" + reading)
    _emit(args, {"model": handle.name, "source_prompt": DEMO_PROMPT,
                 "source_position": DEMO_POSITION, "layers": rows, "heatmap": str(heatmap),
                 "decoded_layers": decoded}, table)


def attribution_table(attribution) -> str:
    """One line per token: position, token, score and a bar scaled to the largest score."""
    lines = [f"{'pos':>4}  {'token':<16} {'score':>11}", "-" * 52]
    for position, token, score, weight in zip(attribution.positions, attribution.tokens, attribution.scores,
                                              attribution.normalised()):
        lines.append(f"{position:>4}  {show_text(token, 14):<16} {score:>11.4g}  {'#' * round(20 * weight)}")
    return "\n".join(lines)


def output_paths(out: str) -> tuple[Path, Path]:
    """--out FILE -> (FILE.png, FILE.html); a .png or .html suffix on FILE is replaced."""
    path = Path(out)
    stem = path.with_suffix("") if path.suffix.lower() in (".png", ".html", ".htm") else path
    return stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.html"


def cmd_jacobian(args: argparse.Namespace) -> None:
    from .jacobian import JacobianScope, jacobian_scope

    token = args.target_token
    if token is not None and re.fullmatch(r"[0-9]{1,9}", token):
        token = int(token)
    spec = JacobianScope(variant=args.variant, target_position=args.target_position, target_token=token,
                         fisher=args.fisher, rank=args.rank, model=args.model)  # a clear error before loading
    paths = None if not args.out else output_paths(args.out)
    if paths is not None:
        refuse_special(args.out, "--out")  # /dev/full must not become /dev/full.png
        for path in paths:
            check_outputs(args, {"--out": str(path)})
    handle = _load(args)
    attribution = jacobian_scope(handle, args.text, JacobianScope(**{**spec.__dict__, "model": handle.name}),
                                 progress=not args.json)
    files: dict[str, str] = {}
    if paths is not None:
        png, html = paths
        attribution.plot(png)
        attribution.to_html(html)
        files = {"png": str(png), "html": str(html)}
    header = (f"{spec.label} scope on {handle.name}: prediction {show_text(attribution.prediction)} "
              f"(p = {attribution.prediction_prob:.3f}) after position {attribution.target_position}\n"
              + "top: " + ", ".join(f"{show_text(t)} ({s:.3g})" for _, t, s in attribution.top(args.top)) + "\n")
    note = "".join(f"\n{kind.upper()} written to {path}" for kind, path in files.items())
    _emit(args, {"model": handle.name, **attribution.to_dict(), "files": files},
          header + attribution_table(attribution) + note)


def cmd_presets(args: argparse.Namespace) -> None:
    from .models import EMBEDDED
    from .presets import PRESETS

    payload = {"presets": {n: p.summary for n, p in PRESETS.items()}, "models": list(EMBEDDED)}
    table = "\n".join([f"{n:<20} {p.summary}" for n, p in PRESETS.items()] + ["", "models: " + ", ".join(EMBEDDED)])
    _emit(args, payload, table)


def cmd_families(args: argparse.Namespace) -> None:
    import transformers

    from .tools.families import counts, markdown, survey

    verdicts = survey(progress=not args.json and sys.stderr.isatty())
    if args.markdown:
        _emit(args, {}, markdown(verdicts))
        return
    width = max(len(v.name) for v in verdicts) + 2
    rows = [f"{v.name:<{width}}{v.path:<14}{v.reason}" for v in verdicts]
    tally = ", ".join(f"{n} {path}" for path, n in counts(verdicts).items())
    payload = {"transformers": transformers.__version__, "counts": counts(verdicts),
               "classes": [dataclasses.asdict(v) for v in verdicts]}
    _emit(args, payload, "\n".join(rows + ["", f"transformers {transformers.__version__}: {tally}"]))


def port_number(text: str) -> int:
    if text.strip() == "0":
        return 0
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (allowed: 0..65535, 0 for any free port)")
    return value


def cmd_explore(args: argparse.Namespace) -> None:
    from .explore.app import bind, check_installed, hosts_for, serve
    from .explore.service import MAX_PROMPT_TOKENS, Explorer

    check_installed()  # before the model loads: the app extra (fastapi, uvicorn)
    hosts = hosts_for(args.host, args.allow_host)
    sock = bind(args.host, args.port)  # a port in use is refused before the model loads, not after
    try:
        explorer = Explorer(_load(args), max_prompt_tokens=args.max_prompt_tokens or MAX_PROMPT_TOKENS)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    for stream in (sys.stdout, sys.stderr):  # from here on they are the server's log: a reader that leaves ends
        if isinstance(stream, _Stream):     # the log only (its lines are dropped), and the page keeps being served
            stream.on_close = "drop"
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Patchscopes explorer on {explorer.handle.name}: http://{shown}:{port}/  (Ctrl-C stops it)", flush=True)
    serve(explorer, sock, allowed_hosts=hosts)


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluate import EvalOptions, get_task, run_all, run_task
    from .models import load_model

    if args.task != "all":
        get_task(args.task)  # a clear error before any model loads
    _check_model_options(args)
    if args.out is not None:
        check_folder(args.out, "--out")
    if args.task == "cross-model":
        from .models import model_source

        model_source(args.target_model)
    handles: dict[str, Any] = {}

    def load(name: str):
        if name not in handles:
            handles[name] = load_model(name, dtype=args.dtype, **_placement(args))
        return handles[name]

    cross = args.task == "cross-model"
    options = EvalOptions(
        limit=args.limit, data=args.data, n_train=args.n_train, seed=args.seed, batch_size=args.batch_size,
        select_on=args.select_on,
        layers=None if args.layers is None else parse_layers(args.layers, load(args.model).n_layers),
        target_layers=None if args.target_layers is None else
        parse_layers(args.target_layers, load(args.target_model if cross else args.model).n_layers,
                     "--target-layers"),
        progress=None if not args.json else False)
    if args.task == "all":
        if args.out is None:
            raise PatchscopeError("eval all needs --out DIR (allowed: any folder; one subfolder per task)")
        reports = run_all(load, options, args.out, model=args.model)
        payload = {"task": "all", "reports": [r.to_dict() for r in reports]}
        _emit(args, payload, (Path(args.out) / "README.md").read_text())
        return
    report = run_task(args.task, load, options, args.out, source=args.model, target=args.target_model)
    _emit(args, {"task": args.task, "report": report.to_dict()}, report.markdown())


# ---- parser -----------------------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser, model: bool = True) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output (schema in README)")
    if model:
        parser.add_argument("--model", default="smollm2-135m", help="embedded name, HF id or local path")
        parser.add_argument("--device", default=None, help="cpu (the default), cuda, cuda:1, or auto (each "
                                                            "process's own GPU under accelerate launch)")
        parser.add_argument("--dtype", default=None, help="auto (the checkpoint's; default for hub ids and folders), "
                                                           "float32 (default for embedded models), bfloat16, float16")
        parser.add_argument("--device-map", default=None, help="split or offload the model: auto, balanced, "
                                                                "sequential (instead of --device)")
        parser.add_argument("--offload-folder", default=None, help="with --device-map: where it offloads weights "
                                                                    "to disk")
        parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                            help="import MODULE first, for the mappings and interventions it registers (repeatable); "
                                 f"installed plugins (entry-point group {PLUGIN_GROUP}) are imported too")


def _source(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--source-prompt", required=required)
    parser.add_argument("--source-position", default="-1", help="token index or substring (default -1)")
    parser.add_argument("--preset", default="token-identity")
    parser.add_argument("--target-prompt", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens generated greedily after the patched prompt (default: the preset's own, as in "
                             "Python: token-identity 4, logit-lens 0, future-lens 3, attribute 20; 0: the next token "
                             "only, faster)")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are the library's own (one line, exit code 2, no SystemExit)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see: {self.prog} --help)", command=self.prog.partition(" ")[2] or None)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """argparse's own, but an unrecognized argument is refused naming the command it was given to."""
        known, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(known, "command", None)
            raise UsageError(f"unrecognized arguments: {' '.join(extras)} (see: "
                             f"{' '.join(filter(None, (self.prog, command)))} --help)", command=command)
        return known


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="patchscopes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="what each layer's state at one position decodes to")
    _source(p)
    p.add_argument("--layers", default="all", help="source layers: all, 5, 0-29, 0,3,6, 0-29:3")
    p.add_argument("--target-layer", type=int, default=None, help="fixed l* (default: the preset's; logit-lens and "
                                                                   "jacobian-lens fix it at the last layer)")
    p.add_argument("--top", type=positive_int, default=5)
    p.add_argument("--html", default=None, help="write the table as one self-contained HTML page here (hover a "
                                                 "row for its top tokens; no server needed)")
    p.add_argument("--lens", default=None, help="--preset jacobian-lens: a lens .pt file in the reference format "
                                                 "(default: the shipped SmolLM2 lens; its layers unless --layers)")
    p.add_argument("--adapter", default=None, help="write into the model with this PEFT adapter folder (M*: a "
                                                    "LatentQA decoder, an Activation Oracle); read from the base")
    _common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("run", help="run a Patchscope: a catalogue name, a saved folder or a JSON file")
    p.add_argument("spec")
    p.add_argument("--source-prompt", default=None, help="replace the spec's source prompt")
    p.add_argument("--source-position", default=None, help="replace the source position (index or substring)")
    p.add_argument("--source-layer", type=int, default=None)
    p.add_argument("--target-layer", type=int, default=None)
    p.add_argument("--top", type=positive_int, default=10)
    _common(p)
    p.set_defaults(func=cmd_run, model=None)

    p = sub.add_parser("sweep", help="source layer x target layer grid, optionally as a heatmap")
    _source(p, required=False)
    p.add_argument("--prompts", default=None, help="a text file of source prompts, one per line (instead of "
                                                    "--source-prompt); split over processes under accelerate launch")
    p.add_argument("--source-layers", default="all")
    p.add_argument("--target-layers", default=None, help="as --source-layers, or 'same' for l* = l only (default: "
                                                          "all; a preset that fixes l*, logit-lens and jacobian-lens,"
                                                          " only there, the last layer)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="source prompts per unit of work (default: 32; with --out, as many as fit 256 cells, at "
                        "least 1: one prompt a unit for a 30 x 30 grid, 8 at l* = l, so a kill loses little)")
    p.add_argument("--max-batch-tokens", type=positive_int, default=32768, help="token budget of one patch batch")
    p.add_argument("--plot", default=None, help="write the heatmap PNG here")
    p.add_argument("--html", default=None, help="write the heatmap as one self-contained interactive HTML page "
                                                 "here (hover a cell for its top-5; no server needed)")
    p.add_argument("--out", default=None, help="write each finished unit to this folder as a Parquet shard; a rerun "
                                                "resumes (prints a summary instead of every cell)")
    p.add_argument("--readout", default="top", choices=["top", "logits", "generations"],
                   help="what each cell keeps (default: top-k tokens; logits: also the full logits)")
    _common(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="the paper's Figure 1 on the embedded model: table and heatmap")
    p.add_argument("--out", default="out", help="folder for the heatmap PNG")
    _common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("jacobian", help="Jacobian Scopes: which tokens of TEXT drive the next-token prediction")
    p.add_argument("text")
    p.add_argument("--variant", default="fisher", help="semantic | fisher | temperature | gradient-x-input")
    p.add_argument("--fisher", default="low-rank", help="low-rank (top --rank eigenvectors of F) or exact")
    p.add_argument("--rank", type=positive_int, default=1, help="eigenvectors kept by the low-rank Fisher form")
    p.add_argument("--target-position", type=int, default=-1, help="the prediction position (default -1: "
                                                                    "the next token after TEXT)")
    p.add_argument("--target-token", default=None, help="semantic / gradient-x-input: the token (text or id) "
                                                         "whose logit is explained (default: the prediction)")
    p.add_argument("--top", type=positive_int, default=5)
    p.add_argument("--out", default=None, help="write FILE.png and FILE.html (token heatmaps)")
    _common(p)
    p.set_defaults(func=cmd_jacobian)

    from .evaluate import data_fields

    p = sub.add_parser("eval", help="the paper's experiments: next-token, future, attributes, entities, "
                                    "cross-model, multihop, stages, or all", epilog=data_fields(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", help="next-token | future | attributes | entities | cross-model | multihop | stages "
                                "| jacobian | all")
    p.add_argument("--out", default=None, help="folder for report.md, report.json and the plots")
    p.add_argument("--limit", type=positive_int, default=None, help="how many samples (texts, facts, entities, "
                                                                    "queries)")
    p.add_argument("--layers", default=None, help="source layers: all, 5, 0-29, 0,3,6, 0-29:3 (default: the task's)")
    p.add_argument("--target-layers", default=None, help="target layers, same forms (default: the task's)")
    p.add_argument("--data", default=None, help="your own JSONL instead of the task's shipped data (its fields: "
                                                 "below)")
    p.add_argument("--n-train", type=positive_int, default=None, help="training texts for fitted maps")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples, the dev/test split and the bootstrap")
    p.add_argument("--select-on", choices=("dev", "oracle"), default="dev",
                   help="choose layers on a dev split and score them on the test split, beside the oracle that "
                        "picks them after seeing the answers (dev, the default), or report the oracle alone")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--target-model", default="gemma3-270m", help="M* for cross-model")
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("list", help="the shipped catalogue of Patchscopes (run one with: patchscopes run NAME)")
    _common(p, model=False)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("presets", help="list presets and embedded models")
    _common(p, model=False)
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("families", help="every causal-LM class of the installed transformers, on a tiny random "
                                        "config: the path it takes (planned, plain, refused) and why")
    p.add_argument("--markdown", action="store_true", help="the README's table")
    _common(p, model=False)
    p.set_defaults(func=cmd_families)

    p = sub.add_parser("explore", help="the interactive explorer: a local web page over one model")
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8765, help="port to listen on (0: any free one)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a name the page may be reached by besides localhost, 127.0.0.1 and ::1 (repeatable); "
                        "requests naming any other Host are refused")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                   help="the longest prompt the page accepts, in tokens (default 4096)")
    p.set_defaults(func=cmd_explore)
    return parser


def import_plugins(args: argparse.Namespace) -> None:
    """For a command that loads specs or runs models: the installed plugins, then each ``--import MODULE`` in order."""
    if getattr(args, "imports", None) is None:  # list, presets, families: nothing of the user's to know
        return
    load_plugins()
    for module in args.imports:
        import_module(module, "--import")


def json_requested(argv: Sequence[str]) -> bool:
    """Whether --json, or a prefix of it that argparse accepts (--js), is on the command line before a lone --."""
    words = list(argv)
    words = words[:words.index("--")] if "--" in words else words
    return any(len(word) > 2 and "--json".startswith(word) for word in words)


def error_line(err: PatchscopeError, command: str | None, as_json: bool) -> str:
    """What `main` prints on standard error for `err`: one line, `patchscopes: error: ...`, or with --json one
    JSON object ``{"schema", "command", "error": {"type", "message", "exit_status"}}``."""
    if as_json:
        error = {"type": type(err).__name__, "message": str(err), "exit_status": ERROR_STATUS}
        return json.dumps({"schema": JSON_SCHEMA_VERSION, "command": command, "error": error})
    return "patchscopes: error: " + str(err).replace("\r", "\\r").replace("\n", "\\n")  # user text may break lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line: exit status 0, 2 with the error on standard error, or 141, quietly, when a reader
    closed the pipe of standard output or error early (the output, a progress bar or the error met it); `explore`,
    a server, keeps serving instead, its log dropped.

    SIGPIPE keeps Python's handling (ignored: a write fails instead), so sockets are left alone; the standard
    streams are wrapped for the command's duration so that such a failure reaches this function as `ClosedPipe`.
    Only a stream whose pipe closed is pointed at /dev/null afterwards.
    """
    streams = sys.stdout, sys.stderr
    wrapped = [None if stream is None else _Stream(stream) for stream in streams]
    sys.stdout, sys.stderr = wrapped
    try:
        return _run(sys.argv[1:] if argv is None else list(argv))
    except ClosedPipe:  # `| head` stopped reading: end quietly, as Unix tools do
        return CLOSED_PIPE_STATUS
    finally:
        sys.stdout, sys.stderr = streams
        for stream in filter(None, wrapped):
            stream.release()


def _run(argv: list[str]) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        check_options(args)
        import_plugins(args)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.simplefilter("ignore", UninformativeScopeWarning)  # tables mark such rows instead
            args.func(args)
        return 0
    except PatchscopeError as err:
        line = error_line(err, getattr(err, "command", None) if args is None else args.command,
                          json_requested(argv) if args is None else args.json)
    # printed once the traceback is gone (with the frames it held, progress bars have closed): the last line
    print(line, file=sys.stderr, flush=True)
    return ERROR_STATUS


if __name__ == "__main__":
    sys.exit(main())
