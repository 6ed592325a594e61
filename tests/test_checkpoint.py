"""Checkpoints on disk: the safetensors bytes, the metadata, validation errors, checkpoint sets."""

from __future__ import annotations

import io
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedmoe import __version__
from fedmoe.errors import InputError
from fedmoe.io.atomic import OutputSet
from fedmoe.io.checkpoint import (
    FORMAT,
    CheckpointMeta,
    expected_shapes,
    open_checkpoint,
    parse_meta,
    save_checkpoint,
)
from fedmoe.io.checkpoint_set import checkpoint_entries, load_checkpoint_set
from fedmoe.io.manifest import header, sha256_file
from fedmoe.io.safetensors_format import (
    StreamWriter,
    TensorSpec,
    header_bytes,
    write_tensors,
)
from fedmoe.io.safetensors_format import read_header as parse_header
from fedmoe.model import MoEConfig, init_model, state_of

GOLDEN = Path(__file__).parent / "golden" / "checkpoint_header.json"
CFG = MoEConfig((1, 4, 4), 3, embed_hidden=8, embed_dim=4, num_experts=2, top_k=1, expert_hidden=4)
GOLDEN_CFG = MoEConfig(
    (1, 4, 4), 3, embed_hidden=8, embed_dim=4, num_experts=2, top_k=1, expert_hidden=4,
    gate_bias=True,
)  # fmt: skip
ROUTING = {
    "num_samples": 3,
    "layers": [
        {
            "topk_count": [2, 1],
            "mean_prob": [0.6, 0.4],
            "by_label": [[1, 1, 0], [0, 0, 1]],
            "by_domain": [[2], [1]],
        }
    ],
}


def meta(client: int | None = 1, cfg: MoEConfig = CFG, **kw: Any) -> CheckpointMeta:
    fields: dict[str, Any] = {"round": 2, "num_samples": 17, "seed": 5, "method": "train"}
    fields.update(kw)
    return CheckpointMeta(cfg, client, **fields)


def save(
    path: Path,
    state: dict[str, torch.Tensor] | None = None,
    m: CheckpointMeta | None = None,
    force: bool = False,
) -> Path:
    m = m or meta()
    state = state if state is not None else state_of(init_model(m.config, 0))
    with OutputSet(force) as out:
        save_checkpoint(out, path, state, m)
    return path


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and its length N."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), n


# ---------------------------------------------------------------------------------------------
# the safetensors bytes, derived by hand


def test_write_tensors_golden_bytes() -> None:
    buf = io.BytesIO()
    tensors = {
        "b": torch.tensor([1.0, -2.0], dtype=torch.float32),
        "a": torch.tensor([[3]], dtype=torch.int64),
    }
    write_tensors(buf, tensors, {"k": "v12"})
    text = (
        b'{"__metadata__":{"k":"v12"},'  # 28 bytes
        b'"a":{"dtype":"I64","shape":[1,1],"data_offsets":[0,8]},'  # 55 bytes
        b'"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'  # 54 bytes
    )
    assert len(text) == 137
    expected = (
        b"\x90\x00\x00\x00\x00\x00\x00\x00"  # header length 137 + 7 spaces = 144, little-endian
        + text
        + b"       "
        + b"\x03\x00\x00\x00\x00\x00\x00\x00"  # a: int64 3
        + b"\x00\x00\x80\x3f"  # b[0]: float32 1.0 = 0x3f800000
        + b"\x00\x00\x00\xc0"  # b[1]: float32 -2.0 = 0xc0000000
    )
    assert buf.getvalue() == expected
    loaded = load_file_bytes(buf.getvalue())
    assert loaded["a"].tolist() == [[3]] and loaded["b"].tolist() == [1.0, -2.0]


def load_file_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def test_write_tensors_without_metadata_and_non_contiguous() -> None:
    """No ``__metadata__`` key when there is none; a transposed tensor is written row-major."""
    buf = io.BytesIO()
    t = torch.tensor([[1, 2], [3, 4]], dtype=torch.int16).t()  # [[1, 3], [2, 4]], not contiguous
    assert not t.is_contiguous()
    write_tensors(buf, {"tt": t}, {})
    text = b'{"tt":{"dtype":"I16","shape":[2,2],"data_offsets":[0,8]}}'  # 57 bytes
    expected = b"\x40" + b"\x00" * 7 + text + b" " * 7  # 57 + 7 spaces = 64 = 0x40
    assert buf.getvalue() == expected + b"\x01\x00\x03\x00\x02\x00\x04\x00"


