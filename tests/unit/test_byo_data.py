"""Your own data (prunekit.zoo.userdata via get_loaders): image folders, .npz, .pt and .csv files, their
options, the record a saved model keeps of them, and the errors for bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from prunekit.errors import PrunekitError
from prunekit.zoo.data import data_record, get_loaders, recorded_options
from prunekit.zoo.userdata import IMAGENET_MEAN, DataOptions, is_user_data, load_user_data

COLOURS = {"blue": (20, 20, 220), "green": (20, 220, 20), "red": (220, 20, 20)}


def _images(folder, per_class=5, size=(6, 4), mode="RGB", classes=COLOURS):
    for name, rgb in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", size, rgb).convert(mode).save(folder / name / f"{i}.png")
    return folder


def _all(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ----------------------------------------------------------------------------- image folders
def test_image_folder_is_split_per_class_and_normalised_with_imagenet_stats(tmp_path):
    folder = _images(tmp_path / "imgs")
    train, test, info = get_loaders(str(folder), batch_size=4)
    assert info["classes"] == ["blue", "green", "red"] and info["num_classes"] == 3
    assert info["input_shape"] == (3, 4, 6) and (info["n_train"], info["n_test"]) == (12, 3)
    assert info["mean"] == pytest.approx(IMAGENET_MEAN)
    xte, yte = _all(test)
    assert sorted(yte.tolist()) == [0, 1, 2]   # every class held out once
    red = xte[yte == 2][0, :, 0, 0]            # (220, 20, 20) / 255, ImageNet-normalised
    expected = (torch.tensor([220, 20, 20]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(red, expected, atol=1e-5)


def test_grayscale_folder_with_train_test_split_and_resize(tmp_path):
    _images(tmp_path / "d" / "train", mode="L", size=(10, 10))
    _images(tmp_path / "d" / "val", per_class=2, mode="L", size=(7, 9))
    train, test, info = get_loaders(str(tmp_path / "d"), options=DataOptions(input_size="8,6"))
    assert info["input_shape"] == (1, 8, 6) and (info["n_train"], info["n_test"]) == (15, 6)
    xtr, _ = _all(train)
    assert abs(float(xtr.mean())) < 1e-5   # auto: the training split's own statistics


@pytest.mark.parametrize("make, message", [
    (lambda p: _images(p, classes={"only": (1, 2, 3)}), "one sub-folder per class \\(at least 2\\)"),
    (lambda p: (_images(p), (p / "empty").mkdir()), "class folder .*empty has no images"),
    (lambda p: (_images(p), Image.new("RGB", (9, 9)).save(p / "red" / "big.png")),
     "is 9x9 pixels but .* is 6x4: give --input-size"),
    (lambda p: (_images(p), (p / "red" / "broken.png").write_bytes(b"not a png")), "broken.png is not a readable image"),
])
def test_bad_image_folders_are_refused_naming_the_problem(tmp_path, make, message):
    folder = tmp_path / "imgs"
    folder.mkdir()
    make(folder)
    with pytest.raises(PrunekitError, match=message):
        get_loaders(str(folder))


def test_a_missing_path_is_not_taken_for_data(tmp_path):
    assert not is_user_data(str(tmp_path / "nope"))        # a folder that is not there: not your data
    with pytest.raises(PrunekitError, match="does not exist; allowed: mnist, digits, idx:<dir>, an image folder"):
        load_user_data(str(tmp_path / "nope.npz"))


# ----------------------------------------------------------------------------- arrays
def test_npz_with_x_and_y_is_held_out_and_uint8_scaled(tmp_path):
    x = np.arange(20 * 2 * 3 * 3, dtype=np.uint8).reshape(20, 2, 3, 3)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 4)
    train, test, info = get_loaders(str(tmp_path / "d.npz"), options=DataOptions(mean="0", std="1"))
    assert info["input_shape"] == (2, 3, 3) and info["num_classes"] == 4 and info["n_test"] == 4
    xtr, _ = _all(train)
    assert float(xtr.max()) <= 1.0 and info["mean"] == [0.0, 0.0]


def test_npz_and_pt_with_train_test_splits(tmp_path):
    arrays = {"x_train": np.random.rand(10, 5).astype(np.float32), "y_train": np.arange(10) % 2,
              "x_test": np.random.rand(4, 5).astype(np.float32), "y_test": np.array([0, 1, 1, 0])}
    np.savez(tmp_path / "d.npz", **arrays)
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp_path / "d.pt")
    for name in ("d.npz", "d.pt"):
        _, test, info = get_loaders(str(tmp_path / name))
        assert (info["n_train"], info["n_test"], info["input_shape"]) == (10, 4, (5,))
        assert _all(test)[1].tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((4, 2)), "labels": np.zeros(4)}, "holds \\['images', 'labels'\\]; expected the arrays x and y"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(3)}, "x has 4 rows but y has 3 labels"),
    ({"x": np.zeros((4, 2)), "y": np.array([0, 1, -1, 0])}, "labels must be >= 0"),
    ({"x": np.zeros((4, 2)), "y": np.array([0, 1.5, 1, 0])}, "labels must be whole numbers"),
    ({"x": np.array(["a", "b"]), "y": np.array([0, 1])}, "x: must hold numbers"),
    ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(4), "x_test": np.zeros((2, 3)), "y_test": np.zeros(2)},
     "x_train examples are \\(2,\\) but x_test examples are \\(3,\\)"),
])
def test_bad_npz_files_are_refused_naming_the_problem(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(PrunekitError, match=message):
        get_loaders(str(tmp_path / "d.npz"))


def test_npz_object_arrays_and_pickled_pt_files_are_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    with pytest.raises(PrunekitError, match="object arrays are refused"):
        get_loaders(str(tmp_path / "d.npz"))
    torch.save({"x": torch.zeros(2, 2), "y": torch.zeros(2), "why": DataOptions()}, tmp_path / "d.pt")
    with pytest.raises(PrunekitError, match="refused: it is not a weights-only file"):
        get_loaders(str(tmp_path / "d.pt"))
    torch.save([torch.zeros(2)], tmp_path / "l.pt")
    with pytest.raises(PrunekitError, match="must hold a dict of tensors"):
        get_loaders(str(tmp_path / "l.pt"))


# ----------------------------------------------------------------------------- CSV
def test_csv_with_named_classes_and_a_label_column(tmp_path):
    rows = ["a,kind,b"] + [f"{i},{'cat' if i % 2 else 'dog'},{i * 2}" for i in range(10)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    _, _, info = get_loaders(str(tmp_path / "t.csv"), options=DataOptions(label_column="kind"))
    assert info["classes"] == ["cat", "dog"] and info["input_shape"] == (2,) and info["n_train"] + info["n_test"] == 10
    (tmp_path / "n.csv").write_text("f1,f2\n" + "".join(f"{i}.5,{i % 3}\n" for i in range(9)))
    _, _, info = get_loaders(str(tmp_path / "n.csv"))   # default label column: the last
    assert info["classes"] is None and info["num_classes"] == 3 and info["input_shape"] == (1,)


@pytest.mark.parametrize("text, options, message", [
    ("a,label\n1,0\nx,1\n", {}, "line 3, column 'a': 'x' is not a number"),
    ("a,label\n1,0\n2,1\n", {"label_column": "y"}, "no column 'y'; columns: a, label"),
    ("a,label\n1,0\n2\n", {}, "line 3 has a different number of columns"),
    ("a,label\n", {}, "needs a header row and at least one data row"),
])
def test_bad_csv_files_are_refused_naming_the_problem(tmp_path, text, options, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(PrunekitError, match=message):
        get_loaders(str(tmp_path / "t.csv"), options=DataOptions(**options))


# ----------------------------------------------------------------------------- options and records
@pytest.mark.parametrize("options, message", [
    ({"input_size": "0"}, "input_size='0' must be H or H,W"),
    ({"mean": "0.5"}, "give mean and std together"),
    ({"mean": "auto", "std": "imagenet"}, "give mean and std together"),
    ({"mean": "x", "std": "1"}, "mean='x' must be auto or imagenet, or numbers"),
    ({"mean": "0", "std": "0"}, "std=\\(0.0,\\) must be positive"),
    ({"test_fraction": 1.5}, "test_fraction=1.5 must be a fraction"),
])
def test_bad_data_options(options, message):
    with pytest.raises(PrunekitError, match=message):
        DataOptions(**options)


def test_option_mismatches_with_the_data(tmp_path):
    _images(tmp_path / "g", mode="L")
    with pytest.raises(PrunekitError, match="'imagenet' are for 3-channel images; the data has 1"):
        get_loaders(str(tmp_path / "g"), options=DataOptions(mean="imagenet", std="imagenet"))
    with pytest.raises(PrunekitError, match="mean has 2 values but the data has 1 channels"):
        get_loaders(str(tmp_path / "g"), options=DataOptions(mean="0,0", std="1,1"))
    with pytest.raises(PrunekitError, match="not the bundled dataset 'digits'"):
        get_loaders("digits", options=DataOptions(input_size=8))


def test_the_saved_record_reads_the_data_again_the_same_way(tmp_path):
    folder = _images(tmp_path / "imgs", size=(9, 9))
    options = DataOptions(input_size=4, mean="auto", std="auto")
    _, test, info = get_loaders(str(folder), seed=3, options=options)
    record = data_record(info)
    assert record["classes"] == ["blue", "green", "red"] and record["split_seed"] == 3
    again = recorded_options(record)
    assert again.input_size == (4, 4) and again.mean == tuple(info["mean"])
    _, test2, info2 = get_loaders(str(folder), seed=3, options=again)
    assert torch.allclose(_all(test)[0], _all(test2)[0], atol=1e-5)
    assert recorded_options(data_record(get_loaders("digits", limit_train=10)[2])) is None
