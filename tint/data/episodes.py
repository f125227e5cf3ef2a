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

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tint.data.datasets import FewShotDataset
from tint.errors import TintError
from tint.io import write_json

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


MAKE_ONE = "make one with `tint episodes`"


def _read_episode_json(path: Path) -> Any:
    """The file's JSON. It is the user's own input, not a cache: say what is wrong
    with it and how to make a valid one, never "delete it to recompute"."""
    if path.is_dir():
        raise TintError(f"{path}: is a folder, not an episode file; {MAKE_ONE}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise TintError(f"{path}: episode file not found; {MAKE_ONE}") from err
    except UnicodeDecodeError as err:
        raise TintError(f"{path}: not a text file, so not an episode file; {MAKE_ONE}") from err
    except json.JSONDecodeError as err:
        raise TintError(f"{path}: malformed episode file: invalid JSON at line {err.lineno} "
                        f"column {err.colno} ({err.msg}); fix it or {MAKE_ONE}") from err


def load_episodes(path: str | Path) -> tuple[list[Episode], dict]:
    """Read and validate an episode file; returns (episodes, meta)."""
    path = Path(path)
    data = _read_episode_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TintError(f'{path}: not a tint episode file (missing "format": "{FORMAT}"); '
                        f"{MAKE_ONE}")
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
    try:
        return [validate_episode(ep, f"{path}: episode {i}") for i, ep in enumerate(raw)], meta
    except TintError as err:
        raise TintError(f"{err}; fix the file or {MAKE_ONE}") from err


def check_episodes(
    episodes: list[Episode],
    dataset: FewShotDataset,
    source: str = "episodes",
    base_items: Sequence[str] | None = None,
    base_split: str | None = None,
) -> None:
    """Refuse episodes that would be scored against wrong labels or leak into training.

    Every class and item must exist in `dataset`, every item must be filed under its
    own class, and support and query must not share an item. With `base_items` (the
    distillation pool of the same run) or `base_split`, `check_not_in_base` also runs.
    Called on every episode, loaded or sampled, before any work starts.
    """
    for i, episode in enumerate(episodes):
        where = f"{source}: episode {i}"
        for name in episode.classes:
            if name not in dataset.items:
                raise TintError(f"{where} names class {name!r}, not in {dataset.name}; "
                                f"use an episode file made for this dataset ({MAKE_ONE})")
        for part, groups in (("support", episode.support), ("query", episode.query)):
            _check_filed_classes(episode, groups, part, dataset, where)
        _check_disjoint(episode, where)
    if base_items is not None or base_split is not None:
        check_not_in_base(episodes, dataset, source, base_items or (), base_split)


def _check_filed_classes(episode: Episode, groups: list[list[str]], part: str,
                         dataset: FewShotDataset, where: str) -> None:
    """Each item exists and belongs to the class the episode files it under."""
    owner = _class_index(dataset)
    for name, group in zip(episode.classes, groups, strict=True):
        missing = [item for item in group if item not in owner]
        if missing:
            raise TintError(f"{where}: {part} item {missing[0]!r} (filed under {name!r}) is not "
                            f"an item of {dataset.name} ({len(missing)} such items); "
                            f"use an episode file made for this dataset ({MAKE_ONE})")
        wrong = [item for item in group if owner[item] != name]
        if wrong:
            raise TintError(f"{where}: {part} item {wrong[0]!r} is filed under class {name!r} "
                            f"but belongs to class {owner[wrong[0]]!r} in {dataset.name} "
                            f"({len(wrong)} such items in that class); it would be scored "
                            f"against the wrong label: fix the file or {MAKE_ONE}")


def _class_index(dataset: FewShotDataset) -> dict[str, str]:
    """item id -> class, built once per dataset (it is shared by every check)."""
    index = getattr(dataset, "_episode_class_index", None)
    if index is None:
        index = {item: name for name, items in dataset.items.items() for item in items}
        dataset._episode_class_index = index  # type: ignore[attr-defined]
    return index


def _check_disjoint(episode: Episode, where: str) -> None:
    support = {item for group in episode.support for item in group}
    shared = [item for group in episode.query for item in group if item in support]
    if shared:
        raise TintError(f"{where}: query item {shared[0]!r} is also a support item "
                        f"({len(shared)} such items); support and query must be disjoint")


def check_not_in_base(
    episodes: list[Episode],
    dataset: FewShotDataset,
    source: str,
    base_items: Sequence[str],
    base_split: str | None = None,
) -> None:
    """Refuse episodes whose classes are base classes, or whose images are in the base
    pool: the teacher meta-trains and the students distil on those, so accuracy on
    such queries measures memory, not few-shot learning."""
    base_classes = set(dataset.classes(base_split)) if base_split is not None else set()
    split_hint = f"data.base_split={base_split!r}" if base_split is not None else "the base split"
    for i, episode in enumerate(episodes):
        overlap = [name for name in episode.classes if name in base_classes]
        if overlap:
            raise TintError(
                f"{source}: episode {i} evaluates class(es) {', '.join(map(repr, overlap))}, "
                f"which are base classes ({split_hint}) the teacher and students train on; "
                "evaluate on other classes (e.g. data.split=novel) or choose another "
                "data.base_split"
            )
    pool = set(base_items)
    for i, episode in enumerate(episodes):
        for part, groups in (("support", episode.support), ("query", episode.query)):
            leaked = [item for group in groups for item in group if item in pool]
            if leaked:
                raise TintError(
                    f"{source}: episode {i}: {part} image {leaked[0]!r} is also in the "
                    f"distillation pool of this run ({len(leaked)} such images); evaluate "
                    "on classes outside data.base_split (e.g. data.split=novel)"
                )