def test_header_bytes_is_padded_and_declares_offsets() -> None:
    specs = [TensorSpec("x", torch.float64, (3,)), TensorSpec("y", torch.bool, (2, 2))]
    data = header_bytes(specs, {"a": "b"})
    (n,) = struct.unpack("<Q", data[:8])
    assert n == len(data) - 8 and n % 8 == 0
    head = json.loads(data[8:])
    assert head["x"]["data_offsets"] == [0, 24] and head["y"]["data_offsets"] == [24, 28]
    assert head["y"]["dtype"] == "BOOL"


def test_stream_writer_refuses_wrong_tensors_before_writing() -> None:
    buf = io.BytesIO()
    specs = [TensorSpec("b", torch.float32, (2,)), TensorSpec("a", torch.float32, (1,))]
    w = StreamWriter(buf, specs, {})
    assert [s.name for s in w.order] == ["a", "b"]  # name order, whatever the given order
    size = buf.tell()
    for name, t in (
        ("b", torch.zeros(2)),  # out of order
        ("a", torch.zeros(1, dtype=torch.float64)),  # wrong dtype
        ("a", torch.zeros(2)),  # wrong shape
        ("a", torch.zeros(1, 1)),  # wrong rank
    ):
        with pytest.raises(ValueError, match=f"tensor {name} (does not match|written where)"):
            w.write(name, t)
        assert buf.tell() == size  # nothing written
    w.write("a", torch.ones(1))
    with pytest.raises(ValueError, match="closed before tensor b was written"):
        w.close()
    w.write("b", torch.ones(2))
    w.close()
    assert load_file_bytes(buf.getvalue())["b"].tolist() == [1.0, 1.0]


def test_stream_writer_refuses_an_undeclared_extra_tensor() -> None:
    w = StreamWriter(io.BytesIO(), [TensorSpec("a", torch.float32, (1,))], {})
    w.write("a", torch.ones(1))
    with pytest.raises(ValueError, match="z"):
        w.write("z", torch.ones(1))


def test_write_tensors_scalar() -> None:
    buf = io.BytesIO()
    write_tensors(buf, {"s": torch.tensor(1.5)}, {})
    assert load_file_bytes(buf.getvalue())["s"].item() == 1.5


# ---------------------------------------------------------------------------------------------
# checkpoints: round trip, plain safetensors, golden header


def test_round_trip(tmp_path: Path) -> None:
    state = state_of(init_model(CFG, 3))
    m = meta(routing=ROUTING, parent_sha256="ab" * 32, extra={"note": "kept"})
    path = save(tmp_path / "sub" / "c.safetensors", state, m)
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.safetensors"]  # no temp file left
    ck = open_checkpoint(path)
    assert ck.meta == m
    assert ck.config == CFG and ck.names == sorted(state)
    for name, t in state.items():
        assert torch.equal(ck.tensor(name), t)
        assert ck.shape(name) == tuple(t.shape) and ck.dtype(name) == torch.float32
    assert ck.state().keys() == state.keys()
    assert ck.sha256 == sha256_file(path)


def test_global_checkpoint_meta(tmp_path: Path) -> None:
    m = meta(None, round=0, num_samples=0, method="init")
    ck = open_checkpoint(save(tmp_path / "g.safetensors", m=m))
    assert ck.meta.client_id is None and ck.meta.method == "init" and ck.meta.routing is None
    with safe_open(str(ck.path), framework="pt") as f:
        assert f.metadata()["client_id"] == "global"


