"""Build a small labelled-photo folder from the Debian openclipart package (`make setup`
installs it), so `tint fit` / `tint predict` can be tried on a fresh clone with no download.

    .venv/bin/python examples/make_clipart_example.py            # -> examples/clipart/
    .venv/bin/tint fit examples/clipart/train --out models/clipart
    .venv/bin/tint predict models/clipart examples/clipart/test

It takes the classes of episode 0 of the committed openclipart episode file (novel
classes: none of them is in the embedded generator's training data or the default
unlabelled pool), writes its 5 support images per class to ``train/<class>/`` and
`--test` of the remaining images per class to ``test/<class>/``, each rendered as an
opaque PNG (transparency over white, cropped to the drawing, padded to a square).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tint.data.episodes import load_episodes
from tint.data.openclipart import load_openclipart
from tint.stage_bodies import resolve_episode_file

EPISODES = "builtin:openclipart-novel-5w5s"


def short_name(category: str) -> str:
    """'people.clothing.hats' -> 'hats' (folder names become the model's labels)."""
    return category.rsplit(".", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "clipart")
    parser.add_argument("--episode", type=int, default=0)
    parser.add_argument("--episodes", default=EPISODES,
                        help="episode file (e.g. configs/experiments/episodes/openclipart-val-5w5s.json "
                             "for val classes); default: the builtin novel episodes")
    parser.add_argument("--test", type=int, default=5, help="test images per class")
    parser.add_argument("--size", type=int, default=128, help="side of the written PNGs")
    args = parser.parse_args()
    dataset = load_openclipart(resolution=args.size)
    episode = load_episodes(resolve_episode_file(args.episodes))[0][args.episode]
    for name, support, query in zip(episode.classes, episode.support, episode.query, strict=True):
        for part, items in (("train", support), ("test", query[: args.test])):
            folder = args.out / part / short_name(name)
            folder.mkdir(parents=True, exist_ok=True)
            for item in items:
                dataset.load(item).save(folder / f"{Path(item).stem}.png")
    print(f"{args.out}/train: {len(episode.classes)} classes x {len(episode.support[0])} images; "
          f"{args.out}/test: up to {args.test} per class")


if __name__ == "__main__":
    main()
