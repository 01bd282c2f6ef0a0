"""The prepared dataset in ``data/``: square RGB PNGs, a metadata table, a manifest.

Layout (everything derived from the source and the parameters, nothing from the clock, so the
same inputs give byte-identical files and hence the same DVC version)::

    data/images/<name>.png   the prepared images
    data/metadata.csv        file,label,caption,split,group
    data/manifest.json       source, parameters, classes, counts, groups, skipped files, versions

The train/val split is drawn per group of near-duplicates (an emoji's skin-tone and gender
variants; a folder's ``group`` column), never per image, and images with the same prepared
pixels always share a group: no val image has a sibling in train.

It is built in a staging folder and swapped in whole, so a crash or a strict-mode refusal
never leaves a half-written ``data/``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from components.errors import UserError
from components.progress import track
from components.workspace import data_state_file, write_atomically

MANIFEST = "manifest.json"
METADATA = "metadata.csv"
IMAGES = "images"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Item:
    """One image a source offers for the dataset (``components.sources``), loaded only when built."""

    name: str  # stable, unique path of the prepared image under data/images/, without suffix
    origin: str  # what a report calls it: the source file, or the emoji's code points
    label: str
    caption: str
    load: Callable[[], Image.Image]  # a fully decoded image; raises on a bad file
    group: str = ""  # its near-duplicate family, split together; "" = its own name

    def __post_init__(self) -> None:
        if not self.group:
            object.__setattr__(self, "group", self.name)


@dataclass(frozen=True)
class BadFile:
    """A source file that could not be read, and why: the manifest lists it."""

    path: str
    reason: str


@dataclass(frozen=True)
class Record:
    file: str
    label: str
    caption: str
    split: str
    group: str = ""  # "" in a metadata.csv written before groups: then the file is its own group

    def __post_init__(self) -> None:
        if not self.group:
            object.__setattr__(self, "group", self.file)


def to_square_rgb(image: Image.Image, resolution: int, upscale: bool = False) -> Image.Image:
    """Any decoded image -> ``resolution`` x ``resolution`` RGB, or ValueError saying why not.

    EXIF rotation is applied; 16-bit and float images are scaled to 8 bits; palette, grey and
    alpha images are composited on white; non-square images are centre-cropped.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 else 1.0  # 16-bit range -> 8-bit range
        image = Image.fromarray(np.clip(values / scale, 0, 255).round().astype(np.uint8), "L")
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    if side < resolution and not upscale:
        raise ValueError(
            f"too small: {width}x{height} px is below the {resolution} px target "
            "(set data.upscale=true to upscale such images)"
        )
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return image


