"""A fuzz suite: malformed variants of every artefact kind, each fed to the command that reads it,
and the command-line contract asserted for each (``../shared/CLI.md``):

- the exit code is 0, 2 or 3 (exit 1 is a bug; 4 is an output problem, not an input one);
- a refusal is one ``Error:`` line (and an optional ``Hint:``), nothing on stdout, no traceback,
  and no output written;
- the inputs are unchanged, byte for byte, whatever the outcome.

Variants are generated from a real round's artefacts (partition, train-round, affinity, sync
plan, client checkpoints, recipe, user data, run folder) by seeded mutations: every kind of
wrong value at sampled keys (wrong types, NaN, ±Inf, negatives, huge integers, floats for
integers, path traversal), removed keys, duplicated list items (overlaps), truncations at several
offsets, empty files, non-JSON, nesting bombs. ``VARIANT_COUNT`` is printed at the end of the
module (``pytest -s``)."""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import run_in

# a warning printed on a user's terminal (numpy, matplotlib) breaks the one-line contract too
pytestmark = pytest.mark.filterwarnings("error")

Run = Callable[..., Any]
COUNTS: dict[str, int] = {}
SEED = 20261201

BAD_VALUES: list[Any] = [
    "x",
    None,
    [],
    {},
    -1,
    2**64,
    1.5,
    float("nan"),
    float("inf"),
    -float("inf"),
    True,
    "../../outside.safetensors",
    "/etc/passwd",
    "",
    [[[[1]]]],
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real round of a 4-client federation, plus a recipe, user data and a run folder."""
    root = tmp_path_factory.mktemp("fuzz")
    run_in(
        root,
        ("partition", "--clients", "4", "--scheme", "iid", "--out", "p.json", "-q"),
        ("init", "--partition", "p.json", "--out", "init.safetensors", "--embed-hidden", "8",
         "--embed-dim", "8", "--experts", "4", "--expert-hidden", "8", "-q"),
        ("train-round", "--partition", "p.json", "--model", "init.safetensors", "--client",
         "all", "--epochs", "1", "--out", "r1", "-q"),
        ("affinity", "r1/train-round.json", "--out", "a.json", "-q"),
        ("plan-sync", "a.json", "--top-p", "2", "--out", "plan.json", "-q"),
    )  # fmt: skip
    (root / "recipe.yaml").write_text(
        "rounds: 1\nmethods: [local]\npartition: {clients: 4}\n"
        "model: {embed_hidden: 8, embed_dim: 8, num_experts: 2, expert_hidden: 8}\n"
        "train: {epochs: 1}\n"
    )
    run_in(root, ("run", "recipe.yaml", "--out", "run", "-q", "--threads", "1"))
    rows = ["label,site,a,b"] + [f"{i % 3},{'s' + str(i % 2)},{i * 0.5},{-i}" for i in range(60)]
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root


def _digest(paths: list[Path]) -> dict[str, str]:
    out = {}
    for base in paths:
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _check(
    r: Any, inputs: list[Path], before: dict[str, str], outputs: list[Path], what: str
) -> str | None:
    """The contract for one variant: None when kept, else what went wrong (outputs removed)."""
    problem = None
    lines = r.err.splitlines()
    if r.code not in (0, 2, 3):
        problem = f"exit {r.code}: {r.err.strip()[-300:]}"
    elif "Traceback" in r.err or "internal error" in r.err:
        problem = f"traceback: {r.err.strip()[-300:]}"
    elif r.code != 0 and (
        sum(line.startswith("Error:") for line in lines) != 1
        or not all(line.startswith(("Error:", "Hint:")) for line in lines)
        or r.out != ""
    ):
        problem = f"not one error line: {r.err.strip()[-300:]}"
    elif r.code != 0 and any(o.exists() for o in outputs):
        problem = "a refusal left output behind"
    elif _digest(inputs) != before:
        problem = "changed an input"
    for o in outputs:
        if o.is_dir():
            shutil.rmtree(o)
        else:
            o.unlink(missing_ok=True)
    return None if problem is None else f"{what}: {problem}"


def _verdict(problems: list[str], total: int) -> None:
    assert not problems, f"{len(problems)} of {total} variants broke the contract:\n" + "\n".join(
        problems[:40]
    )


# ---------------------------------------------------------------------------------------------
# mutations of JSON manifests


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from _paths(v, (*prefix, i))


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = json.loads(json.dumps(obj))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copy


def _delete(obj: Any, path: tuple[Any, ...]) -> Any:
    copy = json.loads(json.dumps(obj))
    node = copy
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return copy


def json_variants(text: str, rng: random.Random, per_file: int) -> list[tuple[str, str]]:
    """Labelled malformed versions of one JSON manifest."""
    data = json.loads(text)
    paths = [p for p in _paths(data) if p]
    rng.shuffle(paths)
    out: list[tuple[str, str]] = []
    for p in paths[:per_file]:
        for value in rng.sample(BAD_VALUES, 3):
            out.append((f"{p}={value!r}", json.dumps(_set(data, p, value))))
        if isinstance(p[-1], str):
            out.append((f"del {p}", json.dumps(_delete(data, p))))
    for p in paths:  # overlaps: the first item of a list repeated
        node = data
        for key in p:
            node = node[key]
        if isinstance(node, list) and node and len(out) < 10_000:
            out.append((f"dup {p}", json.dumps(_set(data, p, [node[0], *node]))))
    raw = text.encode()
    for share in (0.0, 0.1, 0.5, 0.9, 0.999):
        out.append((f"truncated at {share}", raw[: int(len(raw) * share)].decode(errors="ignore")))
    out += [
        ("not json", "this is not json {"),
        ("a list", "[1, 2, 3]"),
        ("nesting bomb", "[" * 50_000 + "]" * 50_000),
        ("wide bomb", json.dumps({"a": [0] * 200_000})),
        ("bad utf-8", "\udcff"),
    ]
    return out


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))


MANIFESTS = {
    # artefact → (file in the world, the command that reads it, the outputs it would write)
    "partition": ("p.json", ("evaluate", "--partition", "{f}", "init.safetensors", "--out",
                             "out.json", "-q"), ["out.json"]),
    "train-round": ("r1/train-round.json", ("affinity", "{f}", "--out", "out.json", "-q"),
                    ["out.json"]),
    "affinity": ("a.json", ("plan-sync", "{f}", "--top-p", "2", "--out", "out.json", "-q"),
                 ["out.json"]),
    "plan": ("plan.json", ("aggregate", "--plan", "{f}", "r1", "--out", "outdir", "-q"),
             ["outdir"]),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_malformed_manifests(
    world: Path, kind: str, run_cli: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(world)
    name, argv, outputs = MANIFESTS[kind]
    original = (world / name).read_text()
    variant = world / Path(name).parent / f"fuzz-{Path(name).name}"
    rng = random.Random(f"{SEED}-{kind}")
    cases = json_variants(original, rng, per_file=25)
    COUNTS[kind] = len(cases)
    inputs = [world / "p.json", world / "init.safetensors", world / "r1", world / "a.json",
              world / "plan.json"]  # fmt: skip
    problems = []
    for label, text in cases:
        _write(variant, text)
        before = _digest([*inputs])
        r = run_cli(*(a.replace("{f}", str(variant.relative_to(world))) for a in argv))
        bad = _check(r, inputs, before, [world / o for o in outputs], f"{kind}: {label}")
        if bad:
            problems.append(bad)
    variant.unlink()
    _verdict(problems, len(cases))


# ---------------------------------------------------------------------------------------------
# checkpoints: the safetensors header, its metadata, the tensor bytes


def _split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict[str, Any], body: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def _raw_header(h: bytes, body: bytes) -> bytes:
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def checkpoint_variants(raw: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    header, body = _split(raw)
    meta = header["__metadata__"]
    names = sorted(k for k in header if k != "__metadata__")
    out: list[tuple[str, bytes]] = []
    for key in sorted(meta):
        for value in ("-10", "1e400", "nan", "x", "18446744073709551616", "{}", "[1]", "3.5"):
            out.append(
                (
                    f"meta {key}={value}",
                    _join({**header, "__metadata__": {**meta, key: value}}, body),
                )
            )
        out.append(
            (f"meta {key}=non-string", _join({**header, "__metadata__": {**meta, key: 5}}, body))
        )
        rest = {k: v for k, v in meta.items() if k != key}
        out.append((f"meta del {key}", _join({**header, "__metadata__": rest}, body)))
    config = json.loads(meta["model_config"])
    for key in sorted(config):
        for value in rng.sample(BAD_VALUES, 4):
            cfg = json.dumps({**config, key: value})
            out.append(
                (
                    f"config {key}={value!r}",
                    _join({**header, "__metadata__": {**meta, "model_config": cfg}}, body),
                )
            )
    for name in rng.sample(names, min(6, len(names))):
        entry = header[name]
        lo, hi = entry["data_offsets"]
        for label, new in (
            ("dtype F16", {**entry, "dtype": "F16"}),
            ("dtype bogus", {**entry, "dtype": "Q9"}),
            ("shape +1", {**entry, "shape": [*entry["shape"][:-1], entry["shape"][-1] + 1] if entry["shape"] else [2]}),
            ("shape negative", {**entry, "shape": [-1]}),
            ("offsets overlap", {**entry, "data_offsets": [max(lo - 4, 0), hi - 4 if hi >= 4 else hi]}),
            ("offsets past end", {**entry, "data_offsets": [lo, len(body) + 64]}),
            ("offsets reversed", {**entry, "data_offsets": [hi, lo]}),
        ):  # fmt: skip
            out.append((f"{name} {label}", _join({**header, name: new}, body)))
        nan = bytearray(body)
        nan[lo : lo + 4] = struct.pack("<f", math.nan)
        out.append((f"{name} holds NaN", _join(header, bytes(nan))))
        inf = bytearray(body)
        inf[lo : lo + 4] = struct.pack("<f", math.inf)
        out.append((f"{name} holds Inf", _join(header, bytes(inf))))
    victim = names[0]
    out.append((f"missing {victim}", _join({k: v for k, v in header.items() if k != victim}, body)))
    out.append(("extra tensor", _join({**header, "zzz.extra": {"dtype": "F32", "shape": [0], "data_offsets": [len(body), len(body)]}}, body)))  # fmt: skip
    for share in (0.0, 0.001, 0.01, 0.5, 0.99):
        out.append((f"truncated at {share}", raw[: int(len(raw) * share)]))
    out += [
        ("header length huge", struct.pack("<Q", 2**62) + raw[8:]),
        ("header not json", struct.pack("<Q", 8) + b"notjson!" + body),
        ("header nesting bomb", _raw_header(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}", body)),
        ("empty", b""),
    ]
    return out


@pytest.mark.parametrize("command", ["affinity", "aggregate"])
def test_malformed_checkpoints(
    world: Path, command: str, run_cli: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(world)
    src = world / "r1" / "client-001.safetensors"
    raw = src.read_bytes()
    rng = random.Random(f"{SEED}-ckpt-{command}")
    cases = checkpoint_variants(raw, rng)
    COUNTS[f"checkpoint ({command})"] = len(cases)
    variant = world / "fuzz.safetensors"
    other = world / "r1" / "client-000.safetensors"
    inputs = [other]
    problems = []
    for label, data in cases:
        variant.write_bytes(data)
        before = _digest([other, variant])
        if command == "affinity":
            r = run_cli(
                "affinity",
                str(other.relative_to(world)),
                "fuzz.safetensors",
                "--out",
                "out.json",
                "-q",
            )
            outputs = [world / "out.json"]
        else:
            r = run_cli("aggregate", str(other.relative_to(world)), "fuzz.safetensors", "--method", "fedavg", "--out", "outdir", "-q")  # fmt: skip
            outputs = [world / "outdir"]
        bad = _check(r, [*inputs, variant], before, outputs, f"checkpoint {command}: {label}")
        if bad:
            problems.append(bad)
    variant.unlink()
    _verdict(problems, len(cases))


# ---------------------------------------------------------------------------------------------
# recipes, user data, run folders


RECIPE_KEYS = [
    "seed", "rounds", "participation", "methods", "eval_every", "data.dataset",
    "data.label_column", "partition.scheme", "partition.clients", "partition.global_test",
    "partition.local_test", "partition.alpha", "model.num_experts", "model.top_k", "model.embed",
    "model.moe_layers", "train.epochs", "train.lr", "train.batch_size", "train.optimizer",
    "fedmoe.top_p", "fedmoe.tau", "fedmoe.candidates", "fedmoe.gate", "fedmoe.expert_bound",
    "attack.kinds", "attack.fraction", "variants.v", "method_params.fedavg.reduce",
]  # fmt: skip
YAML_VALUES = ["x", "null", "[]", "{}", "-1", "0", "1e400", ".nan", "-.inf", "1.5", "true",
               "99999999999999999999", "'../../etc/passwd'", "[[[[1]]]]"]  # fmt: skip


def test_malformed_recipes(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bad recipe value is a usage or input error naming the key (the recipe is validated
    before any work; the run command's setup path is tested elsewhere)."""
    from fedmoe.errors import FedMoeError
    from fedmoe.run import load_recipe

    monkeypatch.chdir(world)
    base = (world / "recipe.yaml").read_text()
    import yaml

    data = yaml.safe_load(base)
    cases: list[tuple[str, str]] = []
    for key in RECIPE_KEYS:
        parts = key.split(".")
        for value in YAML_VALUES:
            copy = json.loads(json.dumps(data))
            node = copy
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = yaml.safe_load(value)
            cases.append((f"{key}={value}", yaml.safe_dump(copy)))
    cases += [
        ("duplicate key", base + "rounds: 2\n"),
        ("alias", base + "x: &a [1]\ny: *a\n"),
        ("tabs", "rounds:\t1\n"),
        ("a list", "- 1\n- 2\n"),
        ("huge", "rounds: 1\n#" + "x" * (2 << 20) + "\n"),
        ("binary", "\x00\x01\x02"),
        ("deep", "a: " + "[" * 5000 + "]" * 5000 + "\n"),
    ]
    COUNTS["recipe"] = len(cases)
    path = world / "fuzz.yaml"
    problems = []
    for label, text in cases:
        _write(path, text)
        try:
            recipe, _ = load_recipe(path)
            recipe.model_config((1, 8, 8), 10)
        except FedMoeError as exc:
            if exc.exit_code not in (2, 3) or "\n" in exc.message or not exc.message:
                problems.append(f"recipe {label}: {exc.exit_code} {exc.message!r}")
        except Exception as exc:
            problems.append(f"recipe {label}: {type(exc).__name__}: {str(exc)[:200]}")
    path.unlink()
    _verdict(problems, len(cases))


def test_malformed_user_data(world: Path, run_cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(world)
    good = (world / "data.csv").read_text().splitlines()
    cases: list[tuple[str, str]] = [
        ("nan label", "\n".join([good[0], "nan,s0,1,2", *good[2:]])),
        ("inf feature", "\n".join([good[0], "1,s0,inf,2", *good[2:]])),
        ("overflow", "\n".join([good[0], "1,s0,1e300,2", *good[2:]])),
        ("ragged", "\n".join([good[0], "1,s0,1", *good[2:]])),
        ("text feature", "\n".join([good[0], "1,s0,abc,2", *good[2:]])),
        ("header only", good[0]),
        ("empty", ""),
        ("no label column", "\n".join(["x,site,a,b", *good[1:]])),
        ("one class", "\n".join([good[0], *(f"0,s0,{i},1" for i in range(50))])),
        ("duplicate columns", "\n".join(["label,label,a,b", *good[1:]])),
        ("binary", "\x00\xff\x00"),
        ("bom and crlf", "\ufeff" + "\r\n".join(good)),
        ("huge label", "\n".join([good[0], "99999999999999999999,s0,1,2", *good[2:]])),
        ("negative label", "\n".join([good[0], "-3,s0,1,2", *good[2:]])),
        ("float label", "\n".join([good[0], "1.5,s0,1,2", *good[2:]])),
    ]
    COUNTS["user data"] = len(cases)
    path = world / "fuzz.csv"
    problems = []
    for label, text in cases:
        _write(path, text + "\n")
        before = _digest([path])
        r = run_cli("partition", "--dataset", "fuzz.csv", "--domain-column", "site", "--clients",
                    "2", "--scheme", "iid", "--out", "out.json", "-q")  # fmt: skip
        bad = _check(r, [path], before, [world / "out.json"], f"user data: {label}")
        if bad:
            problems.append(bad)
    path.unlink()
    _verdict(problems, len(cases))


def test_damaged_run_folders(world: Path, run_cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """``report`` and ``--resume`` on run folders with damaged files: a clean refusal or a report
    that leaves the damaged lines out; never a crash."""
    monkeypatch.chdir(world)
    src = world / "run"
    metrics = (src / "metrics.jsonl").read_text()
    line = json.loads(metrics.splitlines()[0])
    damaged_lines = [
        "", "{", "[]", "null", json.dumps({**line, "round": "x"}), json.dumps({**line, "round": -5}),
        json.dumps({**line, "method": None}), json.dumps({**line, "mean_local_acc": "x"}),
        json.dumps({**line, "server_bytes": float("nan")}), "[" * 10000 + "]" * 10000,
    ]  # fmt: skip
    cases: list[tuple[str, dict[str, str]]] = [
        (f"metrics line {i}", {"metrics.jsonl": d + "\n"}) for i, d in enumerate(damaged_lines)
    ]
    cases += [
        ("recipe not yaml", {"recipe.yaml": "{"}),
        ("recipe alias", {"recipe.yaml": "a: &a 1\nb: *a\n"}),
        ("partition not json", {"partition.json": "{"}),
        ("partition wrong", {"partition.json": json.dumps({"dataset": 5})}),
    ]
    COUNTS["run folder"] = 2 * len(cases)
    problems = []
    for label, files in cases:
        for resume in (False, True):
            work = world / "fuzzrun"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(src, work)
            for name, text in files.items():
                _write(work / name, text)
            keep = [p for p in work.rglob("*") if p.is_file() and p.name in files]
            before = _digest(keep)
            if resume:
                r = run_cli(
                    "run", "recipe.yaml", "--out", "fuzzrun", "--resume", "-q", "--threads", "1"
                )
            else:
                r = run_cli("report", "fuzzrun", "-q")
            bad = _check(r, [], {}, [], f"run folder {label} (resume={resume})")
            if bad:
                problems.append(bad)
            elif not resume and _digest(keep) != before:
                problems.append(f"run folder {label}: report changed a damaged input")
    shutil.rmtree(world / "fuzzrun", ignore_errors=True)
    _verdict(problems, 2 * len(cases))


def test_variant_count() -> None:
    """Runs last in this module: the number of variants the suite fed to the commands."""
    total = sum(COUNTS.values())
    print(f"\nVARIANT_COUNT {total} " + json.dumps(COUNTS))
    assert total >= 500 or not COUNTS
