import os

import numpy as np
import pytest
from PIL import Image

from components.dataset import assign_splits, build_dataset, read_records, split_of, to_square_rgb
from components.errors import UserError
from components.params import DataParams
from components.sources import folder_items, limit_per_class, load_source, openmoji_items, unicode_names


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (80, 80), (255, 0, 0, 0))
    image.paste((255, 0, 0, 255), (30, 30, 50, 50))
    out = np.asarray(to_square_rgb(image, 80))
    assert out.shape == (80, 80, 3)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[40, 40]) == (255, 0, 0)


def test_grayscale_palette_and_16_bit_become_rgb():
    gray = Image.new("L", (64, 64), 100)
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    deep = Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16))
    assert tuple(np.asarray(to_square_rgb(gray, 64))[5, 5]) == (100, 100, 100)
    assert tuple(np.asarray(to_square_rgb(palette, 64))[5, 5]) == (10, 20, 30)
    assert tuple(np.asarray(to_square_rgb(deep, 64))[5, 5]) == (255, 255, 255)


def test_non_square_is_centre_cropped():
    image = Image.new("RGB", (96, 64), "blue")
    image.paste((255, 0, 0), (0, 0, 16, 64))  # left band falls outside the centre crop
    out = np.asarray(to_square_rgb(image, 64))
    assert out.shape == (64, 64, 3)
    assert (out[..., 2] == 255).all()


def test_small_images_are_refused_unless_upscaling():
    small = Image.new("RGB", (32, 32), "green")
    with pytest.raises(ValueError, match="data.upscale"):
        to_square_rgb(small, 64)
    assert to_square_rgb(small, 64, upscale=True).size == (64, 64)


def test_split_is_stable_and_near_the_fraction():
    names = [f"img{i}" for i in range(2000)]
    splits = [split_of(n, 0.1) for n in names]
    assert splits == [split_of(n, 0.1) for n in names]
    assert 0.07 < splits.count("val") / len(names) < 0.13


def test_subset_and_split_are_independent():
    subset = limit_per_class(openmoji_items(8), 40)
    val = [split_of(item.name, 0.2) for item in subset].count("val") / len(subset)
    assert 0.12 < val < 0.28


def test_unicode_names_give_group_and_name():
    assert unicode_names()["\U0001f600"] == ("Smileys & Emotion", "grinning face")


def test_openmoji_items_are_labelled_and_render():
    items = {item.name: item for item in openmoji_items(16)}
    assert len(items) > 4000
    assert items["1F600"].label == "Smileys & Emotion" and items["1F600"].caption == "grinning face"
    assert items["1F1E9-1F1EA"].label == "Flags"
    image = np.asarray(items["1F600"].load())
    assert image.shape == (16, 16, 3)
    assert image.std() > 10  # drew something, not a blank square


def test_limit_per_class_is_deterministic():
    items = openmoji_items(8)
    first, second = limit_per_class(items, 2), limit_per_class(items, 2)
    assert [i.name for i in first] == [i.name for i in second]
    labels = [i.label for i in first]
    assert max(labels.count(label) for label in set(labels)) == 2


def test_folder_labels_captions_and_bad_files(tmp_path, write_folder):
    write_folder(tmp_path)
    items, bad = folder_items(tmp_path)
    by_origin = {item.origin: item for item in items}
    assert by_origin["cats/c0.png"].caption == "a red cat"
    assert by_origin["dogs/d1.jpg"].label == "dogs" and by_origin["dogs/d1.jpg"].caption == "dogs"
    assert [b.path for b in bad] == ["notes.txt"]
    reasons = {}
    for origin in ("cats/corrupt.png", "dogs/empty.png", "cats/truncated.png"):
        with pytest.raises(ValueError) as caught:
            by_origin[origin].load()
        reasons[origin] = str(caught.value)
    assert "empty" in reasons["dogs/empty.png"]
    assert "not an image" in reasons["cats/corrupt.png"]
    assert "truncated" in reasons["cats/truncated.png"]


