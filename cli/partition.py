"""``fedmoe partition``: split a dataset into federated clients with domain and label skew."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer

from fedmoe.data import BUILTIN, DataSpec
from fedmoe.data.spec import IMAGE_SIZE
from fedmoe.io.manifest import STDIO, base_dir, dumps
from fedmoe.partition import (
    PARTITIONERS,
    ClientSplit,
    Partition,
    get_partitioner,
    make_partition,
)
from fedmoe.partition.pipeline import GLOBAL_TEST, LOCAL_TEST, NUM_CLIENTS
from fedmoe.partition.small import MIN_TEST, MIN_TRAIN, SMALL_HINT, small_clients

from .common import Force, Json, Quiet, Seed, emit, handle_errors, stderr_console

if TYPE_CHECKING:
    from rich.console import Console

HELP = f"""Split a dataset into federated clients with domain and/or label skew.

Schemes: {"; ".join(f"[bold]{k}[/bold] {v.summary}" for k, v in PARTITIONERS.items())}.

Built-in datasets: {"; ".join(f"{k} ({v.summary})" for k, v in BUILTIN.items())}; or a .npz file
(arrays x, y, optional domain); a table (--label-column, --domain-column): a .csv file, a .parquet
file or folder of them, a folder saved by datasets' save_to_disk; a folder of images
root/DOMAIN/CLASS/*.png|jpg (--image-size, --grayscale); a .jsonl file or a folder of text by
domain. --standardize z-scores a table's features over all its samples (the global and local test
sets included).

Each client gets a local train/test split; a stratified global test set is held out first.
Prints the manifest path on stdout (the manifest itself with --json, or --out -). Warns on stderr
when a client gets fewer than --min-train training or --min-test local test samples.

Examples:

  fedmoe partition --dataset digits-rot --clients 20 --scheme domain --alpha 0.3 --out parts/p.json

  fedmoe partition --dataset data.csv --label-column y --domain-column site --scheme domain-label

  fedmoe partition --dataset digits-style --clients 12 --scheme domain --domains-per-client 1

  fedmoe partition --dataset pacs/ --image-size 64 --scheme domain --domains-per-client 1

  fedmoe partition --dataset train.parquet --label-column label --standardize
"""


def partition(
    dataset: Annotated[
        str, typer.Option(help="Built-in name, or a file or folder (see above).")
    ] = "digits-rot",
    clients: Annotated[
        int, typer.Option("--clients", "-n", help="Number of clients N.")
    ] = NUM_CLIENTS,
    scheme: Annotated[str, typer.Option(help=f"One of: {', '.join(PARTITIONERS)}.")] = "domain",
    alpha: Annotated[
        float | None, typer.Option(help="Dirichlet concentration (labels; domains for 'domain').")
    ] = None,
    alpha_domain: Annotated[
        float | None, typer.Option(help="Domain concentration for 'domain-label'.")
    ] = None,
    domains_per_client: Annotated[
        int | None, typer.Option(help="Exactly K domains per client ('domain', 'domain-label').")
    ] = None,
    classes_per_client: Annotated[
        int | None, typer.Option(help="Exactly K classes per client ('shards').")
    ] = None,
    shards_per_client: Annotated[
        int | None, typer.Option(help="Shards per client ('shards').")
    ] = None,
    size_dist: Annotated[
        str | None, typer.Option(help="'dirichlet' or 'lognormal' sizes ('quantity').")
    ] = None,
    sigma: Annotated[
        float | None, typer.Option(help="Log-normal size spread ('quantity').")
    ] = None,
    min_size: Annotated[
        int | None, typer.Option(help="Guaranteed samples per client (Dirichlet-type schemes).")
    ] = None,
    global_test: Annotated[
        float, typer.Option(help="Share held out as the global test set.")
    ] = GLOBAL_TEST,
    local_test: Annotated[
        float, typer.Option(help="Share of each client kept as local test.")
    ] = LOCAL_TEST,
    label_column: Annotated[
        str, typer.Option(help="Tables (CSV, Parquet, Arrow): the label column.")
    ] = "label",
    domain_column: Annotated[
        str | None, typer.Option(help="Tables (CSV, Parquet, Arrow): the domain column.")
    ] = None,
    standardize: Annotated[
        bool,
        typer.Option(
            "--standardize",
            help="Tables and .npz: z-score each feature over all samples (recorded).",
        ),
    ] = False,
    image_size: Annotated[
        int | None,
        typer.Option(
            min=1, max=1024, help=f"Image folders: resize to SIZE×SIZE (default {IMAGE_SIZE})."
        ),
    ] = None,
    grayscale: Annotated[
        bool, typer.Option("--grayscale", help="Image folders: one grey channel, not RGB.")
    ] = False,
    min_train: Annotated[
        int, typer.Option(min=0, help="Warn when a client has fewer training samples (0: off).")
    ] = MIN_TRAIN,
    min_test: Annotated[
        int, typer.Option(min=0, help="Warn when a client has fewer local test samples (0: off).")
    ] = MIN_TEST,
    plot: Annotated[
        Path | None,
        typer.Option(help="Also write client×label / client×domain heatmaps (needs fedmoe[plot])."),
    ] = None,
    seed: Seed = 0,
    out: Annotated[str, typer.Option("--out", "-o", help="Manifest path, or - for stdout.")] = (
        "partition.json"
    ),
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    from fedmoe.io.atomic import OutputSet
    from fedmoe.io.datasets import load_dataset
    from fedmoe.io.partition_file import partition_to_manifest

    console = stderr_console(quiet)
    options = {
        "alpha": alpha,
        "alpha_domain": alpha_domain,
        "domains_per_client": domains_per_client,
        "classes_per_client": classes_per_client,
        "shards_per_client": shards_per_client,
        "size_dist": size_dist,
        "sigma": sigma,
        "min_size": min_size,
    }
    partitioner = get_partitioner(scheme, {k: v for k, v in options.items() if v is not None})
    data_options: dict[str, object] = {}
    if standardize:
        data_options["standardize"] = True
    if image_size is not None:
        data_options["image_size"] = image_size
    if grayscale:
        data_options["grayscale"] = True
    spec = DataSpec(dataset, label_column, domain_column, data_options)
    with OutputSet(force) as outputs:
        if out != STDIO:
            outputs.reserve(Path(out))
        if plot is not None:
            outputs.reserve(plot)
        data = load_dataset(spec)
        part = make_partition(
            data.y,
            data.domain,
            clients,
            partitioner,
            seed,
            global_test,
            local_test,
            has_domains=data.has_domains,
        )
        manifest = partition_to_manifest(part, data, spec, base_dir(out))
        text = dumps(manifest)
        if plot is not None:
            from fedmoe.plots import partition_heatmaps

            png = partition_heatmaps(
                part.label_counts, part.domain_counts, data.class_names, data.domain_names
            )
            outputs.write_bytes(plot, png)
        if out != STDIO:
            outputs.write_bytes(Path(out), text.encode())
    if out == STDIO:
        typer.echo(text, nl=False)
    else:
        emit(out, manifest, json_)
    _summary(console, part, data.class_names, data.domain_names, scheme)
    warn_small_clients(console, part.clients, min_train, min_test if local_test > 0 else 0)


def warn_small_clients(
    console: Console, clients: Sequence[ClientSplit], min_train: int, min_test: int
) -> None:
    """One warning and its hint on stderr when clients fall below the minimum sample counts."""
    message = small_clients(clients, min_train, min_test)
    if message is not None:
        console.print(f"warning: {message}", style="yellow", markup=False, soft_wrap=True)
        console.print(f"hint: {SMALL_HINT}", markup=False, soft_wrap=True)


def _summary(
    console: Console,
    part: Partition,
    class_names: tuple[str, ...],
    domain_names: tuple[str, ...],
    scheme: str,
) -> None:
    """The Rich table on stderr: one row per client (the first 25), then the skew metrics."""
    if console.quiet:
        return
    from rich.table import Table  # the table of a partition, not its help: imported here

    table = Table(title=f"partition: {scheme}, {len(part.clients)} clients", title_justify="left")
    for col in ("client", "train", "test", "top labels", "domain mix"):
        table.add_column(col, justify="right" if col in ("client", "train", "test") else "left")
    for i, c in enumerate(part.clients[:25]):
        lab = part.label_counts[i]
        top = np.argsort(-lab, kind="stable")[:3]
        labels = " ".join(f"{class_names[k]}:{lab[k]}" for k in top if lab[k] > 0)
        dom = part.domain_counts[i]
        total = max(int(dom.sum()), 1)
        mix = " ".join(
            f"{domain_names[k]} {100 * dom[k] / total:.0f}%" for k in np.flatnonzero(dom)
        )
        table.add_row(str(i), str(c.train.size), str(c.test.size), labels, mix)
    if len(part.clients) > 25:
        table.add_row("…", "", "", f"{len(part.clients) - 25} more clients", "")
    console.print(table)
    m = part.metrics
    console.print(
        f"global test {part.global_test.size} · sizes {m['size_min']}–{m['size_max']} · "
        f"label JS {m['label_js_mean']:.3f} · domain JS {m['domain_js_mean']:.3f} · "
        f"domains per client {m['domain_effective_mean']:.2f}"
        + (f" · unassigned {part.unassigned.size}" if part.unassigned.size else "")
    )


command = handle_errors(partition)
