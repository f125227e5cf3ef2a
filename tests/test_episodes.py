"""Episode sampling, the episode file format, and the `tint episodes` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import write_folder_tree

from tint.cli import main
from tint.data import load_dataset, load_episodes, sample_episodes, save_episodes
from tint.data.episodes import Episode, check_episodes
from tint.errors import TintError

DEMO_FILE = (
    Path(__file__).parents[1] / "tint" / "assets" / "episodes" / "openclipart-novel-5w5s.json"
)


@pytest.fixture()
def dataset(tmp_path: Path):
    sizes = {f"class_{c}": 8 + c for c in range(7)}  # 8..14 images per class
    root = write_folder_tree(tmp_path / "ds", sizes)
    return load_dataset(f"folder:{root}", resolution=8)


def test_support_and_query_are_disjoint_and_sized(dataset) -> None:
    episodes = sample_episodes(
        dataset, "novel", n_way=5, k_shot=3, n_query=4, n_episodes=20, seed=1
    )
    assert len(episodes) == 20
    for ep in episodes:
        assert len(ep.classes) == 5 == len(set(ep.classes))
        for name, support, query in zip(ep.classes, ep.support, ep.query, strict=True):
            assert len(support) == 3 and len(query) == 4
            assert not set(support) & set(query)
            assert set(support + query) <= set(dataset.items[name])
    used = {c for ep in episodes for c in ep.classes}
    assert used == set(dataset.classes("novel"))  # 20 draws of 5 from 7 reach every class


def test_all_remaining_queries(dataset) -> None:
    (ep,) = sample_episodes(dataset, "novel", n_way=7, k_shot=5, n_query=None, seed=0)
    for name, support, query in zip(ep.classes, ep.support, ep.query, strict=True):
        assert sorted(support + query) == sorted(dataset.items[name])
    items, labels = ep.labelled("query")
    assert len(items) == len(labels) == sum(len(q) for q in ep.query)
    assert labels[0] == 0 and labels[-1] == 6


def test_reproducible_by_seed(dataset) -> None:
    def draw(seed):
        return sample_episodes(dataset, n_way=5, k_shot=2, n_query=3, n_episodes=5, seed=seed)

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert draw(7)[0] != draw(7)[1]  # episodes within one list differ too


def test_too_many_shots_is_a_clear_error(dataset) -> None:
    with pytest.raises(TintError, match=r"10 shots \+ 2 queries = 12.*'class_0' has 8") as info:
        sample_episodes(dataset, n_way=5, k_shot=10, n_query=2)
    assert "'class_3' has 11" in str(info.value) and "class_4" not in str(info.value)
    with pytest.raises(TintError, match="at least 1 query"):
        sample_episodes(dataset, n_way=5, k_shot=8, n_query=None)
    with pytest.raises(TintError, match="has 7 classes, fewer than the 8"):
        sample_episodes(dataset, n_way=8)
    with pytest.raises(TintError, match="has 0 classes"):
        sample_episodes(dataset, split="base")


def test_episode_file_round_trip_and_validation(dataset, tmp_path: Path) -> None:
    episodes = sample_episodes(dataset, n_way=3, k_shot=2, n_query=None, n_episodes=4, seed=3)
    path = tmp_path / "eps.json"
    save_episodes(path, episodes, {"dataset": dataset.spec, "seed": 3})
    loaded, meta = load_episodes(path)
    assert loaded == episodes and meta == {"dataset": dataset.spec, "seed": 3}
    check_episodes(loaded, load_dataset(meta["dataset"]), str(path))

    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(TintError, match="version 99"):
        load_episodes(path)
    data["version"] = 1
    data["episodes"][0]["query"][0].append(data["episodes"][0]["support"][0][0])
    path.write_text(json.dumps(data))
    with pytest.raises(TintError, match="episode 0: item .* used twice"):
        load_episodes(path)
    data["episodes"][0]["query"] = data["episodes"][0]["query"][:1]
    path.write_text(json.dumps(data))
    with pytest.raises(TintError, match="one list per class"):
        load_episodes(path)
    path.write_text("{}")
    with pytest.raises(TintError, match="not a tint episode file"):
        load_episodes(path)

    stray = Episode(classes=["class_0"], support=[["class_1/img_000.png"]], query=[[]])
    with pytest.raises(TintError, match="filed under class 'class_0' but belongs to class 'class_1'"):
        check_episodes([stray], dataset)


def test_cli_writes_episode_file(dataset, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.json"
    argv = [
        "episodes",
        "--dataset",
        dataset.spec,
        "--way",
        "4",
        "--shot",
        "2",
        "--query",
        "3",
        "--episodes",
        "6",
        "--seed",
        "5",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "6 episodes" in capsys.readouterr().out
    episodes, meta = load_episodes(out)
    assert meta["n_query"] == 3 and meta["dataset"] == dataset.spec and len(episodes) == 6
    assert episodes == sample_episodes(dataset, "novel", 4, 2, 3, 6, seed=5)
    assert main(argv[:-2] + ["--query", "all", "--out", str(tmp_path / "all.json")]) == 0
    assert load_episodes(tmp_path / "all.json")[1]["n_query"] == "all"

    assert main(["episodes", "--dataset", dataset.spec, "--shot", "20", "--out", str(out)]) == 2
    assert "shots" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["episodes", "--query", "lots", "--out", str(out)])


def test_committed_demo_episodes_match_openclipart() -> None:
    episodes, meta = load_episodes(DEMO_FILE)
    assert meta["dataset"] == "openclipart" and meta["split"] == "novel" and len(episodes) == 10
    ds = load_dataset("openclipart")
    check_episodes(episodes, ds, str(DEMO_FILE))
    assert all(len(s) == 5 for ep in episodes for s in ep.support)
    again = sample_episodes(ds, "novel", n_way=5, k_shot=5, n_query=None, n_episodes=10, seed=0)
    assert again == episodes  # the committed file is exactly what `tint episodes` writes