def test_plain_safetensors_reads_it(tmp_path: Path) -> None:
    state = state_of(init_model(CFG, 1))
    path = save(tmp_path / "c.safetensors", state, meta(routing=ROUTING, parent_sha256="f" * 64))
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        assert sorted(f.keys()) == sorted(state)
    assert md == {
        "fedmoe_version": __version__,
        "format": FORMAT,
        "model_config": CFG.to_json(),
        "client_id": "1",
        "round": "2",
        "num_samples": "17",
        "parent_sha256": "f" * 64,
        "seed": "5",
        "method": "train",
        "routing": json.dumps(ROUTING, separators=(",", ":")),
    }
    assert FORMAT == "fedmoe-moe/2"
    loaded = load_file(str(path))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_golden_header(tmp_path: Path) -> None:
    """The on-disk header of a fixed tiny checkpoint. Regenerate with ``FEDMOE_UPDATE_GOLDEN=1``."""
    m = CheckpointMeta(
        GOLDEN_CFG, 1, 2, 17, 5, "train", parent_sha256="0" * 64, routing=ROUTING,
        extra={"note": "golden"},
    )  # fmt: skip
    state = state_of(init_model(GOLDEN_CFG, 0))
    path = save(tmp_path / "c.safetensors", state, m)
    head, n = read_header(path)
    assert n % 8 == 0
    assert head["__metadata__"].pop("fedmoe_version") == __version__
    text = json.dumps(head, indent=1) + "\n"
    if os.environ.get("FEDMOE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8")  # key order included
    # the data section is exactly the tensors, in name order, back to back
    data = path.read_bytes()[8 + n :]
    names = [k for k in head if k != "__metadata__"]
    assert names == sorted(state)
    end = 0
    for name in names:
        start, stop = head[name]["data_offsets"]
        assert start == end
        end = stop
        assert data[start:stop] == state[name].numpy().tobytes()
    assert end == len(data)


def test_golden_header_content() -> None:
    head = json.loads(GOLDEN.read_text(encoding="utf-8"))
    md = head.pop("__metadata__")
    assert MoEConfig.from_json(md["model_config"], "golden") == GOLDEN_CFG
    assert md["format"] == FORMAT and md["note"] == "golden"
    assert {k: tuple(v["shape"]) for k, v in head.items()} == expected_shapes(GOLDEN_CFG)
    assert all(v["dtype"] == "F32" for v in head.values())


def test_expert_slice_equals_the_tensor_row(tmp_path: Path) -> None:
    ck = open_checkpoint(save(tmp_path / "c.safetensors"))
    for name in ("experts.w1", "experts.b1", "experts.w2", "experts.b2"):
        full = ck.tensor(name)
        for j in range(CFG.num_experts):
            assert torch.equal(ck.expert(name, j), full[j])


