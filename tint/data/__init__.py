"""Few-shot data: datasets, image loading and episodes (decisions in docs/datasets.md).

from tint.data import load_dataset, sample_episodes
ds = load_dataset("openclipart")                  # or "folder:<root>", "cub:<root>", ...
episodes = sample_episodes(ds, "novel", n_way=5, k_shot=5, n_query=None, n_episodes=10)
x = ds.load_tensor(episodes[0].support[0])        # float32 [K, 3, 84, 84] in [0, 1]
"""

from tint.data.datasets import FewShotDataset, load_dataset
from tint.data.episodes import Episode, load_episodes, sample_episodes, save_episodes
from tint.data.images import load_image, save_image, to_tensor

__all__ = [
    "Episode",
    "FewShotDataset",
    "load_dataset",
    "load_episodes",
    "load_image",
    "sample_episodes",
    "save_episodes",
    "save_image",
    "to_tensor",
]