def test_folder_inputs_that_cannot_become_data_are_named_not_raised(tmp_path, monkeypatch):
    (tmp_path / "cats").mkdir()
    for name in ("a.png", "a.jpg", "huge.png"):
        Image.new("RGB", (100, 100), "red").save(tmp_path / "cats" / name)
    (tmp_path / "cats" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # 100 x 100 is then a decompression bomb
    items, bad = folder_items(tmp_path)
    reasons = {b.path: b.reason for b in bad}
    assert "same name as cats/a.jpg" in reasons["cats/a.png"]  # not both: one would overwrite the other
    assert "does not exist" in reasons["cats/gone.png"]
    with pytest.raises(ValueError, match="too large to decode safely"):
        next(item for item in items if item.origin == "cats/huge.png").load()


def test_hostile_folder_entries_become_named_bad_files_and_linked_class_folders_count(tmp_path, monkeypatch):
    """A FIFO would hang the reader, a name that is not UTF-8 breaks JSON and MLflow, an image
    between Pillow's limit and twice it would decode after a mere warning, a class folder linked
    from elsewhere was dropped silently, and a link back to a parent must not loop."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere" / "dogs"
    (root / "cats").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    Image.new("RGB", (20, 20), "red").save(root / "cats" / "a.png")
    Image.new("RGB", (20, 20), "blue").save(elsewhere / "d.png")
    Image.new("RGB", (40, 40), "red").save(root / "cats" / "bomb.png")  # 1,600 pixels: in the warning band
    (root / "dogs").symlink_to(elsewhere)
    (root / "cats" / "back").symlink_to(root)
    os.mkfifo(root / "cats" / "pipe.png")
    (root / os.fsdecode(b"caf\xe9.png")).write_bytes(b"latin-1 name")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    items, bad = folder_items(root)
    assert sorted(item.origin for item in items) == ["cats/a.png", "cats/bomb.png", "dogs/d.png"]
    reasons = {b.path: b.reason for b in bad}
    assert "not a regular file" in reasons["cats/pipe.png"]
    assert "not valid UTF-8" in reasons["caf\\xe9.png"]
    assert "read already (or a loop)" in reasons["cats/back"]
    with pytest.raises(ValueError, match="too large to decode safely .*40 x 40 pixels"):
        next(item for item in items if item.origin == "cats/bomb.png").load()


def test_a_caption_file_that_cannot_be_read_is_refused_by_name(tmp_path):
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "cats" / "c.png")
    (tmp_path / "captions.csv").write_text("file,caption\ncats/c.png," + "x" * 200_000 + "\n")
    with pytest.raises(UserError, match="field larger than field limit.*captions are short text"):
        folder_items(tmp_path)
    (tmp_path / "captions.csv").unlink()
    os.mkfifo(tmp_path / "captions.csv")  # opening it would wait for a writer forever
    with pytest.raises(UserError, match="captions.csv is not a regular file"):
        folder_items(tmp_path)


def test_captions_must_be_utf8_and_may_start_with_a_bom(tmp_path):
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "cats" / "c.png")
    (tmp_path / "captions.csv").write_text("file,caption\ncats/c.png,caf\u00e9 au lait\n", encoding="utf-8-sig")
    (item,), _ = folder_items(tmp_path)
    assert item.caption == "caf\u00e9 au lait"
    (tmp_path / "captions.csv").write_text("file,caption\ncats/c.png,caf\u00e9\n", encoding="latin-1")
    with pytest.raises(UserError, match=r"captions.csv is not UTF-8 \(byte 0xe9 .*save it as UTF-8"):
        folder_items(tmp_path)


def test_fingerprint_follows_folder_content(tmp_path, write_folder):
    write_folder(tmp_path)
    params = DataParams(source="folder", path=tmp_path, resolution=32)
    before = load_source(params).fingerprint
    assert load_source(params).fingerprint == before
    Image.new("RGB", (40, 40)).save(tmp_path / "cats" / "new.png")
    assert load_source(params).fingerprint != before


def _base_emoji(hexcode: str) -> str:
    """The issue's near-duplicate: the code points without skin tones and FE0F."""
    return "-".join(cp for cp in hexcode.split("-") if not 0x1F3FB <= int(cp, 16) <= 0x1F3FF and cp != "FE0F")


def test_openmoji_split_keeps_variants_of_an_emoji_together():
    items = openmoji_items(8)
    by_name = {item.caption: item.group for item in items}
    assert by_name["man cook: medium skin tone"] == by_name["woman cook"] == by_name["cook"] == "cook"
    assert by_name["couple with heart: woman, man"] == by_name["couple with heart: man, man"]
    holding = {"men holding hands", "women holding hands", "people holding hands", "woman and man holding hands"}
    assert len({by_name[name] for name in holding}) == 1
    assert by_name["mermaid"] == by_name["merman"] and by_name["person running facing right"] == by_name["man running"]
    flags = [item.group for item in items if item.label == "Flags"]
    assert len(set(flags)) == len(flags)  # each flag its own family
    assert by_name["keycap: 1"] != by_name["keycap: 2"]

    splits = [split for _, split in assign_splits([item.group for item in items], 0.1)]
    train = {_base_emoji(item.name) for item, split in zip(items, splits, strict=True) if split == "train"}
    val = [item for item, split in zip(items, splits, strict=True) if split == "val"]
    assert not [item.caption for item in val if _base_emoji(item.name) in train]
    assert 0.07 < len(val) / len(items) < 0.14


def test_folder_groups_and_identical_images_split_together(tmp_path):
    source = tmp_path / "images"
    (source / "cats").mkdir(parents=True)
    # Names that a per-file split would part: the group column and identical pixels must not.
    names = [f"c{i}" for i in range(40)]
    val_names = [n for n in names if split_of(f"cats/{n}", 0.5) == "val"]
    train_names = [n for n in names if split_of(f"cats/{n}", 0.5) == "train"]
    grouped = [val_names[0], train_names[0], val_names[1], train_names[1]]
    twins = [val_names[2], train_names[2]]  # byte-identical, no group
    for i, name in enumerate(names):
        colour = (200, 10, 10) if name in twins else (i * 6, 255 - i * 6, 40)
        Image.new("RGB", (16, 16), colour).save(source / "cats" / f"{name}.png")
    rows = [f"cats/{name}.png,family" for name in grouped]
    (source / "captions.csv").write_text("file,group\n" + "\n".join(rows) + "\n")
    items, bad = folder_items(source)
    assert not bad and {item.caption for item in items} == {"cats"}  # no caption column: the class
    manifest = build_dataset(
        items, bad, tmp_path / "data", resolution=16, val_fraction=0.5, upscale=False, strict=True, description={}
    )
    records = {r.file.removeprefix("images/cats/").removesuffix(".png"): r for r in read_records(tmp_path / "data")}
    assert len({records[n].split for n in grouped}) == 1 and {records[n].group for n in grouped} == {"family"}
    assert len({records[n].split for n in twins}) == 1 and records[twins[0]].group == records[twins[1]].group
    sides = {split: {r.group for r in records.values() if r.split == split} for split in ("train", "val")}
    assert not sides["train"] & sides["val"] and sides["train"] and sides["val"]
    assert manifest["groups"] == {
        "total": len(names) - 3 - 1,
        "train": len(sides["train"]),
        "val": len(sides["val"]),
        "shared_by_train_and_val": 0,
    }
    assert manifest["counts"]["val_fraction"] == round(manifest["counts"]["val"] / len(names), 4)


def test_metadata_without_a_group_column_still_reads(tmp_path):
    (tmp_path / "metadata.csv").write_text("file,label,caption,split\nimages/a.png,cats,a cat,val\n")
    (record,) = read_records(tmp_path)
    assert (record.file, record.split, record.group) == ("images/a.png", "val", "images/a.png")


def test_captions_need_a_caption_or_group_column(tmp_path):
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "cats" / "c.png")
    (tmp_path / "captions.csv").write_text("file,caption,group\ncats/c.png,a cat,pets\n")
    (item,), _ = folder_items(tmp_path)
    assert (item.caption, item.group) == ("a cat", "pets")
    (tmp_path / "captions.csv").write_text("file,label\ncats/c.png,x\n")
    with pytest.raises(UserError, match="file,caption .*group"):
        folder_items(tmp_path)