def test_merge_source_reads_each_whole_tensor_once_within_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CheckpointSource.experts keeps whole stacked tensors for the next target (each read once),
    answers exactly what the checkpoint would, reads a minority of experts as slices without
    keeping them, and evicts least recently used tensors beyond its byte budget."""
    from fedmoe.io.checkpoint import Checkpoint
    from fedmoe.io.checkpoint_set import CheckpointSource

    cfg = MoEConfig((1, 4, 4), 3, embed_hidden=8, embed_dim=4, num_experts=4, expert_hidden=4)
    cks = {
        c: open_checkpoint(
            save(tmp_path / f"c{c}.safetensors", state_of(init_model(cfg, c)), meta(c, cfg))
        )
        for c in range(3)
    }
    reads: list[tuple[str, str]] = []
    real = Checkpoint.tensor

    def counted(self: Checkpoint, name: str) -> torch.Tensor:
        reads.append((self.path.name, name))
        return real(self, name)

    monkeypatch.setattr(Checkpoint, "tensor", counted)
    source = CheckpointSource(cks)
    for _ in range(3):  # three targets drawing on the same sources
        for c in range(3):
            assert torch.equal(source.experts(c, "experts.w1", [0, 2, 3]),
                               real(cks[c], "experts.w1")[[0, 2, 3]])  # fmt: skip
            assert torch.equal(source.experts(c, "experts.w1", [0, 1, 2, 3]),
                               real(cks[c], "experts.w1"))  # fmt: skip
            assert torch.equal(
                source.experts(c, "experts.b1", [1]), real(cks[c], "experts.b1")[[1]]
            )
    assert sorted(reads) == sorted((f"c{c}.safetensors", "experts.w1") for c in range(3))
    size = cks[0].tensor("experts.w1").numel() * 4
    reads.clear()
    tight = CheckpointSource(cks, cache_bytes=2 * size)  # room for two of the three
    for _ in range(2):
        for c in range(3):
            tight.experts(c, "experts.w1", [0, 1, 2])
    assert len(reads) == 6  # round-robin over three with room for two: every read misses


def test_same_inputs_same_bytes(tmp_path: Path) -> None:
    a = save(tmp_path / "a.safetensors", state_of(init_model(CFG, 4)))
    b = save(tmp_path / "b.safetensors", state_of(init_model(CFG, 4)))
    assert a.read_bytes() == b.read_bytes()


# ---------------------------------------------------------------------------------------------
# checkpoint errors


def expect_input_error(path: Path, *parts: str) -> InputError:
    with pytest.raises(InputError) as info:
        open_checkpoint(path)
    assert info.value.exit_code == 3
    for part in (str(path), *parts):
        assert part in info.value.message
    return info.value


@pytest.mark.parametrize("cut", [1, 4, 200])
def test_truncated_file(tmp_path: Path, cut: int) -> None:
    path = save(tmp_path / "c.safetensors")
    path.write_bytes(path.read_bytes()[:-cut])
    err = expect_input_error(path, "not a readable safetensors file")
    assert "truncated" in (err.hint or "")


@pytest.mark.parametrize("content", [b"", b"hello, I am not a checkpoint\n", b"\x08" + b"\0" * 7])
def test_not_safetensors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "c.safetensors"
    path.write_bytes(content)
    expect_input_error(path, "not a readable safetensors file")


def test_missing_file_and_folder(tmp_path: Path) -> None:
    expect_input_error(tmp_path / "absent.safetensors", "no such checkpoint file")
    expect_input_error(tmp_path, "no such checkpoint file")


def test_plain_safetensors_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file(state_of(init_model(CFG, 0)), str(path))
    err = expect_input_error(path, "metadata key 'format' missing; not a fedmoe checkpoint")
    assert "fedmoe init" in (err.hint or "")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"round": None}, "metadata key 'round' missing"),
        (
            {"format": "fedmoe-moe/9"},
            "format 'fedmoe-moe/9' is not one of fedmoe-moe/1, fedmoe-moe/2",
        ),
        ({"round": "two"}, "malformed client_id/round/num_samples/routing/cluster metadata"),
        ({"client_id": "1.5"}, "malformed client_id"),
        ({"routing": "{oops"}, "malformed client_id/round/num_samples/routing/cluster metadata"),
        ({"model_config": "{"}, "model_config metadata is not valid JSON"),
        ({"model_config": '{"input_shape":[16],"num_classes":3,"x":1}'}, "unknown key 'x'"),
        ({"num_samples": "-10"}, "metadata num_samples = -10 is out of range"),
        ({"num_samples": str(2**60)}, "metadata num_samples = 1152921504606846976 is out of range"),
        ({"client_id": "-1"}, "metadata client_id = -1 is out of range"),
        ({"round": "-2"}, "metadata round = -2 is out of range"),
        ({"routing": "[1, 2]"}, "routing metadata must be a JSON object"),
        ({"cluster": "first"}, "malformed client_id/round/num_samples/routing/cluster metadata"),
        ({"cluster": "-3"}, "metadata cluster = -3 is out of range"),
    ],
)
def test_bad_metadata(tmp_path: Path, change: dict[str, str | None], message: str) -> None:
    md = meta().to_metadata()
    for key, value in change.items():
        if value is None:
            del md[key]
        else:
            md[key] = value
    path = tmp_path / "c.safetensors"
    save_file(state_of(init_model(CFG, 0)), str(path), metadata=md)
    expect_input_error(path, message)


def test_format_1_checkpoints_are_still_read(tmp_path: Path) -> None:
    """A checkpoint of format 1 (single-layer routing at the top level) opens, and its routing
    reads as layer 0."""
    from fedmoe.train.routing import layer_stats

    md = meta().to_metadata()
    old = {k: v for k, v in ROUTING["layers"][0].items()}  # type: ignore[index]
    md.update(format="fedmoe-moe/1", routing=json.dumps({"num_samples": 3, **old}))
    md["model_config"] = json.dumps(
        {k: v for k, v in json.loads(md["model_config"]).items() if k != "moe_layers"}
    )
    path = tmp_path / "old.safetensors"
    save_file(state_of(init_model(CFG, 0)), str(path), metadata=md)
    ck = open_checkpoint(path)
    assert ck.config == CFG
    assert layer_stats(ck.meta.routing, 0) == {"num_samples": 3, **old}
    assert ck.upload().proxies[0].shape == (CFG.num_experts, CFG.embed_dim)


def test_parse_meta_defaults_optional_keys() -> None:
    md = {k: v for k, v in meta().to_metadata().items() if k in ("format", "model_config")}
    md.update(client_id="global", round="0", num_samples="0")
    parsed = parse_meta(md, "x")
    assert (parsed.seed, parsed.method, parsed.parent_sha256, parsed.routing) == (0, "", "", None)
    assert parsed.extra == {}


def test_tensor_shape_does_not_match_config(tmp_path: Path) -> None:
    wide = MoEConfig(
        (1, 4, 4), 3, embed_hidden=8, embed_dim=4, num_experts=2, top_k=1, expert_hidden=5
    )
    path = tmp_path / "c.safetensors"
    save_file(state_of(init_model(wide, 0)), str(path), metadata=meta().to_metadata())
    expect_input_error(path, "tensor experts.b1 has shape [2, 5], its model_config needs [2, 4]")


def test_tensor_names_do_not_match_config(tmp_path: Path) -> None:
    state = state_of(init_model(CFG, 0))
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "c.safetensors"
    save_file(state, str(path), metadata=meta(cfg=GOLDEN_CFG).to_metadata())
    expect_input_error(
        path, "tensors do not match its model_config", "missing: ['gate.bias']",
        "unexpected: ['extra.weight']",
    )  # fmt: skip


def test_nan_is_refused_naming_file_and_tensor(tmp_path: Path) -> None:
    state = state_of(init_model(CFG, 0))
    state["experts.w2"][1, 0, 0] = float("nan")
    path = tmp_path / "c.safetensors"
    with open(path, "wb") as f:  # save_checkpoint would refuse it: write the bytes directly
        write_tensors(f, state, meta().to_metadata())
    ck = open_checkpoint(path)  # lazy: the header is fine
    assert torch.equal(ck.tensor("experts.w1"), state["experts.w1"])
    for read in (lambda: ck.tensor("experts.w2"), ck.state):
        with pytest.raises(InputError) as info:
            read()
        assert info.value.message == f"{path}: tensor experts.w2 expert 1 contains NaN or Inf"
        assert info.value.exit_code == 3
    torch.testing.assert_close(ck.expert("experts.w2", 0), state["experts.w2"][0])
    with pytest.raises(InputError, match=r"tensor experts\.w2 expert 1 contains NaN or Inf"):
        ck.expert("experts.w2", 1)


def test_save_refuses_inf_and_writes_nothing(tmp_path: Path) -> None:
    state = state_of(init_model(CFG, 0))
    state["gate.weight"][0, 0] = float("inf")
    with pytest.raises(InputError, match=re.escape("tensor gate.weight contains NaN or Inf")):
        save(tmp_path / "c.safetensors", state)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# checkpoint sets


def three_clients(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        save(folder / f"client-{c:03d}.safetensors", state_of(init_model(CFG, c)), meta(c))
        for c in range(3)
    ]


def write_set_manifest(path: Path, files: list[Path]) -> None:
    entries = checkpoint_entries([open_checkpoint(f) for f in files], path.parent)
    path.write_text(json.dumps({**header("train-round"), "checkpoints": entries}))


def test_set_from_files_folder_and_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = three_clients(tmp_path / "r1")
    (tmp_path / "r1" / "notes.txt").write_text("ignored")
    by_files = load_checkpoint_set([str(f) for f in files])
    by_folder = load_checkpoint_set([str(tmp_path / "r1")])
    write_set_manifest(tmp_path / "r1" / "m.json", files)
    by_manifest = load_checkpoint_set([str(tmp_path / "r1" / "m.json")])
    for got in (by_files, by_folder, by_manifest):
        assert sorted(got) == [0, 1, 2]  # type: ignore[type-var]
        assert all(got[c].path.resolve() == files[c].resolve() for c in range(3))  # type: ignore[index]
    entries = json.loads((tmp_path / "r1" / "m.json").read_text())["checkpoints"]
    assert entries[0] == {
        "client": 0,
        "path": "client-000.safetensors",
        "sha256": sha256_file(files[0]),
        "num_samples": 17,
    }
    # a manifest on stdin: paths relative to the working folder
    monkeypatch.chdir(tmp_path / "r1")
    monkeypatch.setattr("sys.stdin", io.StringIO((tmp_path / "r1" / "m.json").read_text()))
    assert sorted(load_checkpoint_set(["-"])) == [0, 1, 2]  # type: ignore[type-var]


def test_set_with_a_global_model(tmp_path: Path) -> None:
    g = save(tmp_path / "g.safetensors", m=meta(None))
    c = save(tmp_path / "c.safetensors", m=meta(4))
    got = load_checkpoint_set([str(g), str(c)])
    assert set(got) == {None, 4}


def test_set_duplicate_client(tmp_path: Path) -> None:
    files = three_clients(tmp_path / "r1")
    other = save(tmp_path / "again.safetensors", m=meta(1))
    with pytest.raises(InputError) as info:
        load_checkpoint_set([str(tmp_path / "r1"), str(other)])
    assert info.value.message == f"two checkpoints for client 1: {files[1]} and {other}"
    g1 = save(tmp_path / "g1.safetensors", m=meta(None))
    g2 = save(tmp_path / "g2.safetensors", m=meta(None))
    with pytest.raises(InputError, match="two checkpoints for global model"):
        load_checkpoint_set([str(g1), str(g2)])


def test_set_mixed_configs(tmp_path: Path) -> None:
    a = save(tmp_path / "a.safetensors", m=meta(0))
    b = save(tmp_path / "b.safetensors", m=meta(1, cfg=GOLDEN_CFG))
    with pytest.raises(InputError) as info:
        load_checkpoint_set([str(a), str(b)])
    assert info.value.message == f"{b} has a different model_config than {a}"


def test_set_sha256_mismatch(tmp_path: Path) -> None:
    files = three_clients(tmp_path / "r1")
    manifest = tmp_path / "r1" / "m.json"
    write_set_manifest(manifest, files)
    other = state_of(init_model(CFG, 99))
    save(files[2], other, meta(2), force=True)  # replaced by a valid checkpoint of another model
    with pytest.raises(InputError) as info:
        load_checkpoint_set([str(manifest)])
    assert info.value.message == f"{files[2]}: sha256 differs from the one {manifest} records"


def test_set_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=re.escape("folder holds no .safetensors checkpoint")):
        load_checkpoint_set([str(tmp_path / "empty")])
    with pytest.raises(InputError, match="no checkpoint given"):
        load_checkpoint_set([])
    with pytest.raises(InputError, match=re.escape("absent.json: no such file")):
        load_checkpoint_set([str(tmp_path / "absent.json")])
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps(header("partition")))
    with pytest.raises(InputError, match="is a 'partition' manifest"):
        load_checkpoint_set([str(bad)])
    bad.write_text(json.dumps(header("train-round")))
    with pytest.raises(InputError, match="missing key 'checkpoints'"):
        load_checkpoint_set([str(bad)])


def test_stream_writer_raw_chunks() -> None:
    buf = io.BytesIO()
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.int16, (1,))]
    w = StreamWriter(buf, specs, {})
    with pytest.raises(ValueError, match="tensor b written where a was declared"):
        w.write_raw("b", [b"\x00\x00"])
    w.write_raw("a", [b"\x00\x00\x80\x3f", memoryview(b"\x00\x00\x00\xc0")])  # 1.0, -2.0
    with pytest.raises(ValueError, match="tensor b: more bytes than its declared 2"):
        w.write_raw("b", [b"\x07\x00", b"\x00\x00"])


def test_stream_writer_raw_chunks_match_write_tensors() -> None:
    tensors = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([7], dtype=torch.int16)}
    expected = io.BytesIO()
    write_tensors(expected, tensors, {"k": "v"})
    buf = io.BytesIO()
    w = StreamWriter(buf, [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                     {"k": "v"})  # fmt: skip
    w.write_raw("a", [b"\x00\x00\x80\x3f", b"\x00\x00\x00\xc0"])
    w.write_raw("b", [b"\x07\x00"])
    w.close()
    assert buf.getvalue() == expected.getvalue()


def test_read_header() -> None:
    buf = io.BytesIO()
    write_tensors(buf, {"a": torch.tensor([1.0, -2.0])}, {"k": "v"})
    data = buf.getvalue()
    head, offset = parse_header(data, "x")
    assert head == {
        "__metadata__": {"k": "v"},
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    assert data[offset:] == b"\x00\x00\x80\x3f\x00\x00\x00\xc0"
    for bad, message in (
        (data[:7], "x: shorter than a safetensors header"),
        (data[:20], "x: header length .* exceeds the file"),
        (struct.pack("<Q", 4) + b"{{{{", "x: header is not JSON"),
        (struct.pack("<Q", 2) + b"[]", "x: header is not a JSON object"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_header(bad, "x")
