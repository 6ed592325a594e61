#!/usr/bin/env bash
# A whole federation of a tiny byte-level Mixtral-family MoE language model, built offline from a
# transformers config with random weights, on text-mix (Python code, English documentation, CSV
# data: files every Python installation with scikit-learn has), through fedmoe's commands:
# FedMoE-DA against FedAvg, naive MoE averaging and local training, ROUNDS rounds each from the
# same split and initial model. Needs `pip install -e ".[hf]"`. Prints per-domain perplexity and
# traffic per method and writes OUT/summary.json.
#
#   bash recipes/tiny-moe-lm.sh [OUT] [ROUNDS]
set -euo pipefail
out=${1:-runs/tiny-moe-lm}
rounds=${2:-3}
family=${FAMILY:-mixtral}
if [ -e "$out" ]; then
    echo "Error: $out exists; choose another folder or remove it" >&2
    exit 4
fi
mkdir -p "$out"
q=-q
exec 3>&1 1>/dev/null  # each command prints its output's path on stdout: only the table is kept
fedmoe partition --dataset text-mix --clients 6 --scheme domain --alpha 0.3 --seed 0 \
    --out "$out/partition.json" $q
fedmoe init --hf "$family" --embed-dim 64 --expert-hidden 128 --experts 4 --top-k 2 \
    --moe-layers 2 --partition "$out/partition.json" --seed 0 --out "$out/init" $q
for method in fedmoe-da fedavg naive-moe local; do
    model="$out/init"
    for r in $(seq 1 "$rounds"); do
        d="$out/$method/round-$r"
        fedmoe train-round --partition "$out/partition.json" --model "$model" --epochs 1 \
            --batch-size 32 --lr 3e-3 --round "$r" --seed 0 --out "$d/train" $q
        if [ "$method" = fedmoe-da ]; then
            fedmoe affinity "$d/train/train-round.json" --partition "$out/partition.json" \
                --out "$d/affinity.json" $q
            fedmoe plan-sync "$d/affinity.json" --top-p 2 --tau 0.1 --out "$d/plan.json" $q
            fedmoe aggregate --plan "$d/plan.json" "$d/train/train-round.json" --out "$d/models" $q
        else
            fedmoe aggregate --method "$method" "$d/train/train-round.json" --out "$d/models" $q
        fi
        model="$d/models/aggregate.json"
    done
    fedmoe evaluate --partition "$out/partition.json" "$model" --out "$out/$method/eval.json" $q
done
exec 1>&3
python - "$out" "$rounds" <<'EOF'
import json, sys
from pathlib import Path

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
rows = {}
for method in ("fedmoe-da", "fedavg", "naive-moe", "local"):
    ev = json.loads((out / method / "eval.json").read_text())
    server = p2p = fedavg = 0
    for r in range(1, rounds + 1):
        ledger = json.loads((out / method / f"round-{r}" / "models" / "aggregate.json").read_text())["ledger"]
        server += ledger["server_total"]
        p2p += ledger["p2p"]
        fedavg += ledger["fedavg_equivalent"]
    rows[method] = {
        "mean_local_ppl": ev["mean_local_ppl"],
        "worst_local_ppl": ev["worst_local_ppl"],
        "local_ppl_by_domain": dict(zip(ev["domain_names"], ev["local_ppl_by_domain"])),
        "server_bytes": server,
        "p2p_bytes": p2p,
        "fedavg_bytes": fedavg,
    }
(out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
names = list(next(iter(rows.values()))["local_ppl_by_domain"])
print("| method | mean local ppl | worst local ppl | " + " | ".join(names) + " | server MiB | p2p MiB |")
print("| --- | --- | --- | " + " | ".join("---" for _ in names) + " | --- | --- |")
for m, r in rows.items():
    doms = " | ".join(f"{r['local_ppl_by_domain'][n]:.2f}" for n in names)
    print(f"| {m} | {r['mean_local_ppl']:.2f} | {r['worst_local_ppl']:.2f} | {doms} | "
          f"{r['server_bytes'] / 2**20:.2f} | {r['p2p_bytes'] / 2**20:.2f} |")
EOF