def split_of(name: str, val_fraction: float) -> str:
    """A fixed split per (group) name: stable when other files come or go."""
    # Salted so it is independent of other name hashes (e.g. the per-class subset's order).
    bucket = int(hashlib.sha256(f"split:{name}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if bucket < val_fraction else "train"


def connected(keys: Sequence[Iterable[Hashable]]) -> list[int]:
    """For each entry, the smallest index of the entries it is linked to through shared keys
    (directly or in a chain): the connected components of a union-find."""
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[Hashable, int] = {}
    for i, entry in enumerate(keys):
        for key in entry:
            j = first.setdefault(key, i)
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(len(keys))]


def assign_splits(
    groups: Sequence[str], val_fraction: float, digests: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """(group, split) per item. Groups whose items share a digest (the same prepared pixels)
    merge into one, named by its smallest group name; each group goes wholly to the split of
    ``split_of(name)``, so it stays put when other files come or go."""
    links = [[("group", g)] for g in groups]
    for entry, digest in zip(links, digests or [], strict=digests is not None):
        entry.append(("digest", digest))
    component = connected(links)
    name: dict[int, str] = {}
    for c, g in zip(component, groups, strict=True):
        name[c] = min(name.get(c, g), g)
    return [(name[c], split_of(name[c], val_fraction)) for c in component]


def bad_file_report(bad: Sequence[BadFile]) -> str:
    return "\n".join(f"  {b.path}: {b.reason}" for b in bad)


def build_dataset(
    items: Sequence[Item],
    bad: Sequence[BadFile],
    out_dir: Path,
    *,
    resolution: int,
    val_fraction: float,
    upscale: bool,
    strict: bool,
    description: dict[str, Any],
) -> dict[str, Any]:
    """Prepare every item into ``out_dir``; return the manifest. Bad files are skipped and
    listed, or with ``strict`` refused before ``out_dir`` is touched."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / IMAGES).mkdir(parents=True)
    bad = list(bad)
    prepared: list[tuple[Item, str, str]] = []  # item, file, digest of its pixels
    try:
        for item in track(items, "Preparing images"):
            try:
                image = to_square_rgb(item.load(), resolution, upscale)
            except ValueError as exc:
                bad.append(BadFile(item.origin, str(exc)))
                continue
            target = staging / IMAGES / f"{item.name}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target, format="PNG")
            digest = hashlib.sha256(image.tobytes()).hexdigest()
            prepared.append((item, target.relative_to(staging).as_posix(), digest))
        splits = assign_splits([p[0].group for p in prepared], val_fraction, [p[2] for p in prepared])
        records = [
            Record(file, item.label, item.caption, split, group)
            for (item, file, _), (group, split) in zip(prepared, splits, strict=True)
        ]
        if strict and bad:
            raise UserError(
                f"{len(bad)} bad file(s) and data.strict=true, so nothing was written:\n"
                f"{bad_file_report(bad)}\nRemove or fix them, or drop data.strict to skip them."
            )
        if not records:
            raise UserError("No usable images were found" + (f":\n{bad_file_report(bad)}" if bad else "."))
        manifest = _manifest(records, bad, description)
        _write_metadata(staging / METADATA, records)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def read_manifest(data_dir: Path) -> dict[str, Any]:
    return json.loads((Path(data_dir) / MANIFEST).read_text())


def read_records(data_dir: Path) -> list[Record]:
    with (Path(data_dir) / METADATA).open(newline="", encoding="utf-8") as handle:
        return [Record(**row) for row in csv.DictReader(handle)]


def records_by_split(data_dir: Path) -> dict[str, list[Record]]:
    """The train and val records, each in file order."""
    records = read_records(data_dir)
    return {split: [r for r in records if r.split == split] for split in ("train", "val")}


def is_current(root: Path, fingerprint: str, version: str | None) -> bool:
    """Whether ``data/`` was last built from the same fingerprint into ``version``."""
    state = Path(root) / data_state_file()
    if version is None or not state.exists():
        return False
    try:
        return json.loads(state.read_text()) == {"fingerprint": fingerprint, "version": version}
    except (ValueError, UnicodeDecodeError):  # damaged (a crash before writes were atomic): rebuild
        return False


def remember_build(root: Path, fingerprint: str, version: str) -> None:
    content = json.dumps({"fingerprint": fingerprint, "version": version})
    write_atomically(Path(root) / data_state_file(), lambda partial: partial.write_text(content))


def _manifest(records: list[Record], bad: list[BadFile], description: dict[str, Any]) -> dict[str, Any]:
    classes = sorted({r.label for r in records})
    per_class = {c: {"train": 0, "val": 0} for c in classes}
    for r in records:
        per_class[r.label][r.split] += 1
    groups = {split: {r.group for r in records if r.split == split} for split in ("train", "val")}
    val = sum(c["val"] for c in per_class.values())
    return {
        "format": FORMAT_VERSION,
        **description,
        "classes": classes,
        "counts": {
            "total": len(records),
            "train": sum(c["train"] for c in per_class.values()),
            "val": val,
            "val_fraction": round(val / len(records), 4),  # groups make it lumpier than data.val_fraction
            "skipped": len(bad),
            "per_class": per_class,
        },
        "groups": {  # near-duplicates (and identical images) share a group, and hence a split
            "total": len(groups["train"] | groups["val"]),
            "train": len(groups["train"]),
            "val": len(groups["val"]),
            "shared_by_train_and_val": len(groups["train"] & groups["val"]),  # 0 by construction
        },
        "skipped": [{"file": b.path, "reason": b.reason} for b in sorted(bad, key=lambda b: b.path)],
    }


def _write_metadata(path: Path, records: list[Record]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["file", "label", "caption", "split", "group"])
        for r in sorted(records, key=lambda r: r.file):
            writer.writerow([r.file, r.label, r.caption, r.split, r.group])


def _swap_in(staging: Path, out_dir: Path) -> None:
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_split(data_dir: Path, split: str | None = None) -> tuple[torch.Tensor, list[Record]]:
    """Images of one split (or all) as uint8 [N, 3, H, W], with their records, in file order."""
    records = [r for r in read_records(data_dir) if split is None or r.split == split]
    if not records:
        raise UserError(f"{data_dir} has no {split or ''} images: run `latentlab data` first.")
    images = np.stack([np.asarray(Image.open(Path(data_dir) / r.file).convert("RGB")) for r in records])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), records
