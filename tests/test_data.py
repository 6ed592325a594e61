"""Data sources: the built-in domain-shifted digits and user ``.npz`` / ``.csv`` files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmoe.data import Dataset, DataSpec
from fedmoe.errors import InputError, UsageError
from fedmoe.io.datasets import load_csv, load_dataset, load_npz

BUILTINS = ("digits-rot", "digits-style")


@pytest.fixture(scope="module")
def rot() -> Dataset:
    return load_dataset(DataSpec("digits-rot"))


@pytest.fixture(scope="module")
def style() -> Dataset:
    return load_dataset(DataSpec("digits-style"))


# ---------------------------------------------------------------------------------------------
# built-in digits


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_shapes_classes_domains(name: str) -> None:
    d = load_dataset(DataSpec(name))
    assert d.name == name
    assert d.x.shape == (1797, 1, 8, 8)
    assert d.x.dtype == np.float32
    assert d.y.dtype == np.int64 and d.domain.dtype == np.int64
    assert d.input_shape == (1, 8, 8)
    assert d.num_samples == 1797
    assert d.num_classes == 10
    assert d.class_names == tuple(str(i) for i in range(10))
    assert sorted(np.unique(d.y).tolist()) == list(range(10))
    assert d.num_domains == 4 and d.has_domains
    # 1797 = 4·449 + 1: balanced domains differ by at most one sample
    assert sorted(np.bincount(d.domain, minlength=4).tolist()) == [449, 449, 449, 450]
    assert float(d.x.min()) == 0.0 and float(d.x.max()) == 1.0


def test_builtin_domain_names(rot: Dataset, style: Dataset) -> None:
    assert rot.domain_names == ("rot0", "rot90", "rot180", "rot270")
    assert style.domain_names == ("clean", "inverted", "noisy", "blurred")


def test_builtins_share_labels_domains_and_the_untransformed_domain(
    rot: Dataset, style: Dataset
) -> None:
    # both derive from the same raw digits and the same fixed domain permutation
    np.testing.assert_array_equal(rot.y, style.y)
    np.testing.assert_array_equal(rot.domain, style.domain)
    d0 = rot.domain == 0  # rotation by 0° and the "clean" style are both the raw image / 16
    np.testing.assert_array_equal(rot.x[d0], style.x[d0])
    d1 = rot.domain == 1  # inverted style: exactly 1 - clean; rotated by 90°: not the raw image
    assert not np.array_equal(rot.x[d1], style.x[d1])
    np.testing.assert_allclose(style.x[d1], 1.0 - np.rot90(rot.x[d1], k=-1, axes=(2, 3)), atol=1e-6)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_fingerprint_is_deterministic(name: str) -> None:
    a, b = load_dataset(DataSpec(name)), load_dataset(DataSpec(name))
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64
    np.testing.assert_array_equal(a.x, b.x)


def test_fingerprint_tells_datasets_apart(rot: Dataset, style: Dataset) -> None:
    assert rot.fingerprint() != style.fingerprint()
    y = rot.y.copy()
    y[0] = (y[0] + 1) % 10  # one label changed
    changed = Dataset(rot.name, rot.x, y, rot.domain, rot.class_names, rot.domain_names)
    assert changed.fingerprint() != rot.fingerprint()


@pytest.mark.parametrize("field", ["x", "y", "domain"])
def test_builtin_arrays_are_read_only(rot: Dataset, field: str) -> None:
    arr = getattr(rot, field)
    assert not arr.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        arr[0] = 0


def test_unknown_dataset_name_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown dataset 'digits-rotated'") as info:
        load_dataset(DataSpec("digits-rotated"))
    assert "digits-rot" in (info.value.hint or "")
    assert "digits-style" in (info.value.hint or "")


def test_builtin_registry_is_filled_on_import() -> None:
    code = (
        "from fedmoe.data import BUILTIN, DataSpec;"
        "print(sorted(BUILTIN), DataSpec('digits-rot').is_file)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "['digits-rot', 'digits-style', 'mnist1d-shift', 'text-mix'] False"


# ---------------------------------------------------------------------------------------------
# .npz files


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_maps_arbitrary_labels_and_domains_to_sorted_ids(tmp_path: Path) -> None:
    x = np.arange(36, dtype=np.float64).reshape(6, 2, 3)
    path = _npz(
        tmp_path / "data.npz",
        x=x,
        y=np.array([30, 10, 20, 10, 30, 20]),
        domain=np.array(["south", "north", "north", "south", "east", "east"]),
    )
    d = load_dataset(DataSpec(str(path)))
    assert d.name == "data.npz"
    assert d.x.dtype == np.float32 and d.input_shape == (2, 3)
    np.testing.assert_array_equal(d.x, x.astype(np.float32))
    assert d.y.tolist() == [2, 0, 1, 0, 2, 1]
    assert d.class_names == ("10", "20", "30")
    assert d.domain.tolist() == [2, 1, 1, 2, 0, 0]
    assert d.domain_names == ("east", "north", "south")
    assert d.has_domains and d.num_domains == 3


def test_npz_string_labels(tmp_path: Path) -> None:
    path = _npz(tmp_path / "s.npz", x=np.zeros((3, 2)), y=np.array(["dog", "cat", "dog"]))
    d = load_npz(path)
    assert d.y.tolist() == [1, 0, 1]
    assert d.class_names == ("cat", "dog")


def test_npz_without_domain_has_a_single_placeholder_domain(tmp_path: Path) -> None:
    path = _npz(tmp_path / "nd.npz", x=np.ones((4, 3)), y=np.array([0, 1, 0, 1]))
    d = load_npz(path)
    assert not d.has_domains
    assert d.domain_names == ("all",)
    assert d.domain.tolist() == [0, 0, 0, 0]
    assert not d.x.flags.writeable


@pytest.mark.parametrize("missing", ["x", "y"])
def test_npz_missing_array(tmp_path: Path, missing: str) -> None:
    arrays = {"x": np.zeros((3, 2)), "y": np.arange(3)}
    del arrays[missing]
    path = _npz(tmp_path / "m.npz", **arrays)
    with pytest.raises(InputError) as info:
        load_npz(path)
    msg = str(info.value)
    assert str(path) in msg
    assert f"missing array '{missing}'" in msg
    assert "np.savez" in (info.value.hint or "")


def test_npz_label_length_mismatch(tmp_path: Path) -> None:
    path = _npz(tmp_path / "len.npz", x=np.zeros((5, 2)), y=np.arange(4))
    with pytest.raises(InputError, match="'x' has 5 samples but 'y' has 4") as info:
        load_npz(path)
    assert str(path) in str(info.value)


def test_npz_domain_length_mismatch(tmp_path: Path) -> None:
    path = _npz(tmp_path / "dl.npz", x=np.zeros((5, 2)), y=np.arange(5), domain=np.arange(6))
    with pytest.raises(InputError, match="'x' has 5 samples but 'domain' has 6"):
        load_npz(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_npz_non_finite_features(tmp_path: Path, bad: float) -> None:
    x = np.zeros((3, 2))
    x[1, 1] = bad
    path = _npz(tmp_path / "nan.npz", x=x, y=np.arange(3))
    with pytest.raises(InputError, match="NaN or Inf") as info:
        load_npz(path)
    assert str(path) in str(info.value)


def test_npz_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip file")
    with pytest.raises(InputError, match=r"not a readable \.npz file") as info:
        load_npz(path)
    assert str(path) in str(info.value)


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.npz"
    with pytest.raises(InputError, match="no such file") as info:
        load_dataset(DataSpec(str(path)))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "arrays",
    [
        {"x": np.zeros((0, 3)), "y": np.zeros(0)},  # no samples
        {"x": np.zeros((3, 3)), "y": np.int64(1)},  # 'y' is a scalar
    ],
    ids=["empty", "scalar-y"],
)
def test_npz_degenerate_arrays_are_input_errors(tmp_path: Path, arrays: dict) -> None:
    path = _npz(tmp_path / "deg.npz", **arrays)
    with pytest.raises(InputError):
        load_npz(path)


# ---------------------------------------------------------------------------------------------
# .csv files


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


CSV = "f1,y,f2,site\n0.5,cat,1,B\n1.5,dog,2,A\n2.5,cat,3,A\n-1,bird,4,C\n"


def test_csv_label_and_domain_columns_by_name(tmp_path: Path) -> None:
    path = _csv(tmp_path / "data.csv", CSV)
    d = load_dataset(DataSpec(str(path), label_column="y", domain_column="site"))
    assert d.name == "data.csv"
    assert d.x.dtype == np.float32
    # features: every other column, in header order
    np.testing.assert_array_equal(d.x, [[0.5, 1], [1.5, 2], [2.5, 3], [-1, 4]])
    assert d.class_names == ("bird", "cat", "dog")
    assert d.y.tolist() == [1, 2, 1, 0]
    assert d.domain_names == ("A", "B", "C")
    assert d.domain.tolist() == [1, 0, 0, 2]
    assert d.has_domains


def test_csv_without_domain_column(tmp_path: Path) -> None:
    path = _csv(tmp_path / "nd.csv", "label,a\n1,0.1\n0,0.2\n1,0.3\n")
    d = load_csv(path, "label", None)
    assert not d.has_domains and d.domain_names == ("all",)
    assert d.domain.tolist() == [0, 0, 0]
    assert d.y.tolist() == [1, 0, 1]
    np.testing.assert_allclose(d.x[:, 0], [0.1, 0.2, 0.3])


@pytest.mark.parametrize(
    ("label", "domain", "missing", "flag"),
    [("label", None, "label", "--label-column"), ("y", "region", "region", "--domain-column")],
)
def test_csv_missing_column_names_it(
    tmp_path: Path, label: str, domain: str | None, missing: str, flag: str
) -> None:
    path = _csv(tmp_path / "data.csv", CSV)
    with pytest.raises(InputError) as info:
        load_csv(path, label, domain)
    msg = str(info.value)
    assert f"no column '{missing}'" in msg
    assert str(path) in msg
    assert "f1, y, f2, site" in msg  # the columns that do exist
    assert flag in (info.value.hint or "")


def test_csv_non_numeric_feature_column_names_it(tmp_path: Path) -> None:
    path = _csv(tmp_path / "c.csv", "label,f1,colour\n0,1.0,red\n1,2.0,blue\n")
    with pytest.raises(InputError, match="feature column 'colour' is not numeric") as info:
        load_csv(path, "label", None)
    assert str(path) in str(info.value)


def test_csv_ragged_row_names_the_line(tmp_path: Path) -> None:
    path = _csv(tmp_path / "r.csv", "label,a,b\n0,1,2\n1,3\n0,5,6\n")
    with pytest.raises(InputError) as info:
        load_csv(path, "label", None)
    assert str(info.value) == f"{path}:3: 2 fields, the header has 3"


def test_csv_nan_feature(tmp_path: Path) -> None:
    path = _csv(tmp_path / "n.csv", "label,a\n0,1\n1,nan\n")
    with pytest.raises(InputError, match="features contain NaN, Inf or values beyond"):
        load_csv(path, "label", None)


def test_csv_header_only(tmp_path: Path) -> None:
    path = _csv(tmp_path / "h.csv", "label,a\n")
    with pytest.raises(InputError, match="at least one data row"):
        load_csv(path, "label", None)


def test_csv_only_label_column(tmp_path: Path) -> None:
    path = _csv(tmp_path / "o.csv", "label\n0\n1\n")
    with pytest.raises(InputError, match="no feature columns"):
        load_csv(path, "label", None)


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_text("label,a\n0,1\n1,2\n", encoding="utf-8-sig")
    assert load_csv(path, "label", None).y.tolist() == [0, 1]


def test_csv_trailing_blank_line_is_ignored(tmp_path: Path) -> None:
    path = _csv(tmp_path / "blank.csv", "label,a\n0,1\n1,2\n\n")
    assert load_csv(path, "label", None).num_samples == 2
