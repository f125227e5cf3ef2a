"""N-way K-shot episodes: seeded sampling and the episode file every method shares.

Sampling (`sample_episodes`) uses one ``numpy.random.default_rng(seed)`` for the whole
list, so the same (dataset, split, way, shot, query, episodes, seed) always gives the
same episodes. Per episode: N classes drawn without replacement from the split's sorted
class list (label = position in ``Episode.classes``), then per class a permutation of
its items: the first K are support, the next Q (or all the rest) query.

Episode file (JSON)::

    {"format": "tint-episodes", "version": 1,
     "meta": {"dataset": "openclipart", "split": "novel", "n_way": 5, "k_shot": 5,
              "n_query": "all", "seed": 0, ...},
     "episodes": [{"classes": [...], "support": [[item, ...], ...],
                   "query": [[item, ...], ...]}, ...]}

Items are the dataset's item ids: paths relative to the dataset root (portable across
machines), or ``file#index`` references. `load_episodes` validates the structure;
`check_episodes` also checks them against a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tint.data.datasets import FewShotDataset
from tint.errors import TintError
from tint.io import read_json, write_json

FORMAT = "tint-episodes"
VERSION = 1


@dataclass
class Episode:
    classes: list[str]  # N class names, label = index in this list
    support: list[list[str]]  # [N][K] item ids
    query: list[list[str]]  # [N][Q_n] item ids

    @property
    def n_way(self) -> int:
        return len(self.classes)

    def labelled(self, part: str = "query") -> tuple[list[str], list[int]]:
        """Flatten support or query into (items, labels)."""
        groups = self.support if part == "support" else self.query
        items = [item for group in groups for item in group]
        labels = [label for label, group in enumerate(groups) for _ in group]
        return items, labels

    def to_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "support": self.support, "query": self.query}


def _check_capacity(
    dataset: FewShotDataset, classes: list[str], k_shot: int, n_query: int | None
) -> None:
    """Fail before sampling, naming every class too small for K + Q images."""
    need = k_shot + (1 if n_query is None else n_query)
    small = [(c, len(dataset.items[c])) for c in classes if len(dataset.items[c]) < need]
    if small:
        listing = ", ".join(f"{c!r} has {n}" for c, n in small)
        ask = f"{k_shot} shots + {'at least 1 query' if n_query is None else f'{n_query} queries'}"
        raise TintError(
            f"{dataset.name}: {ask} = {need} images per class, but {listing}; "
            "lower --shot/--query or drop those classes"
        )


def sample_episodes(
    dataset: FewShotDataset,
    split: str = "novel",
    n_way: int = 5,
    k_shot: int = 5,
    n_query: int | None = 15,
    n_episodes: int = 1,
    seed: int = 0,
) -> list[Episode]:
    """Seeded N-way K-shot episodes; ``n_query=None`` uses all remaining images as queries."""
    if n_way < 1 or k_shot < 1 or n_episodes < 0 or (n_query is not None and n_query < 0):
        raise TintError(
            f"way={n_way}, shot={k_shot}, query={n_query}, episodes={n_episodes}: "
            "way and shot must be >= 1, query and episodes >= 0"
        )
    classes = sorted(dataset.classes(split))
    if len(classes) < n_way:
        raise TintError(
            f"{dataset.name}: split {split!r} has {len(classes)} classes, "
            f"fewer than the {n_way} a {n_way}-way episode needs"
        )
    _check_capacity(dataset, classes, k_shot, n_query)
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(n_episodes):
        chosen = [classes[i] for i in rng.choice(len(classes), size=n_way, replace=False)]
        support, query = [], []
        for name in chosen:
            items = dataset.items[name]
            order = [items[i] for i in rng.permutation(len(items))]
            end = len(order) if n_query is None else k_shot + n_query
            support.append(order[:k_shot])
            query.append(order[k_shot:end])
        episodes.append(Episode(classes=chosen, support=support, query=query))
    return episodes


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def validate_episode(episode: Any, where: str) -> Episode:
    """Structure checks: N classes, N support and N query lists, no item used twice."""
    if not isinstance(episode, dict):
        raise TintError(f"{where}: expected an object with classes, support, query")
    classes, support, query = (episode.get(k) for k in ("classes", "support", "query"))
    if not _is_str_list(classes) or not classes:
        raise TintError(f"{where}: 'classes' must be a non-empty list of class names")
    if len(set(classes)) != len(classes):
        raise TintError(f"{where}: a class appears twice in {classes}")
    for name, groups in (("support", support), ("query", query)):
        if not isinstance(groups, list) or len(groups) != len(classes):
            raise TintError(f"{where}: {name!r} must hold one list per class ({len(classes)})")
        if not all(_is_str_list(g) for g in groups):
            raise TintError(f"{where}: {name!r} must be lists of item ids")
    if any(not g for g in support):
        raise TintError(f"{where}: every class needs at least one support item")
    seen: set[str] = set()
    for group in support + query:
        for item in group:
            if item in seen:
                raise TintError(f"{where}: item {item!r} is used twice (support/query overlap)")
            seen.add(item)
    return Episode(classes=list(classes), support=support, query=query)


def save_episodes(path: str | Path, episodes: list[Episode], meta: dict) -> None:
    """Write an episode file atomically (`meta` should name at least the dataset spec)."""
    for i, ep in enumerate(episodes):
        validate_episode(ep.to_dict(), f"episode {i}")
    write_json(
        path,
        {
            "format": FORMAT,
            "version": VERSION,
            "meta": dict(meta),
            "episodes": [ep.to_dict() for ep in episodes],
        },
    )


def load_episodes(path: str | Path) -> tuple[list[Episode], dict]:
    """Read and validate an episode file; returns (episodes, meta)."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TintError(f'{path}: not a tint episode file (missing "format": "{FORMAT}")')
    if data.get("version") != VERSION:
        raise TintError(
            f"{path}: episode file version {data.get('version')!r}; this tint reads version {VERSION}"
        )
    meta = data.get("meta", {})
    if not isinstance(meta, dict):
        raise TintError(f"{path}: 'meta' must be an object")
    raw = data.get("episodes")
    if not isinstance(raw, list):
        raise TintError(f"{path}: 'episodes' must be a list")
    return [validate_episode(ep, f"{path}: episode {i}") for i, ep in enumerate(raw)], meta


def check_episodes(
    episodes: list[Episode], dataset: FewShotDataset, source: str = "episodes"
) -> None:
    """Every class exists in the dataset and every item belongs to its class."""
    known_items: dict[str, set[str]] = {}
    for i, ep in enumerate(episodes):
        for name, support, query in zip(ep.classes, ep.support, ep.query, strict=True):
            if name not in dataset.items:
                raise TintError(
                    f"{source}: episode {i} names class {name!r}, not in {dataset.name}"
                )
            known = known_items.setdefault(name, set(dataset.items[name]))
            stray = [item for item in support + query if item not in known]
            if stray:
                raise TintError(
                    f"{source}: episode {i}: {stray[0]!r} is not an item of class {name!r} "
                    f"in {dataset.name} ({len(stray)} such items)"
                )
