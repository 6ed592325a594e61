"""How a fedmoe round travels in Flower messages: tensors in one ``ArrayRecord`` (keyed by model
tensor name), everything else as one JSON text in a ``ConfigRecord``. A client's error that is the
user's to fix (a tampered expert, unreadable data) travels as a JSON ``error`` entry, so the
server raises the same error class, with the same exit code, as a one-process run would."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedmoe.errors import FedMoeError, InputError, OutputError, UsageError

TENSORS = "tensors"
BODY = "fedmoe"
_ERRORS: dict[str, type[FedMoeError]] = {
    "usage": UsageError,
    "input": InputError,
    "output": OutputError,
}


def pack(body: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> RecordDict:
    """A message's content."""
    content = RecordDict()
    content[BODY] = ConfigRecord({"json": json.dumps(body, separators=(",", ":"))})
    if tensors:
        content[TENSORS] = ArrayRecord(
            {k: Array(v.detach().contiguous().numpy()) for k, v in sorted(tensors.items())}
        )
    return content


def unpack(content: RecordDict, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The body and tensors of a message's content; a client's error is raised here."""
    try:
        body = json.loads(str(content.config_records[BODY]["json"]))
    except (KeyError, json.JSONDecodeError, RecursionError):
        raise InputError(f"{where}: not a fedmoe message") from None
    if not isinstance(body, dict):
        raise InputError(f"{where}: not a fedmoe message")
    unpack_error(body)
    tensors: dict[str, torch.Tensor] = {}
    if TENSORS in content.array_records:
        for name, array in content.array_records[TENSORS].items():
            tensors[name] = torch.from_numpy(np.array(array.numpy(), copy=True))
    return body, tensors


def unpack_error(body: Mapping[str, Any]) -> None:
    """Raise the error a body carries (see :func:`error_body`), if it carries one."""
    error = body.get("error")
    if isinstance(error, dict):
        cls = _ERRORS.get(str(error.get("kind")), InputError)
        hint = error.get("hint")
        raise cls(str(error.get("message")), hint=hint if isinstance(hint, str) else None)


def error_body(exc: FedMoeError) -> dict[str, Any]:
    """The reply body that carries ``exc`` to the server."""
    kind = next((k for k, cls in _ERRORS.items() if type(exc) is cls), None)
    if kind is None:
        kind = next((k for k, cls in _ERRORS.items() if isinstance(exc, cls)), "input")
    return {"error": {"kind": kind, "message": exc.message, "hint": exc.hint}}


def nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors' data (what a message moves, headers aside)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


BOOKKEEPING = ("split", "global_test", "data", "model", "train", "eval")  # no part of the method


def body_bytes(body: Mapping[str, Any]) -> int:
    """Bytes of a message's JSON body, less its bookkeeping (which samples a client holds, the
    settings, evaluation): what the method itself moves besides tensors."""
    kept = {k: v for k, v in body.items() if k not in BOOKKEEPING}
    return len(json.dumps(kept, separators=(",", ":")).encode())
