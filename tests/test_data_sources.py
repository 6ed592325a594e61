"""The data sources beyond digits and text: MNIST-1D with shifts, image folders, Parquet files and
``save_to_disk`` Arrow folders, feature standardisation, and the small-client warning's text."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmoe.data import DataSpec
from fedmoe.data.mnist1d import MNIST1D_SHIFTS, mnist1d_shift, shift_signal
from fedmoe.data.spec import option_problem
from fedmoe.data.standardize import standardized
from fedmoe.errors import InputError, UsageError
from fedmoe.io import datasets
from fedmoe.io.datasets import load_dataset, raw_mnist1d
from fedmoe.io.images import load_image_folder
from fedmoe.partition import ClientSplit
from fedmoe.partition.small import small_clients

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
Image = pytest.importorskip("PIL.Image")


def _without(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``package`` look uninstalled to ``importlib.util.find_spec``."""
    real = importlib.util.find_spec

    def fake(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == package else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


# ---------------------------------------------------------------------------------------------
# MNIST-1D


@pytest.fixture(scope="module")
def mnist1d_raw() -> tuple[np.ndarray, np.ndarray]:
    pytest.importorskip("mnist1d")
    return raw_mnist1d()


def test_mnist1d_raw_is_generated_deterministically_and_leaves_global_rngs_alone(
    mnist1d_raw: tuple[np.ndarray, np.ndarray],
) -> None:
    np.random.seed(123)
    random.seed(123)
    want_np, want_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    again = raw_mnist1d.__wrapped__()  # a fresh generation, not the per-process copy
    assert np.random.rand() == want_np and random.random() == want_py
    x, y = mnist1d_raw
    assert x.shape == (16_000, 40) and y.shape == (16_000,)
    assert np.bincount(y).tolist() == [1600] * 10
    assert again[0].tobytes() == x.tobytes() and again[1].tobytes() == y.tobytes()
    assert not x.flags.writeable  # the per-process copy cannot be changed by a caller


def test_mnist1d_shift_transforms_each_domain_as_documented(
    mnist1d_raw: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = mnist1d_raw
    d = load_dataset(DataSpec("mnist1d-shift"))
    assert d.name == "mnist1d-shift" and d.input_shape == (40,) and d.x.dtype == np.float32
    assert d.domain_names == MNIST1D_SHIFTS == ("plain", "reversed", "negated", "rev-neg")
    assert np.bincount(d.domain).tolist() == [4000] * 4
    np.testing.assert_array_equal(d.y, y)
    for i in (int(np.flatnonzero(d.domain == k)[0]) for k in range(4)):
        raw = x[i].astype(np.float32)
        want = {0: raw, 1: raw[::-1], 2: -raw, 3: -raw[::-1]}[int(d.domain[i])]
        np.testing.assert_array_equal(d.x[i], want)
    assert d.fingerprint() == load_dataset(DataSpec("mnist1d-shift")).fingerprint()


def test_shift_signal_by_hand() -> None:
    s = np.array([[1.0, 2.0, 3.0]])
    assert shift_signal(s, 0).tolist() == [[1, 2, 3]]
    assert shift_signal(s, 1).tolist() == [[3, 2, 1]]
    assert shift_signal(s, 2).tolist() == [[-1, -2, -3]]
    assert shift_signal(s, 3).tolist() == [[-3, -2, -1]]
    assert s.tolist() == [[1, 2, 3]]  # the input is not changed


def test_mnist1d_shift_is_pure_on_small_input() -> None:
    signals = np.arange(8 * 3, dtype=np.float64).reshape(8, 3)
    labels = np.arange(8, dtype=np.int64) % 2
    d = mnist1d_shift(signals, labels)
    assert np.bincount(d.domain).tolist() == [2, 2, 2, 2]
    for i in range(8):
        np.testing.assert_array_equal(d.x[i], shift_signal(signals[i : i + 1], d.domain[i])[0])


def test_mnist1d_missing_package_is_one_line_with_the_pip_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without(monkeypatch, "mnist1d")
    with pytest.raises(InputError, match="needs the mnist1d package") as info:
        raw_mnist1d.__wrapped__()
    assert "pip install mnist1d" in (info.value.hint or "")


# ---------------------------------------------------------------------------------------------
# image folders


def _png(path: Path, pixels: list[list[tuple[int, ...]]] | np.ndarray, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode).save(path)
    return path


def _solid(path: Path, colour: tuple[int, int, int], size: int = 8) -> Path:
    return _png(path, np.full((size, size, 3), colour, dtype=np.uint8))


def test_image_folder_pixels_names_and_order(tmp_path: Path) -> None:
    root = tmp_path / "office"
    quad = [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (255, 255, 255)]]
    _png(root / "amazon" / "bike" / "a.png", quad)
    _solid(root / "amazon" / "cup" / "b.PNG", (51, 102, 204), size=2)
    _solid(root / "webcam" / "cup" / "c.png", (0, 0, 0), size=2)  # webcam has no bike
    d = load_image_folder(root, image_size=2)
    assert d.x.shape == (3, 3, 2, 2) and d.x.dtype == np.float32
    # channels-first, scaled to [0, 1]; same size, so no resampling
    np.testing.assert_array_equal(d.x[0, 0], [[1, 0], [0, 1]])  # R
    np.testing.assert_array_equal(d.x[0, 1], [[0, 1], [0, 1]])  # G
    np.testing.assert_array_equal(d.x[0, 2], [[0, 0], [1, 1]])  # B
    np.testing.assert_allclose(d.x[1, :, 0, 0], [0.2, 0.4, 0.8], atol=1e-7)
    assert d.class_names == ("bike", "cup") and d.y.tolist() == [0, 1, 1]
    assert d.domain_names == ("amazon", "webcam") and d.domain.tolist() == [0, 0, 1]
    assert d.has_domains and d.name == "office"


def test_image_folder_resizes_and_converts_to_grey(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _solid(root / "d" / "a" / "red.png", (255, 0, 0), size=9)
    _png(root / "d" / "b" / "grey.jpg", np.full((5, 7, 3), 100, dtype=np.uint8))
    d = load_image_folder(root, image_size=4, grayscale=True)
    assert d.x.shape == (2, 1, 4, 4)
    # Pillow's L = 0.299 R + 0.587 G + 0.114 B, in integers: red 255 -> 76
    np.testing.assert_array_equal(d.x[0], np.full((1, 4, 4), 76 / 255, dtype=np.float32))
    # a uniform JPEG stays uniform (within JPEG's rounding) whatever the resize
    np.testing.assert_allclose(d.x[1], 100 / 255, atol=2 / 255)
    rgb = load_image_folder(root, image_size=4)
    np.testing.assert_array_equal(rgb.x[0, :, 2, 3], [1, 0, 0])


def test_image_folder_through_load_dataset_with_options(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _solid(root / "d1" / "0" / "a.png", (10, 10, 10))
    _solid(root / "d1" / "10" / "a.png", (20, 20, 20))
    _solid(root / "d2" / "2" / "a.png", (30, 30, 30))
    d = load_dataset(DataSpec(str(root), options={"image_size": 3, "grayscale": True}))
    assert d.input_shape == (1, 3, 3)
    assert d.class_names == ("0", "2", "10")  # numeric names in numeric order, as .npz labels
    assert load_dataset(DataSpec(str(root))).input_shape == (3, 32, 32)  # the default


@pytest.mark.parametrize(
    ("layout", "culprit", "message"),
    [
        ({}, ".", "empty image folder"),
        ({"README.txt": b"hi"}, "README.txt", "outside the image-folder layout"),
        ({"d/notes.png": "img"}, "d/notes.png", "outside the image-folder layout"),
        ({"d/c/sub/x.png": "img"}, "d/c/sub", "outside the image-folder layout"),
        ({"d/c/labels.csv": b"1,2"}, "d/c/labels.csv", "outside the image-folder layout"),
        ({"d/c/x.png": b"not a png at all"}, "d/c/x.png", "not a readable image"),
        ({"d/c/": None}, ".", "no image in any class folder"),
        ({"d/c/x.png": "img"}, ".", "1 class folder"),
    ],
    ids=["empty", "root-file", "domain-file", "class-subfolder", "stray", "corrupt", "no-image",
         "one-class"],
)  # fmt: skip
def test_image_folder_refusals_name_the_file(
    tmp_path: Path, layout: dict[str, Any], culprit: str, message: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / ".DS_Store").write_bytes(b"hidden files are skipped")
    for rel, content in layout.items():
        target = root / rel
        if content is None:
            target.mkdir(parents=True)
        elif content == "img":
            _solid(target, (1, 2, 3))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        load_image_folder(root)
    assert str(root / culprit if culprit != "." else root) in str(info.value)


def test_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    good = _png(root / "d" / "a" / "x.jpg", np.zeros((16, 16, 3)))
    _solid(root / "d" / "b" / "y.png", (1, 1, 1))
    good.write_bytes(good.read_bytes()[:40])
    with pytest.raises(InputError, match="not a readable image") as info:
        load_image_folder(root)
    assert str(good) in str(info.value)


def test_image_folder_without_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _solid(tmp_path / "d" / "a" / "x.png", (1, 1, 1))
    _without(monkeypatch, "PIL")
    with pytest.raises(InputError, match="need Pillow") as info:
        load_image_folder(tmp_path)
    assert "pip install pillow" in (info.value.hint or "")


# ---------------------------------------------------------------------------------------------
# Parquet files and save_to_disk folders


def _table(n: int = 6) -> Any:
    return pa.table(
        {
            "a": pa.array([float(i) for i in range(n)]),
            "label": pa.array(["cat", "dog"] * (n // 2)),
            "b": pa.array(list(range(10, 10 + n)), pa.int32()),
            "site": pa.array(["x", "y", "z"] * (n // 3)),
            "emb": pa.array([[i, -i] for i in range(n)], pa.list_(pa.float32())),
        }
    )


def test_parquet_file_features_labels_domains(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(_table(), path)
    d = load_dataset(DataSpec(str(path), "label", "site"))
    assert d.name == "t.parquet" and d.x.shape == (6, 4)
    # every other column in table order; a list column contributes its values
    np.testing.assert_array_equal(d.x[1], [1, 11, 1, -1])
    assert d.class_names == ("cat", "dog") and d.y.tolist() == [0, 1, 0, 1, 0, 1]
    assert d.domain_names == ("x", "y", "z") and d.domain.tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(InputError, match="feature column 'site' is not numeric"):
        load_dataset(DataSpec(str(path), "label"))  # without --domain-column it is a feature


def test_parquet_folder_is_read_in_name_order(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    t = _table().drop_columns(["site"])
    pq.write_table(t.slice(3), folder / "train-00001.parquet")
    pq.write_table(t.slice(0, 3), folder / "train-00000.parquet")
    d = load_dataset(DataSpec(str(folder)))
    np.testing.assert_array_equal(d.x[:, 0], [0, 1, 2, 3, 4, 5])


def test_one_nested_list_column_keeps_its_shape(tmp_path: Path) -> None:
    images = [[[i, i + 1, i + 2], [0, 0, i]] for i in range(4)]  # (4, 2, 3) nested lists
    t = pa.table(
        {
            "image": pa.array(images, pa.list_(pa.list_(pa.uint8()))),
            "label": pa.array([0, 1, 0, 1]),
        }
    )
    path = tmp_path / "img.parquet"
    pq.write_table(t, path)
    d = load_dataset(DataSpec(str(path)))
    assert d.x.shape == (4, 2, 3)
    np.testing.assert_array_equal(d.x[2], [[2, 3, 4], [0, 0, 2]])


def _hf_meta(features: dict[str, Any]) -> dict[bytes, bytes]:
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def _save_to_disk(folder: Path, table: Any, shards: int = 2) -> Path:
    """Write ``table`` as ``datasets.Dataset.save_to_disk`` does: Arrow IPC streams and JSON."""
    folder.mkdir(parents=True)
    rows = table.num_rows
    cuts = np.linspace(0, rows, shards + 1).astype(int)
    for k in range(shards):
        name = f"data-{k:05d}-of-{shards:05d}.arrow"
        with (
            pa.OSFile(str(folder / name), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as writer,
        ):
            writer.write_table(table.slice(cuts[k], cuts[k + 1] - cuts[k]))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [], "_split": "train"}))
    return folder


def test_save_to_disk_folder_with_class_label_names(tmp_path: Path) -> None:
    features = {
        "label": {"names": ["airplane", "bird", "cat"], "_type": "ClassLabel"},
        "pixels": {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "Sequence"},
    }
    t = pa.table(
        {
            "pixels": pa.array([[0.5 * i, 1.0] for i in range(6)], pa.list_(pa.float32(), 2)),
            "label": pa.array([2, 0, 2, 0, 2, 0], pa.int64()),
        }
    ).replace_schema_metadata(_hf_meta(features))
    folder = _save_to_disk(tmp_path / "ds", t)
    d = load_dataset(DataSpec(str(folder)))
    assert d.x.shape == (6, 2) and d.name == "ds"
    np.testing.assert_array_equal(d.x[:, 0], [0, 0.5, 1, 1.5, 2, 2.5])
    # ids 0 and 2 occur; their ClassLabel names are kept, and the ids renumbered 0..1
    assert d.class_names == ("airplane", "cat") and d.y.tolist() == [1, 0, 1, 0, 1, 0]


@pytest.mark.parametrize(
    ("columns", "spec", "message"),
    [
        ({"a": [1.0, 2.0], "y": [0, 1]}, ("label", None), "no column 'label'"),
        ({"a": ["u", "v"], "label": [0, 1]}, ("label", None), "feature column 'a' is not numeric"),
        ({"a": [[1.0], [1.0, 2.0]], "label": [0, 1]}, ("label", None), "lists of different"),
        ({"a": [1.0, None], "label": [0, 1]}, ("label", None), "'a' has missing values"),
        ({"a": [1.0, 2.0], "label": [0, None]}, ("label", None), "'label' has missing values"),
        ({"a": [1.0, 2.0], "label": [1, 1]}, ("label", None), "needs at least 2"),
        ({"a": [1.0, float("inf")], "label": [0, 1]}, ("label", None), "NaN, Inf"),
        ({"label": [0, 1]}, ("label", None), "no feature columns"),
        ({"a": [1.0, 2.0], "label": [0, 1]}, ("label", "dom"), "no column 'dom'"),
    ],
    ids=["no-label", "text-feature", "ragged", "null-feature", "null-label", "one-class",
         "inf", "no-features", "no-domain"],
)  # fmt: skip
def test_parquet_refusals_name_the_file_and_column(
    tmp_path: Path, columns: dict[str, list[Any]], spec: tuple[str, str | None], message: str
) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(InputError, match=message) as info:
        load_dataset(DataSpec(str(path), *spec))
    assert str(path) in str(info.value)


def test_unreadable_parquet_and_arrow_files(tmp_path: Path) -> None:
    bad = tmp_path / "junk.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="not a readable Parquet file") as info:
        load_dataset(DataSpec(str(bad)))
    assert str(bad) in str(info.value)
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    (folder / "data-00000-of-00001.arrow").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable Arrow file") as info:
        load_dataset(DataSpec(str(folder)))
    assert "data-00000-of-00001.arrow" in str(info.value)


def test_dataset_dict_and_empty_arrow_folders_are_refused(tmp_path: Path) -> None:
    dd = tmp_path / "dd"
    _save_to_disk(dd / "train", pa.table({"a": [1.0, 2.0], "label": [0, 1]}))
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(InputError, match=r"a DatasetDict \(splits: train\)") as info:
        load_dataset(DataSpec(str(dd)))
    assert str(dd / "train") in (info.value.hint or "")
    assert load_dataset(DataSpec(str(dd / "train"))).num_samples == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "state.json").write_text("{}")
    with pytest.raises(InputError, match=r"no \.arrow file"):
        load_dataset(DataSpec(str(empty)))


def test_tables_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(_table(), path)
    _without(monkeypatch, "pyarrow")
    with pytest.raises(InputError, match="need pyarrow") as info:
        load_dataset(DataSpec(str(path)))
    assert "pip install pyarrow" in (info.value.hint or "")


# ---------------------------------------------------------------------------------------------
# standardisation


def test_standardize_csv_columns_and_constant_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,label,b,c\n1,0,10,5\n2,1,10,5\n3,0,40,5\n6,1,10,5\n")
    d = load_dataset(DataSpec(str(path), options={"standardize": True}))
    assert np.isfinite(d.x).all()
    np.testing.assert_allclose(d.x.mean(axis=0), [0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(d.x.std(axis=0), [1, 1, 0], atol=1e-6)  # constant -> 0, not NaN
    # by hand: a has mean 3 and population std sqrt(3.5)
    np.testing.assert_allclose(d.x[:, 0], (np.array([1, 2, 3, 6]) - 3) / np.sqrt(3.5), rtol=1e-6)
    raw = load_dataset(DataSpec(str(path)))
    assert raw.x[0].tolist() == [1, 10, 5]  # without the option: as in the file


def test_standardize_npz_per_element_and_parquet(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, size=(50, 2, 3))
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(50) % 2)
    d = load_dataset(DataSpec(str(path), options={"standardize": True}))
    assert d.input_shape == (2, 3)
    np.testing.assert_allclose(d.x.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(d.x.std(axis=0), 1, atol=1e-5)
    pqt = tmp_path / "t.parquet"
    pq.write_table(_table(), pqt)
    t = load_dataset(DataSpec(str(pqt), "label", "site", options={"standardize": True}))
    np.testing.assert_allclose(t.x.std(axis=0), 1, atol=1e-5)


def test_standardized_keeps_everything_else() -> None:
    data = load_dataset(DataSpec("digits-rot"))
    s = standardized(data)
    np.testing.assert_array_equal(s.y, data.y)
    np.testing.assert_array_equal(s.domain, data.domain)
    assert (s.class_names, s.domain_names) == (data.class_names, data.domain_names)
    assert np.isfinite(s.x).all()  # digits have constant (always-0) pixels


@pytest.mark.parametrize(
    ("source", "options", "message"),
    [
        ("digits-rot", {"standardize": True}, "applies to .csv, .npz, Parquet and Arrow"),
        ("data.csv", {"image_size": 8}, "applies to image folders only"),
        ("data.csv", {"grayscale": True}, "applies to image folders only"),
        ("data.csv", {"standardise": True}, "unknown data option 'standardise'"),
        ("data.csv", {"standardize": "yes"}, "must be true or false"),
        ("data.csv", {"image_size": 0}, r"must be an integer in \[1, 1024\]"),
    ],
)
def test_options_that_do_not_apply_are_usage_errors(
    tmp_path: Path, source: str, options: dict[str, Any], message: str
) -> None:
    (tmp_path / "data.csv").write_text("a,label\n1,0\n2,1\n")
    src = source if source == "digits-rot" else str(tmp_path / source)
    with pytest.raises(UsageError, match=message):
        load_dataset(DataSpec(src, options=options))


def test_option_problem() -> None:
    assert option_problem({}) is None
    assert option_problem({"standardize": True, "image_size": 64, "grayscale": False}) is None
    assert "mapping" in (option_problem([1]) or "")
    assert "integer" in (option_problem({"image_size": True}) or "")


# ---------------------------------------------------------------------------------------------
# small clients


def _split(train: int, test: int) -> ClientSplit:
    return ClientSplit(np.arange(train), np.arange(test))


def test_small_clients_message_names_count_and_smallest() -> None:
    clients = [_split(50, 10), _split(4, 10), _split(30, 2), _split(12, 6)]
    assert small_clients(clients, 10, 5) == (
        "2 of 4 clients have fewer than 10 train or 5 test samples (smallest: 4 train, 2 test); "
        "their accuracies will be noisy"
    )
    assert small_clients(clients, 3, 2) is None
    assert small_clients(clients, 10, 0) == (
        "1 of 4 clients have fewer than 10 train samples (smallest: 4 train, 2 test); "
        "their accuracies will be noisy"
    )
    assert small_clients(clients, 0, 0) is None
    assert small_clients([], 10, 5) is None


def test_builtin_readers_registry_covers_every_builtin() -> None:
    from fedmoe.data import BUILTIN

    assert {b.raw for b in BUILTIN.values()} <= set(datasets.RAW_READERS)
    assert "mnist1d-shift" in BUILTIN


def test_an_image_past_the_pixel_limit_is_refused_not_warned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = _solid(tmp_path / "d" / "a" / "big.png", (1, 1, 1), size=12)
    _solid(tmp_path / "d" / "b" / "small.png", (1, 1, 1), size=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 pixels: a warning in Pillow
    with pytest.raises(InputError, match="not a readable image") as info:
        load_image_folder(tmp_path)
    assert str(big) in str(info.value)


def test_a_parquet_named_folder_without_parquet_files(tmp_path: Path) -> None:
    folder = tmp_path / "spark.parquet"
    folder.mkdir()
    with pytest.raises(InputError, match=r"no \.parquet file in the folder"):
        load_dataset(DataSpec(str(folder)))
