"""Loaders of every format on tiny fixtures, broken inputs, colour modes, real openclipart."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import (
    write_cifar_fs,
    write_cub,
    write_fashion_mnist,
    write_folder_tree,
    write_miniimagenet,
    write_png,
)
from PIL import Image

from tint.data import load_dataset, load_image, save_image, to_tensor
from tint.data import openclipart as oc
from tint.data.arrays import safe_unpickle
from tint.data.images import fit_square, to_rgb
from tint.errors import TintError

# ---------------------------------------------------------------- image loading


def test_modes_become_rgb_at_resolution(tmp_path: Path) -> None:
    for mode in ("L", "1", "P", "CMYK", "RGBA", "LA", "I;16"):
        path = tmp_path / f"img_{mode.replace(';', '')}.{'tif' if mode == 'CMYK' else 'png'}"
        if mode == "I;16":
            Image.fromarray(np.full((10, 12), 65535, dtype=np.uint16)).save(path)
        else:
            write_png(path, seed=1, size=(30, 20), mode=mode)
        img = load_image(path, resolution=16)
        assert img.mode == "RGB" and img.size == (16, 16), mode
    white16 = np.asarray(load_image(tmp_path / "img_I16.png", resolution=None))
    assert white16.min() == 255  # 16-bit white stays white, not clipped to a wrong value


def test_transparency_composited_over_white_and_cropped(tmp_path: Path) -> None:
    canvas = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    canvas.paste(Image.new("RGBA", (10, 20), (255, 0, 0, 255)), (40, 30))
    path = tmp_path / "clip.png"
    canvas.save(path)
    full = np.asarray(load_image(path, resolution=None))
    assert full.shape == (100, 100, 3) and tuple(full[0, 0]) == (255, 255, 255)
    cropped = load_image(path, resolution=None, crop_alpha=True)
    assert cropped.size == (10, 20) and tuple(np.asarray(cropped)[5, 5]) == (255, 0, 0)
    assert oc.crop_to_alpha(canvas).size == (10, 20)
    # palette with a transparent index is composited too
    pal = canvas.convert("P")
    pal.info["transparency"] = pal.getpixel((0, 0))
    assert tuple(np.asarray(to_rgb(pal))[0, 0]) == (255, 255, 255)


def test_fit_modes_keep_or_ignore_aspect() -> None:
    wide = Image.new("RGB", (40, 10), (0, 0, 0))
    padded = np.asarray(fit_square(wide, 20, "pad"))
    assert padded.shape == (20, 20, 3)
    assert padded[0, 10].tolist() == [255, 255, 255] and padded[10, 10].tolist() == [0, 0, 0]
    assert np.asarray(fit_square(wide, 20, "crop")).max() == 0  # the crop is all object
    assert fit_square(wide, 20, "stretch").size == (20, 20)
    with pytest.raises(TintError, match="fit"):
        fit_square(wide, 20, "zoom")


def test_broken_files_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = write_png(tmp_path / "good.png", seed=0, size=(64, 64))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path, pattern in [
        (truncated, "corrupt"),
        (text, "not an image"),
        (empty, "empty file"),
        (tmp_path / "missing.png", "not found"),
        (tmp_path, "not a file"),
    ]:
        with pytest.raises(TintError, match=pattern) as info:
            load_image(path)
        assert str(path) in str(info.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 2 + 1)  # warning zone (1x-2x)
    with pytest.raises(TintError, match="decompression-bomb") as info:
        load_image(good)
    assert "good.png" in str(info.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # error zone (> 2x)
    with pytest.raises(TintError, match="too large"):
        load_image(good)


def test_tensor_round_trip_through_png(tmp_path: Path) -> None:
    x = torch.rand(1, 3, 8, 8)
    out = save_image(tmp_path / "sub" / "x.png", x)
    back = to_tensor(load_image(out, resolution=None))
    assert back.shape == (1, 3, 8, 8) and back.dtype == torch.float32
    assert torch.allclose(back, x, atol=1 / 255 + 1e-6)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(TintError, match="differ in size"):
        to_tensor([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))])


# ---------------------------------------------------------------- folder datasets


def test_folder_without_splits_is_all_novel(tmp_path: Path) -> None:
    root = write_folder_tree(tmp_path / "ds", {"cat": 3, "dog": 4})
    (root / "dog" / "readme.txt").write_text("ignored: not an image suffix")
    ds = load_dataset(f"folder:{root}", resolution=12)
    assert ds.classes("novel") == ["cat", "dog"] and ds.classes("base") == []
    assert ds.items["dog"] == [f"dog/img_{i:03d}.png" for i in range(4)]  # relative, sorted
    x = ds.load_tensor(ds.items["cat"])
    assert x.shape == (3, 3, 12, 12) and 0 <= x.min() and x.max() <= 1
    assert ds.spec == f"folder:{root}" and ds.class_of("dog/img_001.png") == "dog"


def test_folder_split_files_txt_and_json(tmp_path: Path) -> None:
    root = write_folder_tree(tmp_path / "ds", {"a": 2, "b": 2, "c": 2, "d": 2})
    (root / "splits").mkdir()
    (root / "splits" / "base.txt").write_text("# base classes\na\nb\n")
    (root / "splits" / "novel.txt").write_text("d\n")
    ds = load_dataset(f"folder:{root}")
    assert ds.splits == {"base": ["a", "b"], "novel": ["d"]} and ds.classes("val") == []
    (root / "splits.json").write_text('{"base": ["a"], "val": ["b"], "novel": ["c", "d"]}')
    assert load_dataset(f"folder:{root}").classes("novel") == ["c", "d"]


def test_folder_errors(tmp_path: Path) -> None:
    root = write_folder_tree(tmp_path / "ds", {"a": 2, "b": 2})
    (root / "splits").mkdir()
    (root / "splits" / "novel.txt").write_text("a\nzebra\n")
    with pytest.raises(TintError, match="'zebra'.*not in the data") as info:
        load_dataset(f"folder:{root}")
    assert "novel.txt" in str(info.value)
    (root / "splits" / "novel.txt").write_text("a\nb\na\n")
    with pytest.raises(TintError, match="duplicate.*'a' twice"):
        load_dataset(f"folder:{root}")
    (root / "splits" / "novel.txt").write_text("a\n")
    (root / "splits" / "base.txt").write_text("a\n")
    with pytest.raises(TintError, match="both split"):
        load_dataset(f"folder:{root}")

    empty_root = write_folder_tree(tmp_path / "e", {"a": 2})
    (empty_root / "hollow").mkdir()
    with pytest.raises(TintError, match="hollow.*no images"):
        load_dataset(f"folder:{empty_root}")

    dup_root = write_folder_tree(tmp_path / "d", {"Cat": 1, "cat": 1})
    with pytest.raises(TintError, match="duplicate class name 'Cat' and 'cat'"):
        load_dataset(f"folder:{dup_root}")
    with pytest.raises(TintError, match="not found"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}")
    with pytest.raises(TintError, match="unknown kind"):
        load_dataset("imagenet21k:/x")


def test_corrupt_item_in_dataset_names_file(tmp_path: Path) -> None:
    root = write_folder_tree(tmp_path / "ds", {"a": 2})
    (root / "a" / "fake.jpg").write_text("hello")
    ds = load_dataset(f"folder:{root}")
    with pytest.raises(TintError, match="fake.jpg"):
        ds.load_tensor(ds.items["a"])


# ---------------------------------------------------------------- standard formats


def test_miniimagenet_csv_layout(tmp_path: Path) -> None:
    splits = {"train": ["n01", "n02", "n03"], "val": ["n04"], "test": ["n05", "n06"]}
    root = write_miniimagenet(tmp_path / "mini", splits, n_images=3)
    ds = load_dataset(f"miniimagenet:{root}", resolution=10)
    assert ds.splits == {"base": ["n01", "n02", "n03"], "val": ["n04"], "novel": ["n05", "n06"]}
    assert ds.items["n05"] == [f"images/n05{i:08d}.jpg" for i in range(3)]
    assert ds.load_tensor(ds.items["n05"][:2]).shape == (2, 3, 10, 10)


def test_miniimagenet_errors(tmp_path: Path) -> None:
    root = write_miniimagenet(tmp_path / "m", {"train": ["n1"], "val": ["n2"], "test": ["n3"]}, 2)
    (root / "val.csv").write_text("filename,label\nn200000000.jpg,n1\n")
    with pytest.raises(TintError, match="'n1' is also in") as info:
        load_dataset(f"miniimagenet:{root}")
    assert "val.csv" in str(info.value)
    (root / "val.csv").write_text("file,class\n")
    with pytest.raises(TintError, match="val.csv: expected the header"):
        load_dataset(f"miniimagenet:{root}")
    (root / "val.csv").write_text("filename,label\nghost.jpg,n2\n")
    with pytest.raises(TintError, match="val.csv:2: image ghost.jpg not found"):
        load_dataset(f"miniimagenet:{root}")
    (root / "val.csv").unlink()
    with pytest.raises(TintError, match="val.csv: split CSV not found"):
        load_dataset(f"miniimagenet:{root}")


def test_cub_default_and_file_splits(tmp_path: Path) -> None:
    root = write_cub(tmp_path / "CUB_200_2011", n_classes=8, n_images=2)
    ds = load_dataset(f"cub:{root}", resolution=8)
    names = sorted(ds.items)
    assert ds.splits["base"] == names[0::2]  # Chen et al. 2019: even indices base
    assert ds.splits["val"] == [names[1], names[5]] and ds.splits["novel"] == [names[3], names[7]]
    assert ds.items[names[0]][0].startswith("images/001.Bird_0/")
    (root / "base.txt").write_text("\n".join(names[:4]))
    (root / "novel.txt").write_text("\n".join(names[4:]))
    ds = load_dataset(f"cub:{root}")
    assert ds.classes("novel") == names[4:] and ds.classes("val") == []
    (root / "novel.txt").write_text("999.Dodo\n")
    with pytest.raises(TintError, match="novel.txt.*'999.Dodo'"):
        load_dataset(f"cub:{root}")


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_fs_pickles(tmp_path: Path, protocol: int) -> None:
    names = ["apple", "bear", "cloud", "dolphin", "maple_tree", "rocket"]
    root = write_cifar_fs(tmp_path / "cifar", names, per_class=3, protocol=protocol)
    ds = load_dataset(f"cifar-fs:{root}", resolution=32)
    assert ds.splits == {"base": names[:2], "val": names[2:4], "novel": names[4:]}
    assert len(ds.items["rocket"]) == 4  # 3 train + 1 test
    assert ds.items["apple"][0] == "cifar-100-python/train#0"
    x = ds.load_tensor(ds.items["rocket"])
    assert x.shape == (4, 3, 32, 32)
    raw = safe_unpickle(root / "cifar-100-python" / "train")[b"data"]
    expected = torch.from_numpy(raw[15].reshape(3, 32, 32)).float() / 255  # rocket: index 15
    assert torch.allclose(x[0], expected)


def test_cifar_fs_errors(tmp_path: Path) -> None:
    names = ["apple", "bear", "cloud"]
    root = write_cifar_fs(
        tmp_path / "c", names, splits={"train": ["apple"], "val": ["bear"], "test": ["comet"]}
    )
    with pytest.raises(TintError, match="test.txt.*'comet'"):
        load_dataset(f"cifar-fs:{root}")
    dup = write_cifar_fs(tmp_path / "d", ["apple", "apple", "cloud"])
    with pytest.raises(TintError, match="meta: duplicate class name"):
        load_dataset(f"cifar-fs:{dup}")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_unpickler_refuses_code(tmp_path: Path) -> None:
    evil = tmp_path / "meta"
    evil.write_bytes(pickle.dumps({b"fine_label_names": [_Evil()]}))
    with pytest.raises(TintError, match="refusing to load global"):
        safe_unpickle(evil)
    objects = tmp_path / "objects"
    objects.write_bytes(pickle.dumps({b"data": np.array([io.BytesIO], dtype=object)}))
    with pytest.raises(TintError, match="refusing|not allowed"):
        safe_unpickle(objects)


def test_fashion_mnist_idx(tmp_path: Path) -> None:
    root = write_fashion_mnist(tmp_path / "fm", per_class=3)
    ds = load_dataset(f"fashion-mnist:{root}", resolution=28)
    assert ds.classes("novel") == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert len(ds.classes("base")) == 5 and ds.classes("val") == []
    assert ds.items["Bag"] == [
        "train-images-idx3-ubyte.gz#24",
        "train-images-idx3-ubyte.gz#25",
        "train-images-idx3-ubyte.gz#26",
        "t10k-images-idx3-ubyte.gz#8",
    ]
    img = np.asarray(ds.load("train-images-idx3-ubyte.gz#25"))
    assert img.shape == (28, 28, 3) and img[0, 0, 0] == 25  # the fingerprint of index 25
    with pytest.raises(TintError, match="out of range"):
        ds.load("train-images-idx3-ubyte.gz#999")
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(TintError, match="t10k-labels.*corrupt gzip"):
        load_dataset(f"fashion-mnist:{root}")


# ---------------------------------------------------------------- real openclipart


def test_committed_openclipart_split_matches_scan() -> None:
    split = oc.load_split()
    eligible = oc.eligible_categories()
    assert len(eligible) >= 30
    usable = oc.usable_categories()
    named = split["base"] + split["val"] + split["novel"]
    assert len(named) == len(set(named)), "base/val/novel must be disjoint"
    assert sorted(named) == eligible
    assert all(len(usable[c]) >= oc.MIN_IMAGES for c in named)
    assert len(split["val"]) >= 5 and len(split["novel"]) >= 5
    recomputed = oc.make_split(eligible)
    assert {k: recomputed[k] for k in ("base", "val", "novel")} == split
    scan = oc.scan_openclipart()
    files = [f for fs in scan.values() for f in fs]
    assert len(files) == len(set(files)) and not any(Path(f).is_symlink() for f in files)
    pool = oc.pretraining_pool(split)
    assert not set(pool) & set(split["val"] + split["novel"])
    assert not any(oc.is_abstract(c) for c in pool) and set(split["base"]) <= set(pool)
    ds = load_dataset("openclipart")
    item = ds.items[split["novel"][0]][0]
    assert not Path(item).is_absolute() and ds.load(item).size == (84, 84)
