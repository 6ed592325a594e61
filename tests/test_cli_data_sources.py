"""``fedmoe partition`` (and ``fedmoe run``) on the new data sources through the real CLI: MNIST-1D,
image folders, Parquet, ``save_to_disk`` folders, ``--standardize``, the small-client warning, the
recipe's ``data:`` keys, and every bad input as one line with its exit code and nothing written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import clean_failure

from fedmoe.errors import InputError, UsageError
from fedmoe.io.partition_file import load_partition
from fedmoe.run.recipe import load_recipe, recipe_from_dict

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
Image = pytest.importorskip("PIL.Image")

Run = Callable[..., Any]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def files_in(folder: Path) -> list[str]:
    """Every file under ``folder``, relative and sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _images(root: Path, per_class: int = 5) -> Path:
    """root/<domain>/<class>/<i>.png: 2 domains × 2 classes of small solid images."""
    for d, domain in enumerate(("photo", "sketch")):
        for c, cls in enumerate(("dog", "horse")):
            folder = root / domain / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                value = 40 * d + 80 * c + i
                Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _table(n: int = 40) -> Any:
    rng = np.random.default_rng(1)
    return pa.table(
        {
            "f": pa.array(rng.normal(3.0, 2.0, n)),
            "emb": pa.array(rng.normal(size=(n, 3)).tolist(), pa.list_(pa.float32(), 3)),
            "label": pa.array([i % 2 for i in range(n)]),
            "site": pa.array(["north", "south"] * (n // 2)),
        }
    )


BASE = ("partition", "--clients", "2")
PART = (*BASE, "--scheme", "iid", "--out", "p.json", "-q")


# ---------------------------------------------------------------------------------------------
# each source, partitioned and re-read


def test_mnist1d_partition_gives_each_of_20_clients_100_test_samples(
    work: Path, run_cli: Run
) -> None:
    pytest.importorskip("mnist1d")
    r = run_cli(
        "partition", "--dataset", "mnist1d-shift", "--clients", "20", "--scheme", "domain",
        "--domains-per-client", "1", "--out", "p.json",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert "warning" not in r.err
    manifest = json.loads((work / "p.json").read_text())
    rec = manifest["dataset"]
    assert rec["source"] == "builtin" and rec["name"] == "mnist1d-shift"
    assert rec["num_samples"] == 16_000 and rec["input_shape"] == [40]
    assert rec["domain_names"] == ["plain", "reversed", "negated", "rev-neg"]
    assert min(c["num_test"] for c in manifest["clients"]) >= 100
    assert "options" not in rec
    part = load_partition(work / "p.json")
    assert part.dataset.fingerprint() == rec["sha256"]


def test_image_folder_partition_records_its_options(work: Path, run_cli: Run) -> None:
    _images(work / "pacs")
    r = run_cli(*PART, "--dataset", "pacs", "--image-size", "4", "--grayscale")
    assert r.code == 0, r.err
    rec = json.loads((work / "p.json").read_text())["dataset"]
    assert rec["options"] == {"image_size": 4, "grayscale": True}
    assert rec["input_shape"] == [1, 4, 4] and rec["path"] == "pacs"
    assert rec["class_names"] == ["dog", "horse"] and rec["domain_names"] == ["photo", "sketch"]
    part = load_partition(work / "p.json")
    assert part.dataset_spec.options == {"image_size": 4, "grayscale": True}
    assert part.dataset.input_shape == (1, 4, 4)  # re-read the same way: the fingerprint holds
    # a changed image is noticed before anything is trained on it
    Image.fromarray(np.full((6, 6, 3), 255, np.uint8)).save(work / "pacs/photo/dog/0.png")
    with pytest.raises(InputError, match="sha256 mismatch"):
        load_partition(work / "p.json")


@pytest.mark.parametrize("kind", ["file", "folder", "save_to_disk"])
def test_table_partitions_record_their_columns(work: Path, run_cli: Run, kind: str) -> None:
    t = _table()
    if kind == "file":
        source = "t.parquet"
        pq.write_table(t, work / source)
    elif kind == "folder":
        source = "parts"
        (work / source).mkdir()
        pq.write_table(t.slice(0, 25), work / source / "a.parquet")
        pq.write_table(t.slice(25), work / source / "b.parquet")
    else:
        source = "ds"
        (work / source).mkdir()
        arrow = work / source / "data-00000-of-00001.arrow"
        with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as writer:
            writer.write_table(t)
        (work / source / "state.json").write_text("{}")
        (work / source / "dataset_info.json").write_text("{}")
    r = run_cli(
        *BASE, "--scheme", "domain", "--out", "p.json", "-q", "--dataset", source,
        "--domain-column", "site",
    )  # fmt: skip
    assert r.code == 0, r.err
    rec = json.loads((work / "p.json").read_text())["dataset"]
    assert (rec["label_column"], rec["domain_column"]) == ("label", "site")
    assert rec["input_shape"] == [4] and rec["num_samples"] == 40
    assert rec["domain_names"] == ["north", "south"]
    part = load_partition(work / "p.json")
    np.testing.assert_allclose(part.dataset.x[:, 0], t.column("f").to_numpy(), rtol=1e-6)


def test_standardize_is_recorded_and_reapplied(work: Path, run_cli: Run) -> None:
    rows = ["label,a,b,const"] + [f"{i % 2},{i},{i * i},7" for i in range(30)]
    (work / "d.csv").write_text("\n".join(rows) + "\n")
    r = run_cli(*PART, "--dataset", "d.csv", "--standardize")
    assert r.code == 0, r.err
    rec = json.loads((work / "p.json").read_text())["dataset"]
    assert rec["options"] == {"standardize": True}
    x = load_partition(work / "p.json").dataset.x
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(x.std(axis=0), [1, 1, 0], atol=1e-6)


def test_a_manifest_with_bad_options_is_refused(work: Path, run_cli: Run) -> None:
    (work / "d.csv").write_text("label,a\n" + "".join(f"{i % 2},{i}\n" for i in range(20)))
    assert run_cli(*PART, "--dataset", "d.csv", "--standardize").code == 0
    manifest = json.loads((work / "p.json").read_text())
    manifest["dataset"]["options"] = {"standardize": "yes"}
    (work / "p.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="'standardize' must be true or false") as info:
        load_partition(work / "p.json")
    assert "p.json" in str(info.value)


# ---------------------------------------------------------------------------------------------
# bad input: one line, its exit code, nothing written


def _corrupt_image(work: Path) -> str:
    _images(work / "imgs", per_class=2)
    (work / "imgs/photo/dog/1.png").write_bytes(b"\x89PNG broken")
    return "imgs"


def _stray_file(work: Path) -> str:
    _images(work / "imgs", per_class=2)
    (work / "imgs/photo/notes.png").write_bytes(b"")
    return "imgs"


def _text_feature(work: Path) -> str:
    pq.write_table(pa.table({"a": ["x", "y"], "label": [0, 1]}), work / "t.parquet")
    return "t.parquet"


def _no_label(work: Path) -> str:
    pq.write_table(pa.table({"a": [1.0, 2.0], "y": [0, 1]}), work / "t.parquet")
    return "t.parquet"


def _dataset_dict(work: Path) -> str:
    (work / "dd" / "train").mkdir(parents=True)
    (work / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    return "dd"


def _csv(work: Path) -> str:
    (work / "d.csv").write_text("label,a\n0,1\n1,2\n0,3\n1,4\n")
    return "d.csv"


@pytest.mark.parametrize(
    ("make", "extra", "code", "words"),
    [
        (_corrupt_image, (), 3, "imgs/photo/dog/1.png: not a readable image"),
        (_stray_file, (), 3, "imgs/photo/notes.png: a file outside the image-folder layout"),
        (_text_feature, (), 3, "t.parquet: feature column 'a' is not numeric"),
        (_no_label, (), 3, "t.parquet: no column 'label'"),
        (_dataset_dict, (), 3, "dd: a DatasetDict"),
        (lambda w: "digits-rot", ("--standardize",), 2, "'standardize' applies to"),
        (_csv, ("--image-size", "8"), 2, "'image_size' applies to image folders only"),
        (_csv, ("--grayscale",), 2, "'grayscale' applies to image folders only"),
    ],
    ids=["corrupt-image", "stray-file", "text-feature", "no-label", "dataset-dict",
         "standardize-builtin", "image-size-csv", "grayscale-csv"],
)  # fmt: skip
def test_bad_sources_fail_cleanly(
    work: Path, run_cli: Run, make: Callable[[Path], str], extra: tuple[str, ...], code: int,
    words: str,
) -> None:  # fmt: skip
    source = make(work)
    before = files_in(work)
    r = run_cli(*BASE, "--scheme", "iid", "--dataset", source, *extra, "--out", "out/p.json")
    line = clean_failure(r, code)
    assert words in line
    assert files_in(work) == before  # nothing written


def test_image_size_out_of_range_is_a_usage_error(work: Path, run_cli: Run) -> None:
    r = run_cli(*PART, "--dataset", "imgs", "--image-size", "0")
    assert r.code == 2 and "Traceback" not in r.err
    assert files_in(work) == []


# ---------------------------------------------------------------------------------------------
# the small-client warning


def test_partition_warns_once_about_small_clients(work: Path, run_cli: Run) -> None:
    r = run_cli("partition", "--clients", "150", "--scheme", "iid", "--out", "p.json")
    assert r.code == 0, r.err
    assert r.out == "p.json\n"  # stdout stays data
    manifest = json.loads((work / "p.json").read_text())
    smallest_train = min(c["num_train"] for c in manifest["clients"])
    smallest_test = min(c["num_test"] for c in manifest["clients"])
    warnings = [line for line in r.err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: 150 of 150 clients have fewer than 10 train or 5 test samples (smallest: "
        f"{smallest_train} train, {smallest_test} test); their accuracies will be noisy"
    ]
    assert "hint: use fewer clients, a larger --alpha or --min-size, or another --scheme" in r.err
    assert run_cli("partition", "--clients", "150", "--scheme", "iid", "--out", "p.json",
                   "--force", "-q").err == ""  # fmt: skip
    quiet = run_cli("partition", "--clients", "150", "--scheme", "iid", "--out", "p.json",
                    "--force", "--min-train", "0", "--min-test", "0")  # fmt: skip
    assert "warning" not in quiet.err


def test_no_local_test_split_means_no_test_minimum(work: Path, run_cli: Run) -> None:
    r = run_cli("partition", "--clients", "150", "--scheme", "iid", "--local-test", "0")
    assert "fewer than 10 train samples (smallest:" in r.err
    fine = run_cli("partition", "--clients", "4", "--scheme", "iid", "--force")
    assert "warning" not in fine.err


def test_run_warns_once_about_small_clients(work: Path, run_cli: Run) -> None:
    (work / "r.yaml").write_text(
        "rounds: 1\nmethods: [local]\npartition: {clients: 150, scheme: iid}\n"
        "model: {embed_hidden: 8, embed_dim: 8, num_experts: 2, expert_hidden: 8}\n"
        "train: {epochs: 1}\n"
    )
    r = run_cli("run", "r.yaml", "--out", "run", "--threads", "1", "--workers", "1")
    assert r.code == 0, r.err
    assert r.err.count("warning: 150 of 150 clients have fewer than 10 train or 5 test") == 1


# ---------------------------------------------------------------------------------------------
# the recipe's data: keys


def test_recipe_data_keys_make_the_spec() -> None:
    r = recipe_from_dict({"data": {"dataset": "imgs", "image_size": 16, "grayscale": True}})
    assert r.data.spec().options == {"image_size": 16, "grayscale": True}
    assert r.to_dict()["data"] == {
        "dataset": "imgs", "label_column": "label", "domain_column": None, "image_size": 16,
        "grayscale": True,
    }  # fmt: skip
    plain = recipe_from_dict({})
    assert plain.data.spec().options == {}
    # recipes written before the options existed read back the same
    assert plain.to_dict()["data"] == {
        "dataset": "digits-rot",
        "label_column": "label",
        "domain_column": None,
    }
    assert recipe_from_dict({"data": {"standardize": True}}).data.spec().options == {
        "standardize": True
    }


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"image_size": 0}, "'image_size' must be an integer"),
        ({"standardize": "yes"}, "'standardize' must be true or false"),
        ({"standardise": True}, "unknown key 'data.standardise' (did you mean 'standardize'?)"),
    ],
)
def test_recipe_bad_data_keys(data: dict[str, Any], words: str) -> None:
    with pytest.raises(UsageError) as info:
        recipe_from_dict({"data": data})
    assert words in str(info.value)


def test_recipe_paths_resolve_beside_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.yaml").write_text("data: {dataset: t.parquet, standardize: true}\n")
    recipe, _ = load_recipe(tmp_path / "sub" / "r.yaml")
    assert recipe.data.dataset == str((tmp_path / "sub" / "t.parquet").resolve())
    folder, _ = load_recipe(tmp_path / "sub" / "r.yaml", {"data.dataset": "imgs"})
    assert folder.data.dataset == str((tmp_path / "sub" / "imgs").resolve())
    builtin, _ = load_recipe(tmp_path / "sub" / "r.yaml", {"data.dataset": "mnist1d-shift"})
    assert builtin.data.dataset == "mnist1d-shift"


def test_run_records_the_recipe_data_options(work: Path, run_cli: Run) -> None:
    (work / "d.csv").write_text("label,a\n" + "".join(f"{i % 2},{i}\n" for i in range(40)))
    (work / "r.yaml").write_text(
        "rounds: 1\nmethods: [local]\ndata: {dataset: d.csv, standardize: true}\n"
        "partition: {clients: 2, scheme: iid}\n"
        "model: {embed_hidden: 8, embed_dim: 8, num_experts: 2, expert_hidden: 8}\n"
        "train: {epochs: 1}\n"
    )
    r = run_cli("run", "r.yaml", "--out", "run", "--threads", "1", "--workers", "1", "-q")
    assert r.code == 0, r.err
    rec = json.loads((work / "run" / "partition.json").read_text())["dataset"]
    assert rec["options"] == {"standardize": True}


def test_a_text_folder_can_be_partitioned(work: Path, run_cli: Run) -> None:
    # a folder's digest covers its files (a folder dataset used to fail on reading its sha256)
    for d in ("code", "prose"):
        (work / "txt" / d).mkdir(parents=True)
        (work / "txt" / d / "a.txt").write_text(f"{d} text " * 800)
    r = run_cli(*PART, "--dataset", "txt")
    assert r.code == 0, r.err
    rec = json.loads((work / "p.json").read_text())["dataset"]
    assert rec["path"] == "txt" and len(rec["file_sha256"]) == 64
    (work / "txt" / "code" / "a.txt").write_text("changed " * 800)
    with pytest.raises(InputError, match="sha256 mismatch"):
        load_partition(work / "p.json")
