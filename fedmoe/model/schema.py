"""The model schema: the role of every tensor of a model, declared as data.

FedMoE-DA (arXiv 2411.02115, Sec. III) splits a model into parts that travel differently: the
*shared* parts (embedding, heads, norms) go to the server and are averaged; the *gate* of each MoE
layer goes to the server too, and its rows are the expert proxies of Eq. 8; the *experts* stay on
the clients and move peer to peer (Eq. 11). Every module that needs to know which tensor is which
(affinity, planning, sizes, the traffic ledger, the merge engine) asks a :class:`ModelSchema`;
none matches tensor names by string.

A :class:`Layout` declares an architecture as a list of :class:`TensorRule` templates, in the spirit
of mergekit's architecture definitions: ``{layer}`` stands for the MoE layer index, ``{expert}`` for
an expert index (per-expert layouts, as Hugging Face checkpoints store Mixtral or OLMoE), and
``{name}`` for any dotted rest. Stacked expert tensors (``(E, ...)``, as fedmoe and transformers'
fused layouts store them) name their expert axis instead. :meth:`Layout.resolve` matches a model's
tensor names against the rules, first rule first, and returns the schema; a new architecture is one
more :class:`Layout` value, not code across the package.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

from fedmoe.errors import InputError


class Role(str, Enum):
    """What a tensor is, for the federation."""

    SHARED = "shared"  # embedding, heads, norms: averaged by the server
    GATE = "gate"  # the router of one MoE layer: to the server; its weight rows are proxies
    EXPERT = "expert"  # expert weights of one MoE layer: peer to peer only


@dataclass(frozen=True)
class TensorRule:
    """One declarative line of a layout.

    ``pattern`` is a tensor-name template: literal text with ``{layer}``, ``{expert}`` (decimal
    indices), ``{index}`` (any decimal number, e.g. the transformer block of a shared tensor) and
    ``{name}`` (any non-empty rest) placeholders. ``{layer}`` is the number the checkpoint uses
    (a transformer block); MoE layers are numbered by rank, so a model whose MoE blocks are 1, 3,
    5 (dense blocks between them) has MoE layers 0, 1, 2.
    """

    pattern: str  # e.g. "blocks.{layer}.experts.{name}"
    role: Role
    layer: int | None = None  # fixed MoE layer when the pattern has no {layer}; -1 = the last one
    expert_axis: int | None = None  # stacked expert tensors: the axis of length E
    proxy: bool = False  # the gate weight whose rows are the proxies of Eq. 8

    @cached_property
    def regex(self) -> re.Pattern[str]:
        """The compiled template."""
        out = ""
        for literal, field in re.findall(r"([^{]*)(\{[a-z]+\}|$)", self.pattern):
            out += re.escape(literal)
            if field == "{layer}":
                out += r"(?P<layer>\d+)"
            elif field == "{expert}":
                out += r"(?P<expert>\d+)"
            elif field == "{index}":
                out += r"\d+"
            elif field == "{name}":
                out += r"(?P<name>.+)"
        return re.compile(out + r"\Z")


@dataclass(frozen=True)
class TensorEntry:
    """The resolved role of one tensor."""

    name: str
    role: Role
    shape: tuple[int, ...]
    itemsize: int  # bytes per value
    layer: int | None  # MoE layer of a gate or expert tensor
    expert: int | None  # per-expert tensors: the expert it belongs to
    expert_axis: int | None  # stacked expert tensors: the axis of length E
    proxy: bool  # a gate weight whose rows are proxies
    slot: str = ""  # per-expert tensors: the name with the expert index as "{expert}"

    @property
    def numel(self) -> int:
        """Number of values."""
        count = 1
        for s in self.shape:
            count *= s
        return count

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor."""
        return self.numel * self.itemsize

    @property
    def stacked(self) -> bool:
        """True for an expert tensor that holds every expert of its layer along one axis."""
        return self.expert_axis is not None


