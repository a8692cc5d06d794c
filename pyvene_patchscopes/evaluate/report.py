"""An evaluation's output: headline numbers, tables, figures and raw series, written as JSON and markdown."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from warnings import warn

from ..core.outputs import save_figure as write_figure, write_text
from ..errors import SmallSampleWarning
from .stats import Split, small_intervals, small_test_split

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        lines = [
            f"**{self.title}**",
            "",
            "| " + " | ".join(self.columns) + " |",
            "|" + "|".join("---" for _ in self.columns) + "|",
        ]
        lines += ["| " + " | ".join(_fmt(value) for value in row) + " |" for row in self.rows]
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", "\\n")


@dataclass
class Report:
    """What one `patchscopes eval TASK` run measured."""

    task: str
    title: str
    model: str
    command: str
    settings: dict[str, Any]
    summary: dict[str, Any]
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # what makes a number here weaker than it looks

    def to_dict(self) -> dict[str, Any]:
        """Every field (``warnings`` only when there is one, so that reports without any read as before)."""
        out = asdict(self)
        if not out["warnings"]:
            del out["warnings"]
        return out

    def check_samples(self) -> None:
        """Say so, in the report and as a `SmallSampleWarning` (on stderr), when an interval it prints rests on
        fewer than `stats.MIN_TEST` samples: its test split (every task with a dev/test split records it in
        ``data["split"]``) or, split or not, any interval `stats.record` put in ``data["intervals"]`` (one swept
        fact, ``select_on="oracle"`` and too few samples to split all leave no split)."""
        held = self.data.get("split")
        message = small_test_split(Split.from_dict(held) if held else None) or small_intervals(
            self.data.get("intervals", {})
        )
        if message is not None and message not in self.warnings:
            self.warnings.append(message)
            warn(f"{self.task} on {self.model}: {message}", SmallSampleWarning, stacklevel=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        """The inverse of `to_dict` (as read back from ``report.json``)."""
        return cls(**{**data, "tables": [Table(**table) for table in data.get("tables", [])]})

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        """A report from its ``report.json`` (or the folder holding it)."""
        path = Path(path)
        return cls.from_dict(json.loads((path / "report.json" if path.is_dir() else path).read_text()))

    def markdown(self) -> str:
        parts = [
            f"# {self.title}",
            "",
            f"Model: `{self.model}`. Reproduce: `{self.command}` "
            f"({self.seconds:.0f} s on the machine that wrote this).",
            "",
        ]
        parts += [*(f"**Warning:** {warning}." for warning in self.warnings), *([""] if self.warnings else [])]
        parts += [f"- {key}: {_fmt(value)}" for key, value in self.summary.items()]
        parts.append("")
        for table in self.tables:
            parts += [table.markdown(), ""]
        parts += [f"![{name}]({name})" for name in self.figures]
        if self.notes:
            parts += ["", *[f"- {note}" for note in self.notes]]
        return "\n".join(parts).rstrip() + "\n"

    def write(self, out: str | Path) -> Path:
        """Write ``report.json`` and ``report.md`` (figures are written by the task) into `out`."""
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "report.json", json.dumps(self.to_dict(), indent=1, default=float) + "\n")
        write_text(folder / "report.md", self.markdown())
        return folder


def save_figure(figure: "Figure", out: str | Path | None, name: str, report: Report) -> None:
    """Save a figure made by `plot.subplots` as ``out/name`` and list it in the report; without `out`, do nothing."""
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_figure(figure, Path(out) / name, dpi=120, bbox_inches="tight")
        report.figures.append(name)


__all__ = ["Report", "Table", "save_figure"]
