"""How Hugging Face model folders are recognised and read when their own metadata says nothing:
the options of ``--layout`` and ``--num-samples``. Torch-free, so commands that only list or
detect folders do not import it (the folders themselves are read by :mod:`fedmoe.io.hf_folder`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedmoe.errors import InputError, UsageError
from fedmoe.model.hf import HFArch

CONFIG = "config.json"


@dataclass(frozen=True)
class FolderOptions:
    """How to read folders that a user's own scripts wrote (no fedmoe metadata)."""

    arch: HFArch | None = None  # a declared layout (--layout); None: by config.json model_type
    samples: Mapping[int, int] = field(default_factory=dict)  # client id → sample count
    default_samples: int | None = None  # for every client not in ``samples`` (--num-samples *=N)


def is_hf_folder(path: Path) -> bool:
    """True when ``path`` is a folder holding a ``config.json``."""
    return path.is_dir() and (path / CONFIG).is_file()


def load_layout(path: Path) -> HFArch:
    """A user-declared architecture from a YAML or JSON file (see :meth:`HFArch.from_dict`)."""
    import yaml

    try:
        if path.stat().st_size > 1 << 20:
            raise InputError(f"{path}: a layout file is at most 1 MiB")
        data = yaml.safe_load(path.read_text("utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such layout file", hint="check the --layout path") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise InputError(
            f"{path}: not a readable YAML/JSON layout ({str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a layout is a mapping with name, experts_key and rules")
    return HFArch.from_dict(data, str(path))


def parse_num_samples(items: list[str]) -> tuple[dict[int, int], int | None]:
    """``--num-samples CLIENT=N`` (or ``*=N`` for every client without a count) values."""
    per: dict[int, int] = {}
    default = None
    for item in items:
        key, sep, value = item.partition("=")
        try:
            count = int(value)
            if not sep or count < 0 or count >= 2**53:
                raise ValueError
            if key.strip() == "*":
                default = count
            else:
                per[int(key)] = count
        except ValueError:
            raise UsageError(
                f"--num-samples {item!r}: expected CLIENT=N or *=N with N ≥ 0",
                hint="for example --num-samples 3=1200",
            ) from None
    return per, default
