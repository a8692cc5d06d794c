"""The evaluations' data, loaded through `datasets`: English prose splits, and the shipped JSONL sets.

Shipped with the package (``pyvene_patchscopes/evaluate/data/``): ``facts.jsonl`` (attributes),
``entities.jsonl`` (entities) and ``multihop.jsonl`` (multihop). Any of them, and the jacobian task's
texts, can be the user's own JSONL (``--data``) with the fields `FIELDS` lists: the one table that the
loader checks, ``patchscopes eval --help`` prints and the README shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.files import is_file
from ..errors import SpecError

if TYPE_CHECKING:
    import datasets


@dataclass(frozen=True)
class Field:
    """One field of a ``--data`` row: its name, what the task does with it, and whether a row may omit it."""

    name: str
    meaning: str
    required: bool = True


FIELDS: dict[str, tuple[Field, ...]] = {
    "facts": (
        Field("relation", "the relation's name, e.g. country_capital (facts are grouped by it)"),
        Field("category", "factual or commonsense (shown in the per-relation table)"),
        Field("subject_kind", 'what the subject is, e.g. country (the source prompt is "Here is a country: France")'),
        Field("template", 'the relation prompt with the placeholder word x, e.g. "The capital city of x is"'),
        Field("subject", "e.g. France; its last token's state is read"),
        Field("object", "the answer the generation must name, e.g. Paris"),
        Field("aliases", "a list of other names that count as the object", required=False),
    ),
    "entities": (
        Field("entity", "the name described, e.g. Albert Einstein"),
        Field("popularity", "popular or rare (the two are reported apart)"),
        Field("reference", "a short description the generated one is scored against (ROUGE-L)"),
    ),
    "multihop": (
        Field("hop2", 'the outer relation, e.g. "The capital of"'),
        Field("hop1", 'the inner description, e.g. "the country where the Eiffel Tower stands"'),
        Field("hop1_prompt", "hop 1 alone, which the model must complete with the bridge"),
        Field("bridge", "hop 1's answer, e.g. France"),
        Field("hop2_prompt", "hop 2 on the bridge, which the model must complete with the answer"),
        Field("answer", "the two-hop answer, e.g. Paris"),
    ),
    "texts": (Field("text", "a passage whose next-token prediction is attributed"),),
}
REQUIRED = {kind: tuple(f.name for f in fields if f.required) for kind, fields in FIELDS.items()}


def shipped(name: str) -> Path:
    """Path of a JSONL file that ships with the package."""
    return Path(str(resources.files("pyvene_patchscopes.evaluate") / "data" / f"{name}.jsonl"))


def load_jsonl(kind: str, path: str | Path | None = None) -> datasets.Dataset:
    """Load ``kind`` ('facts', 'entities', 'multihop', 'texts') from `path` (default: the shipped file), checking
    fields."""
    import datasets

    if kind not in REQUIRED:
        raise SpecError(f"data kind={kind!r} is not known (allowed: {', '.join(REQUIRED)})")
    file = Path(path) if path is not None else shipped(kind)
    if not is_file(file):
        raise SpecError(
            f"--data={str(file)!r} is not a file (allowed: a JSONL file with fields {', '.join(REQUIRED[kind])})"
        )
    try:  # a path that is a local file: datasets reads it without asking a hub (a test proves it)
        data = datasets.Dataset.from_json(str(file), keep_in_memory=True)
    except Exception as error:  # datasets raises several types for malformed JSON
        raise SpecError(f"--data={str(file)!r} is not valid JSONL ({type(error).__name__}: {error})") from error
    missing = [field for field in REQUIRED[kind] if field not in data.column_names]
    if missing:
        raise SpecError(
            f"--data={str(file)!r} lacks field(s) {', '.join(missing)} (allowed: rows with {', '.join(REQUIRED[kind])})"
        )
    return data


def prose_splits(n_train: int, n_eval: int, seed: int = 0) -> datasets.DatasetDict:
    """Train and evaluation splits of English prose that ships with Python (`fit.default_texts`).

    The paper uses the Pile; with no dataset hub reachable, Python's own language-reference prose is the
    real text that is always present. The two splits never share a paragraph.
    """
    import datasets

    from ..analysis.fit import default_texts

    texts = default_texts()
    if n_train + n_eval > len(texts):
        raise SpecError(
            f"n_train + n_eval = {n_train + n_eval} is out of range (allowed: up to {len(texts)} "
            "paragraphs of the shipped prose)"
        )
    corpus = datasets.Dataset.from_dict({"text": texts}).shuffle(seed=seed)
    return datasets.DatasetDict(
        train=corpus.select(range(n_train)), evaluation=corpus.select(range(n_train, n_train + n_eval))
    )


def rows(data: datasets.Dataset, limit: int | None = None) -> list[dict]:
    """The first `limit` rows as plain dicts."""
    count = len(data) if limit is None else min(limit, len(data))
    return [data[k] for k in range(count)]


__all__ = ["load_jsonl", "prose_splits", "shipped", "rows", "Field", "FIELDS", "REQUIRED"]
