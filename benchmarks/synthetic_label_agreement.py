"""Does the teacher see the intended class in the synthetic images? (issue 14's "why")

Every pseudo-label artifact of an experiment store holds the teacher's class probabilities
for the synthetic images of one episode (`synthetic_probs`, in the order of
`synthetic_items`, whose folder names the class each image was generated for). Per
generator setting (generator, alpha, adapter steps) and split, this reports, over episodes:

- agreement: how often the teacher's arg-max is the class the image was made for
  (chance 1/N; the teacher's accuracy on real queries is the reference ceiling);
- the teacher's mean top probability on those images and on the base-class images of the
  same episode (images of no episode class: what "off-class" confidence looks like).

Reads only what `tint experiment` already stored; costs seconds:

    .venv/bin/python benchmarks/synthetic_label_agreement.py \\
        --store runs/offline-benchmark/store --out docs/results/synthetic-label-agreement
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from tint.io import load_tensors, write_json, write_text

SPLITS = Path(__file__).resolve().parent.parent / "tint" / "data" / "splits" / "openclipart.json"


def generator_setting(store: Path, item: str) -> dict:
    """The generator settings that made one synthetic image (from its generate marker)."""
    marker = json.loads((store / Path(item).parts[0] / Path(item).parts[1] / "done.json").read_text())
    key = marker["key"]
    spec, generate = key["specialization"], _as_dict(key["generate"])
    specialize = _as_dict(spec["specialize"])
    # the generator's weights by their key fingerprint: a re-trained generator is another row
    setting = {"generator": spec["name"], "weights": spec.get("weights"), "alpha": generate.get("alpha")}
    if spec["name"] == "tint-lora":
        setting.update(lora_steps=specialize.get("lora_steps"), lora_lr=specialize.get("lora_lr"))
    return setting


def _as_dict(value) -> dict:
    if isinstance(value, dict):
        return value
    import ast

    return ast.literal_eval(value)  # older keys hold settings as their repr (a literal)


def episode_row(store: Path, folder: Path, split_of: dict[str, str]) -> dict | None:
    """Agreement and confidences of one pseudo-label artifact, or None without synthetic images."""
    labels, meta = load_tensors(folder / "pseudo_labels.safetensors")
    items = meta.get("synthetic_items") or []
    if not items or "synthetic" not in labels:
        return None
    classes = meta["classes"]
    probs = labels["synthetic"].numpy()
    intended = np.array([classes.index(Path(item).parts[-2]) for item in items])
    base = labels["base"].numpy() if "base" in labels else np.zeros((0, len(classes)))
    return {
        "setting": generator_setting(store, items[0]),
        "split": split_of.get(classes[0], "?"),
        "classes": classes,
        "n_synthetic": len(items),
        "agreement": float((probs.argmax(1) == intended).mean()),
        "top_prob_synthetic": float(probs.max(1).mean()),
        "top_prob_base": float(base.max(1).mean()) if len(base) else float("nan"),
        "chance": 1 / len(classes),
    }


def mean_ci(values: list[float]) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[json.dumps([row["split"], row["setting"]], sort_keys=True)].append(row)
    out = []
    for key, members in sorted(groups.items()):
        split, setting = json.loads(key)
        agreement, ci = mean_ci([m["agreement"] for m in members])
        out.append({"split": split, "setting": setting, "episodes": len(members),
                    "agreement": agreement, "agreement_ci": ci, "chance": members[0]["chance"],
                    "top_prob_synthetic": float(np.mean([m["top_prob_synthetic"] for m in members])),
                    "top_prob_base": float(np.nanmean([m["top_prob_base"] for m in members]))})
    return out


def markdown(summary: list[dict], store: Path) -> str:
    lines = ["# Teacher agreement with the intended class of synthetic images", "",
             f"Store: `{store}`; one row per split and generator setting, mean over the "
             "episodes' pseudo-label artifacts (95% Student-t CI over episodes).", "",
             "| split | generator setting | episodes | agreement | chance | teacher top prob, "
             "synthetic | teacher top prob, base images |", "|---|---|---|---|---|---|---|"]
    for row in summary:
        setting = ", ".join(f"{k} {v}" for k, v in row["setting"].items())
        ci = "" if np.isnan(row["agreement_ci"]) else f" +- {100 * row['agreement_ci']:.1f}"
        lines.append(f"| {row['split']} | {setting} | {row['episodes']} | "
                     f"{100 * row['agreement']:.1f}{ci} % | {100 * row['chance']:.0f} % | "
                     f"{row['top_prob_synthetic']:.2f} | {row['top_prob_base']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=Path("runs/offline-benchmark/store"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/synthetic-label-agreement"))
    args = parser.parse_args(argv)
    splits = json.loads(SPLITS.read_text())
    split_of = {name: split for split in ("base", "val", "novel") for name in splits[split]}
    folders = sorted(p for p in (args.store / "pseudo").glob("*") if (p / "done.json").is_file())
    rows = [row for folder in folders if (row := episode_row(args.store, folder, split_of))]
    summary = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", {"store": str(args.store), "episodes": rows,
                                           "summary": summary})
    text = markdown(summary, args.store)
    write_text(args.out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
