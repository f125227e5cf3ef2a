"""`tint episodes`: sample N-way K-shot episodes from a dataset and write an episode file.

Example (the evaluation protocol of the paper: 120 episodes, all remaining images as
queries)::

    tint episodes --dataset openclipart --split novel --way 5 --shot 5 \\
        --query all --episodes 120 --seed 0 --out episodes.json
"""

from __future__ import annotations

import argparse

from tint.data.datasets import load_dataset
from tint.data.episodes import sample_episodes, save_episodes
from tint.errors import TintError


def parse_query(text: str) -> int | None:
    """'all' -> None (every remaining image), else a non-negative integer."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--query {text!r}: give a number or 'all'") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"--query {text!r}: must be >= 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        default="openclipart",
        help="openclipart, fashion-mnist, folder:<root>, miniimagenet:<root>, cub:<root>, "
        "cifar-fs:<root> (default: openclipart)",
    )
    parser.add_argument("--split", default="novel", choices=["base", "val", "novel"])
    parser.add_argument("--way", type=int, default=5, help="classes per episode (N)")
    parser.add_argument("--shot", type=int, default=5, help="support images per class (K)")
    parser.add_argument(
        "--query",
        type=parse_query,
        default=None,
        help="query images per class, or 'all' for every remaining image (default: all)",
    )
    parser.add_argument("--episodes", type=int, default=120, help="number of episodes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=84, help="stored in the file's meta")
    parser.add_argument("--out", required=True, help="episode file to write (JSON)")


def run(args: argparse.Namespace) -> int:
    dataset = load_dataset(args.dataset, resolution=args.resolution)
    if args.episodes < 1:
        raise TintError(f"--episodes {args.episodes}: ask for at least one episode")
    episodes = sample_episodes(
        dataset,
        split=args.split,
        n_way=args.way,
        k_shot=args.shot,
        n_query=args.query,
        n_episodes=args.episodes,
        seed=args.seed,
    )
    meta = {
        "dataset": args.dataset,
        "split": args.split,
        "n_way": args.way,
        "k_shot": args.shot,
        "n_query": "all" if args.query is None else args.query,
        "n_episodes": args.episodes,
        "seed": args.seed,
        "resolution": args.resolution,
        "item_root": dataset.root,
    }
    save_episodes(args.out, episodes, meta)
    n_query = sum(len(q) for ep in episodes for q in ep.query)
    print(
        f"wrote {args.out}: {len(episodes)} episodes, {args.way}-way {args.shot}-shot, "
        f"{n_query} query images in all, from {dataset.summary()}"
    )
    return 0
