"""The evaluations' data, loaded through `datasets`: English prose splits, and the shipped JSONL sets.

Shipped with the package (``pyvene_patchscopes/evaluate/data/``):
- ``facts.jsonl``: attribute facts (relation, category, subject_kind, template with placeholder x, subject,
  object, aliases);
- ``entities.jsonl``: popular and rare entities with a short reference description;
- ``multihop.jsonl``: two-hop queries with their single hops (hop1_prompt -> bridge, hop2_prompt -> answer).
Any of them can be replaced by the user's own JSONL with the same fields.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import datasets

from ..errors import SpecError
from ..files import is_file

REQUIRED = {
    "facts": ("relation", "category", "subject_kind", "template", "subject", "object"),
    "entities": ("entity", "popularity", "reference"),
    "multihop": ("hop2", "hop1", "hop1_prompt", "bridge", "hop2_prompt", "answer"),
    "texts": ("text",),
}


def shipped(name: str) -> Path:
    """Path of a JSONL file that ships with the package."""
    return Path(str(resources.files("pyvene_patchscopes.evaluate") / "data" / f"{name}.jsonl"))


def load_jsonl(kind: str, path: str | Path | None = None) -> datasets.Dataset:
    """Load ``kind`` ('facts', 'entities', 'multihop', 'texts') from `path` (default: the shipped file), checking fields."""
    if kind not in REQUIRED:
        raise SpecError(f"data kind={kind!r} is not known (allowed: {', '.join(REQUIRED)})")
    file = Path(path) if path is not None else shipped(kind)
    if not is_file(file):
        raise SpecError(f"--data={str(file)!r} is not a file (allowed: a JSONL file with fields "
                        f"{', '.join(REQUIRED[kind])})")
    try:  # a path that is a local file: datasets reads it without asking a hub (a test proves it)
        data = datasets.Dataset.from_json(str(file), keep_in_memory=True)
    except Exception as error:  # datasets raises several types for malformed JSON
        raise SpecError(f"--data={str(file)!r} is not valid JSONL ({type(error).__name__}: {error})") from error
    missing = [field for field in REQUIRED[kind] if field not in data.column_names]
    if missing:
        raise SpecError(f"--data={str(file)!r} lacks field(s) {', '.join(missing)} "
                        f"(allowed: rows with {', '.join(REQUIRED[kind])})")
    return data


def prose_splits(n_train: int, n_eval: int, seed: int = 0) -> datasets.DatasetDict:
    """Train and evaluation splits of English prose that ships with Python (`fit.default_texts`).

    The paper uses the Pile; with no dataset hub reachable, Python's own language-reference prose is the
    real text that is always present. The two splits never share a paragraph.
    """
    from ..fit import default_texts

    texts = default_texts()
    if n_train + n_eval > len(texts):
        raise SpecError(f"n_train + n_eval = {n_train + n_eval} is out of range (allowed: up to {len(texts)} "
                        "paragraphs of the shipped prose)")
    corpus = datasets.Dataset.from_dict({"text": texts}).shuffle(seed=seed)
    return datasets.DatasetDict(train=corpus.select(range(n_train)),
                                evaluation=corpus.select(range(n_train, n_train + n_eval)))


def rows(data: datasets.Dataset, limit: int | None = None) -> list[dict]:
    """The first `limit` rows as plain dicts."""
    count = len(data) if limit is None else min(limit, len(data))
    return [data[k] for k in range(count)]


__all__ = ["load_jsonl", "prose_splits", "shipped", "rows", "REQUIRED"]