@dataclass(frozen=True)
class PartSizes:
    """Byte counts of one model's parts: what the server, the peers and FedAvg move."""

    shared: int  # every shared tensor (embedding, heads, norms)
    gate: int  # every gate tensor of every MoE layer
    expert: tuple[int, ...]  # one expert of MoE layer l
    num_experts: tuple[int, ...]  # E of MoE layer l
    expert_values: tuple[int, ...] = ()  # values of one expert of layer l (() in older manifests)

    def expert_on_wire(self, layer: int, itemsize: int | None) -> int:
        """Bytes of one expert of ``layer`` sent at ``itemsize`` bytes a value (``None``: as
        stored)."""
        if itemsize is None:
            return self.expert[layer]
        if not self.expert_values:
            from fedmoe.errors import InputError

            raise InputError(
                "these sizes predate per-expert value counts, so the bytes of a reduced-precision"
                " wire are unknown",
                hint="re-run fedmoe affinity on the round's checkpoints",
            )
        return self.expert_values[layer] * itemsize

    @property
    def experts(self) -> int:
        """Every expert of every layer."""
        return sum(b * e for b, e in zip(self.expert, self.num_experts, strict=True))

    @property
    def model(self) -> int:
        """The whole model."""
        return self.shared + self.gate + self.experts

    @property
    def server_part(self) -> int:
        """What a client uploads: shared parts and gates."""
        return self.shared + self.gate

    def to_dict(self) -> dict[str, object]:
        """JSON-ready (manifests' ``sizes``)."""
        return {
            "shared": self.shared,
            "gate": self.gate,
            "expert": list(self.expert),
            "num_experts": list(self.num_experts),
            "model": self.model,
            **({"expert_values": list(self.expert_values)} if self.expert_values else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> PartSizes:
        """Read ``sizes`` (schema 2; schema 1 wrote ``embed`` and scalar ``expert``)."""
        expert = data["expert"]
        num = data["num_experts"]
        experts = tuple(expert) if isinstance(expert, list) else (expert,)
        nums = tuple(num) if isinstance(num, list) else (num,)
        shared = data["shared"] if "shared" in data else data["embed"]
        values = data.get("expert_values", [])
        if not isinstance(values, list) or (values and len(values) != len(experts)):
            raise ValueError(f"expected one expert_values count per MoE layer, got {values!r}")
        return cls(
            _int(shared),
            _int(data["gate"]),
            tuple(_int(x) for x in experts),
            tuple(_int(x) for x in nums),
            tuple(_int(x) for x in values),
        )


MAX_PART_BYTES = 1 << 50  # a part of 1 PiB is no model a manifest describes: refused


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PART_BYTES:
        raise ValueError(f"expected a byte count up to 2**50, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelSchema:
    """Every tensor of a model with its role; built by :meth:`Layout.resolve`."""

    layout: str  # the layout's name
    entries: tuple[TensorEntry, ...]  # in name order
    num_experts: tuple[int, ...]  # E of each MoE layer

    @property
    def num_layers(self) -> int:
        """Number of MoE layers L."""
        return len(self.num_experts)

    @cached_property
    def _by_name(self) -> dict[str, TensorEntry]:
        return {e.name: e for e in self.entries}

    @property
    def names(self) -> tuple[str, ...]:
        """Every tensor name, in name order."""
        return tuple(e.name for e in self.entries)

    def entry(self, name: str) -> TensorEntry:
        """The entry of tensor ``name``."""
        return self._by_name[name]

    def role(self, name: str) -> Role:
        """The role of tensor ``name``."""
        return self._by_name[name].role

    def shared(self) -> tuple[TensorEntry, ...]:
        """The shared tensors."""
        return tuple(e for e in self.entries if e.role is Role.SHARED)

    def gates(self, layer: int | None = None) -> tuple[TensorEntry, ...]:
        """The gate tensors (of one MoE layer, or of all)."""
        return tuple(e for e in self.entries if e.role is Role.GATE and layer in (None, e.layer))

    def proxy(self, layer: int) -> str:
        """The name of MoE layer ``layer``'s proxy tensor (its gate weight, (E, H))."""
        for e in self.entries:
            if e.proxy and e.layer == layer:
                return e.name
        raise KeyError(f"no proxy tensor for MoE layer {layer}")

    def experts(self, layer: int | None = None) -> tuple[TensorEntry, ...]:
        """The expert tensors (of one MoE layer, or of all)."""
        return tuple(e for e in self.entries if e.role is Role.EXPERT and layer in (None, e.layer))

    def expert_name(self, slot: str, expert: int) -> str:
        """The per-expert tensor of ``slot`` for expert ``expert``."""
        return slot.replace("{expert}", str(expert))

    def sizes(self) -> PartSizes:
        """Byte counts of the model's parts."""
        shared = sum(e.nbytes for e in self.entries if e.role is Role.SHARED)
        gate = sum(e.nbytes for e in self.entries if e.role is Role.GATE)
        per: list[int] = []
        values: list[int] = []
        for layer, num in enumerate(self.num_experts):
            per.append(sum(e.nbytes for e in self.experts(layer)) // num)
            values.append(sum(e.numel for e in self.experts(layer)) // num)
        return PartSizes(shared, gate, tuple(per), self.num_experts, tuple(values))


@dataclass(frozen=True)
class Layout:
    """An architecture, declared as data: rules tried in order, first match wins."""

    name: str
    rules: tuple[TensorRule, ...]

    def resolve(
        self, shapes: Mapping[str, Sequence[int]], itemsizes: Mapping[str, int] | None = None
    ) -> ModelSchema:
        """The schema of a model with these tensors.

        Parameters
        ----------
        shapes
            Tensor name → shape.
        itemsizes
            Tensor name → bytes per value (default 4, float32).

        Raises
        ------
        InputError
            When a tensor matches no rule (naming the tensors), when no MoE layer is found, or
            when the expert counts of a layer disagree.
        """
        matched: list[tuple[str, TensorRule, int | None, int | None, str]] = []
        unmatched: list[str] = []
        explicit: set[int] = set()
        fixed_last = False
        for name in sorted(shapes):
            for rule in self.rules:
                m = rule.regex.match(name)
                if m is None:
                    continue
                groups = m.groupdict()
                layer = int(groups["layer"]) if groups.get("layer") is not None else rule.layer
                expert = int(groups["expert"]) if groups.get("expert") is not None else None
                if groups.get("layer") is not None:
                    explicit.add(int(groups["layer"]))
                elif rule.layer is not None and rule.layer < 0:
                    fixed_last = True
                slot = ""
                if expert is not None:
                    lo, hi = m.span("expert")
                    slot = name[:lo] + "{expert}" + name[hi:]
                matched.append((name, rule, layer, expert, slot))
                break
            else:
                unmatched.append(name)
        if unmatched:
            shown = ", ".join(unmatched[:5]) + (" …" if len(unmatched) > 5 else "")
            raise InputError(
                f"layout '{self.name}': {len(unmatched)} tensor(s) match no rule: {shown}",
                hint="declare the architecture's layout (which tensors are shared, gates, experts)",
            )
        rank = {block: r for r, block in enumerate(sorted(explicit))}  # MoE layers by rank
        num_layers = len(rank) + (1 if fixed_last else 0)
        entries: list[TensorEntry] = []
        experts: dict[int, set[int]] = {}
        for name, rule, found, expert, slot in matched:
            layer = found
            if layer is not None and layer < 0:
                layer += num_layers
            elif layer is not None and layer in rank and rule.layer is None:
                layer = rank[layer]
            shape = tuple(int(s) for s in shapes[name])
            if rule.role is not Role.SHARED:
                if layer is None:
                    raise InputError(f"layout '{self.name}': tensor {name} has no MoE layer")
                if rule.role is Role.EXPERT:
                    if rule.expert_axis is not None:
                        if len(shape) <= rule.expert_axis:
                            raise InputError(
                                f"tensor {name} of shape {list(shape)} has no expert axis "
                                f"{rule.expert_axis}"
                            )
                        count = shape[rule.expert_axis]
                    elif expert is not None:
                        count = expert + 1
                    else:
                        raise InputError(
                            f"layout '{self.name}': expert tensor {name} names no expert"
                        )
                    experts.setdefault(layer, set()).add(count)
            entries.append(
                TensorEntry(
                    name,
                    rule.role,
                    shape,
                    (itemsizes or {}).get(name, 4),
                    layer if rule.role is not Role.SHARED else None,
                    expert,
                    rule.expert_axis if rule.role is Role.EXPERT else None,
                    rule.proxy,
                    slot,
                )
            )
        if num_layers == 0:
            raise InputError(f"layout '{self.name}': the model has no MoE layer (no gate found)")
        num_experts: list[int] = []
        for layer in range(num_layers):
            proxies = [e for e in entries if e.proxy and e.layer == layer]
            if len(proxies) != 1:
                raise InputError(
                    f"layout '{self.name}': MoE layer {layer} has {len(proxies)} gate weights, "
                    "expected 1"
                )
            e_count = proxies[0].shape[0]
            counts = experts.get(layer, set())
            stacked = {
                x.shape[x.expert_axis]
                for x in entries
                if x.layer == layer and x.expert_axis is not None
            }
            per_expert = {x.expert for x in entries if x.layer == layer and x.expert is not None}
            if stacked - {e_count} or (per_expert and max(per_expert) + 1 > e_count) or not counts:
                raise InputError(
                    f"MoE layer {layer}: the gate {proxies[0].name} has {e_count} rows but the "
                    f"expert tensors hold "
                    f"{sorted(stacked | {max(per_expert, default=-1) + 1} - {0})} experts"
                )
            slots: dict[str, set[int]] = {}
            for x in entries:
                if x.layer == layer and x.expert is not None:
                    slots.setdefault(x.slot, set()).add(x.expert)
            for slot, held in sorted(slots.items()):
                absent = sorted(set(range(e_count)) - held)
                if absent:
                    raise InputError(
                        f"MoE layer {layer}: tensor {slot.replace('{expert}', str(absent[0]))} "
                        f"is missing ({len(absent)} of its {e_count} experts lack it)",
                        hint="every expert of a layer needs the same tensors; the checkpoint or "
                        "its index may be incomplete",
                    )
            num_experts.append(e_count)
        return ModelSchema(self.name, tuple(entries), tuple(num_experts))


FEDMOE_LAYOUT = Layout(
    "fedmoe",
    (
        TensorRule("embed.{name}", Role.SHARED),
        TensorRule("blocks.{layer}.gate.weight", Role.GATE, proxy=True),
        TensorRule("blocks.{layer}.gate.bias", Role.GATE),
        TensorRule("blocks.{layer}.experts.{name}", Role.EXPERT, expert_axis=0),
        TensorRule("gate.weight", Role.GATE, layer=-1, proxy=True),
        TensorRule("gate.bias", Role.GATE, layer=-1),
        TensorRule("experts.{name}", Role.EXPERT, layer=-1, expert_axis=0),
    ),
)
"""The built-in MoE classifier: embedding ``embed.*``; hidden MoE layers ``blocks.{l}.*`` (when
``moe_layers`` > 1); the classifying MoE layer ``gate.*`` / ``experts.*`` is the last one."""
