"""Tests of brainvq.data: layouts, splits, decoding, the uint8 cache and the torch side."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brainvq import data
from brainvq.data import DataError, SliceItem, SliceDataset, load_split, make_loader, split_pool, to_slice
from helpers import brain_slice, make_oasis_tree


# ----------------------------------------------------------------------------- small helpers


def load_all(root: Path, seed: int = 0, **kwargs) -> dict[str, data.SliceSet]:
    return {split: load_split(root, split, seed, **kwargs) for split in ("train", "val", "test")}


def snapshot(sets: dict[str, data.SliceSet]) -> dict[str, tuple[list[str], np.ndarray]]:
    """Plain copies (no memmap) of each split's paths and pixels, safe to keep while the cache is mangled."""
    return {name: ([item.path for item in s.items], np.array(s.images, copy=True)) for name, s in sets.items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0], name
        np.testing.assert_array_equal(a[name][1], b[name][1], err_msg=name)


def cache_files(cache_dir: Path, part: str = "pool") -> tuple[Path, Path]:
    npys = sorted(cache_dir.glob(f"*-{part}-*.npy"))
    assert len(npys) == 1, npys
    return npys[0], npys[0].with_suffix(".json")


def temp_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob(".*.tmp"))


def cases(s: data.SliceSet) -> set[str]:
    return {item.case for item in s.items}


# ----------------------------------------------------------------------------- splits


def test_oasis_split_is_by_case_and_test_stays_apart(oasis_tree):
    sets = load_all(oasis_tree)
    train, val, test = sets["train"], sets["val"], sets["test"]
    # 16 train + 4 validate cases are pooled (20 cases x 3 slices); 10% of the cases = 2 go to validation.
    assert (len(train), len(val), len(test)) == (54, 6, 6)
    assert len(cases(val)) == 2 and len(cases(train)) == 18
    assert cases(train).isdisjoint(cases(val))
    assert cases(test) == {"021", "022"} and cases(test).isdisjoint(cases(train) | cases(val))
    for s in (train, val, test):  # every slice of a case is on the same side
        per_case = {case: sum(item.case == case for item in s.items) for case in cases(s)}
        assert set(per_case.values()) == {3}
        assert all(item.slice_index in (0, 1, 2) for item in s.items)
    assert {item.path.split("/")[0] for item in train.items + val.items} == {
        "keras_png_slices_train", "keras_png_slices_validate"}
    assert {item.path.split("/")[0] for item in test.items} == {"keras_png_slices_test"}
    assert train.layout == val.layout == test.layout == "oasis"
    assert train.images.shape == (54, 256, 256) and train.images.dtype == np.uint8


@pytest.mark.parametrize("n_cases", [3, 12, 20, 35, 100])
def test_split_pool_holds_out_ten_percent_of_cases(n_cases):
    items = [SliceItem(f"c{c}_s{s}.png", case=f"{c:03d}", slice_index=s) for c in range(n_cases) for s in range(4)]
    train, val = split_pool(items, seed=7)
    val_cases = {items[i].case for i in val}
    assert len(val_cases) == max(1, round(n_cases * 0.1))
    assert val_cases.isdisjoint({items[i].case for i in train})
    assert sorted(train + val) == list(range(len(items)))
    assert len(val) == 4 * len(val_cases)


def test_split_is_deterministic_for_a_seed_and_changes_with_it(oasis_tree, tmp_path, monkeypatch):
    first = [item.path for item in load_split(oasis_tree, "val", seed=0).items]
    again = [item.path for item in load_split(oasis_tree, "val", seed=0).items]
    monkeypatch.setenv("BRAINVQ_CACHE", str(tmp_path / "other-cache"))  # a cold cache gives the same split
    cold = [item.path for item in load_split(oasis_tree, "val", seed=0).items]
    assert first == again == cold
    others = [[item.path for item in load_split(oasis_tree, "val", seed=s).items] for s in (1, 2, 3)]
    assert any(other != first for other in others)
    # The same seed over the same items gives the same indices on any call (no hidden global RNG state).
    np.random.seed(123)
    items = load_split(oasis_tree, "train", seed=0).items + load_split(oasis_tree, "val", seed=0).items
    assert split_pool(items, 5) == split_pool(items, 5)


def test_folder_layout_splits_90_10_by_file(folder_tree):
    sets = load_all(folder_tree)
    train, val, test = sets["train"], sets["val"], sets["test"]
    assert (len(train), len(val), len(test)) == (36, 4, 6)
    train_paths, val_paths = {i.path for i in train.items}, {i.path for i in val.items}
    assert train_paths.isdisjoint(val_paths)
    listed = {str(p.relative_to(folder_tree)) for p in (folder_tree / "train").rglob("*.jpg")}
    assert train_paths | val_paths == listed
    assert {i.label for i in train.items} == {"ClassA", "ClassB"}
    assert all(i.case is None and i.slice_index is None for i in train.items + val.items)
    assert all(i.label is None for i in test.items)  # test/ has no class folders
    assert train.layout == "folder"


def test_kaggle_names_give_volumes_and_halves_never_share_one():
    """'N (k).jpg' is slice N of volume k of its class folder ('N.jpg': the first volume); other names have none.
    volume_halves cuts by volume, so a volume is wholly on one side; OASIS items go by case."""
    names = [f"{n} ({k}).jpg" for k in (2, 3, 4, 5) for n in (26, 27, 28)] + ["26.jpg", "27.jpg"]
    items = [SliceItem(f"test/{label}/{name}", label=label) for label in ("Mild", "Non") for name in names]
    assert data.kaggle_volume(items[0]) == "test/Mild/2" and data.kaggle_volume(items[12]) == "test/Mild/0"
    assert data.kaggle_position(items[1]) == ("test/Mild/2", 27) and data.kaggle_position(items[13]) == ("test/Mild/0", 27)
    assert data.kaggle_volume(SliceItem("train/Non/nonDem12.jpg", label="Non")) is None
    first, second = data.volume_halves(items, seed=0)
    assert sorted(first + second) == list(range(len(items)))
    volumes = [{data.kaggle_volume(items[i]) for i in half} for half in (first, second)]
    assert volumes[0].isdisjoint(volumes[1]) and len(volumes[0]) == len(volumes[1]) == 5
    assert data.volume_halves(items, seed=0) == (first, second) != data.volume_halves(items, seed=1)
    oasis = [SliceItem(f"case_{c:03d}_slice_{s}.nii.png", case=f"{c:03d}", slice_index=s) for c in range(6) for s in range(3)]
    cases = [{oasis[i].case for i in half} for half in data.volume_halves(oasis, seed=0)]
    assert cases[0].isdisjoint(cases[1]) and len(cases[0]) == 3


def test_data_dir_from_environment(folder_tree, monkeypatch):
    monkeypatch.setenv("BRAINVQ_DATA", str(folder_tree))
    assert len(load_split(None, "test")) == 6
    with pytest.raises(ValueError, match="train, val or test"):
        load_split(folder_tree, "validation")


# ----------------------------------------------------------------------------- pixels


def test_items_are_float32_1x256x256_in_unit_range(oasis_tree):
    train = load_split(oasis_tree, "train")
    dataset = SliceDataset(train.images)
    assert len(dataset) == 54
    for index in (0, 17, 53):
        x = dataset[index]
        assert x.dtype == torch.float32 and x.shape == (1, 256, 256)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        torch.testing.assert_close(x[0] * 255.0, torch.from_numpy(train.images[index].astype(np.float32)))
    assert float(dataset[0].max()) > 0.5  # the bright "brain" survived
    batches = list(data.iter_batches(train.images, 16))
    assert [b.shape[0] for b in batches] == [16, 16, 16, 6]
    assert all(b.dtype == torch.float32 and b.shape[1:] == (1, 256, 256) for b in batches)
    torch.testing.assert_close(torch.cat(batches)[17], dataset[17])


def test_native_256_needs_no_notes():
    out, notes = to_slice(Image.fromarray(brain_slice(256, 256, seed=1)))
    assert notes == []
    np.testing.assert_array_equal(out, brain_slice(256, 256, seed=1))


def test_small_image_is_centred_on_black():
    # 176 wide x 208 high (the Kaggle slices): 40 black columns each side, 24 black rows top and bottom.
    out, notes = to_slice(Image.new("L", (176, 208), 200))
    assert out.shape == (256, 256) and out.dtype == np.uint8
    assert (out[24:232, 40:216] == 200).all()
    assert out[:24].max() == 0 and out[232:].max() == 0 and out[:, :40].max() == 0 and out[:, 216:].max() == 0
    assert notes == ["centre-padded 176x208 with black to 256x256"]
    assert data.content_box((208, 176)) == (24, 40, 208, 176)
    # Odd margins put the extra black row/column after the image.
    out, _ = to_slice(Image.new("L", (175, 207), 9))
    rows, cols = np.nonzero(out)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (24, 230, 40, 214)


def test_folder_images_are_padded_at_exact_offsets(folder_tree):
    for s in load_all(folder_tree).values():
        images = np.asarray(s.images)
        assert images[:, :24].max() == 0 and images[:, 232:].max() == 0
        assert images[:, :, :40].max() == 0 and images[:, :, 216:].max() == 0
        assert images[:, 24:232, 40:216].min() > 0  # the image itself never touches 0


@pytest.mark.parametrize("size,resized", [((512, 384), (256, 192)), ((300, 200), (256, 171)),
                                          ((208, 400), (133, 256)), ((1024, 1024), (256, 256))])
def test_large_image_is_resized_keeping_aspect_then_padded(size, resized):
    out, notes = to_slice(Image.new("L", size, 180))
    width, height = resized
    top, left = (256 - height) // 2, (256 - width) // 2
    assert data.content_box((size[1], size[0])) == (top, left, height, width)
    rows, cols = np.nonzero(out)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (top, top + height, left, left + width)
    assert abs(int(out[top + height // 2, left + width // 2]) - 180) <= 1
    assert f"resized {size[0]}x{size[1]} to {width}x{height} keeping the aspect ratio" in notes
    assert any(note.startswith("centre-padded") for note in notes) == (resized != (256, 256))


def test_16_bit_images_are_rescaled(tmp_path):
    array = np.array([[0, 257, 32768, 65535]] * 4, dtype=np.uint16)
    image = Image.fromarray(array)
    assert image.mode == "I;16"
    out, notes = to_slice(image)
    assert out[126, 126:130].tolist() == [0, 1, 128, 255]
    assert notes[0] == "rescaled I;16 intensities to 8 bits"
    # Through a real 16-bit PNG on disk.
    path = tmp_path / "deep.png"
    image.save(path)
    assert data.read_slice(path)[126, 126:130].tolist() == [0, 1, 128, 255]
    # 32-bit integer and float images are scaled by their maximum.
    out, notes = to_slice(Image.fromarray(np.array([[0, 500, 1000]] * 3, dtype=np.int32)))
    assert out[127, 126:129].tolist() == [0, 128, 255] and notes[0] == "rescaled I intensities to 8 bits"
    out, notes = to_slice(Image.fromarray(np.array([[0.0, 0.5, 2.0]] * 3, dtype=np.float32)))
    assert out[127, 126:129].tolist() == [0, 64, 255] and notes[0] == "rescaled F intensities to 8 bits"


def test_rgba_is_flattened_onto_black():
    array = np.zeros((256, 256, 4), dtype=np.uint8)
    array[:128] = (255, 0, 0, 255)    # opaque red
    array[128:] = (255, 255, 255, 0)  # fully transparent white
    out, notes = to_slice(Image.fromarray(array))
    assert notes == ["flattened transparency onto black", "converted RGBA to grayscale"]
    assert set(np.unique(out[:128]).tolist()) == {76}  # ITU-R 601 luma of pure red
    assert out[128:].max() == 0


def test_palette_and_rgb_convert_to_grayscale():
    palette = Image.new("P", (256, 256), 1)
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    out, notes = to_slice(palette)
    assert notes == ["converted P to grayscale"] and (out == 255).all()
    palette.info["transparency"] = 1  # index 1 is see-through
    out, notes = to_slice(palette)
    assert notes == ["flattened transparency onto black", "converted RGBA to grayscale"] and out.max() == 0
    out, notes = to_slice(Image.new("RGB", (256, 256), (10, 200, 30)))
    assert notes == ["converted RGB to grayscale"] and (out == Image.new("RGB", (1, 1), (10, 200, 30)).convert("L").getpixel((0, 0))).all()
    out, notes = to_slice(Image.new("LA", (176, 208), (200, 255)))
    assert notes[:2] == ["flattened transparency onto black", "converted RGBA to grayscale"]
    assert out[24:232, 40:216].min() == 200


def test_odd_modes_load_through_the_folder_layout(folder_tree):
    rgba = np.zeros((208, 176, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(folder_tree / "test" / "rgba.png")
    Image.fromarray(np.full((208, 176), 65535, dtype=np.uint16)).save(folder_tree / "test" / "deep.png")
    test = load_split(folder_tree, "test")
    by_name = {Path(item.path).name: np.asarray(test.images[i]) for i, item in enumerate(test.items)}
    assert len(test) == 8
    assert by_name["rgba.png"][24:232, 40:216].min() == 76 and by_name["rgba.png"][:24].max() == 0
    assert (by_name["deep.png"][24:232, 40:216] == 255).all() and by_name["deep.png"][:, :40].max() == 0


# ----------------------------------------------------------------------------- cache


def test_second_load_decodes_nothing(oasis_tree, cache_dir, monkeypatch):
    first = snapshot(load_all(oasis_tree))
    npy, manifest = cache_files(cache_dir, "pool")
    assert manifest.exists() and cache_files(cache_dir, "test")[1].exists() and temp_files(cache_dir) == []
    assert json.loads(manifest.read_text())["layout"] == "oasis"
    calls = []

    def no_decode(path):
        calls.append(path)
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(data, "read_slice", no_decode)
    sets = load_all(oasis_tree)
    assert calls == []
    assert isinstance(sets["test"].images, np.memmap)  # served straight from the cache file
    assert_same(first, snapshot(sets))


def test_each_root_has_its_own_cache(tmp_path, cache_dir):
    a = make_oasis_tree(tmp_path / "a", train_cases=4, validate_cases=1, test_cases=1, seed=1)
    b = make_oasis_tree(tmp_path / "b", train_cases=4, validate_cases=1, test_cases=1, seed=2)
    test_a, test_b = np.array(load_split(a, "test").images), np.array(load_split(b, "test").images)
    assert not np.array_equal(test_a, test_b)
    assert len(list(cache_dir.glob("*.npy"))) == 2
    np.testing.assert_array_equal(np.array(load_split(a, "test").images), test_a)


def _truncate(npy: Path) -> None:
    with open(npy, "r+b") as file:
        file.truncate(npy.stat().st_size // 2)


def _scribble_body(npy: Path) -> None:  # same size, header intact, pixels garbage
    size = npy.stat().st_size
    with open(npy, "r+b") as file:
        file.seek(size // 2)
        file.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _scribble_all(npy: Path) -> None:  # same size, header garbage too
    size = npy.stat().st_size
    npy.write_bytes(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes())


def _scribble_manifest(npy: Path) -> None:
    npy.with_suffix(".json").write_text('{"version": 1, "fingerp')


@pytest.mark.parametrize("damage,reason", [(_truncate, "modified or truncated"),
                                           (_scribble_body, "modified or truncated"),
                                           (_scribble_all, "modified or truncated"),
                                           (_scribble_manifest, "unreadable")])
def test_damaged_cache_is_detected_and_rebuilt(oasis_tree, cache_dir, capsys, damage, reason):
    first = snapshot(load_all(oasis_tree))
    npy, _ = cache_files(cache_dir, "pool")
    time.sleep(0.02)  # a later write gets a later mtime even on coarse-clock file systems
    damage(npy)
    capsys.readouterr()
    again = snapshot(load_all(oasis_tree))
    out = capsys.readouterr().out
    assert f"rebuilding cache {npy.name}: " in out and reason in out
    assert_same(first, again)
    capsys.readouterr()
    load_all(oasis_tree)  # and the rebuilt cache is trusted again
    assert capsys.readouterr().out == ""


def test_wrong_array_shape_is_not_trusted(oasis_tree, cache_dir, capsys):
    first = snapshot(load_all(oasis_tree))
    npy, manifest_path = cache_files(cache_dir, "pool")
    np.save(npy, np.zeros((3, 256, 256), dtype=np.uint8))  # a valid .npy, but not this partition's
    manifest = json.loads(manifest_path.read_text())
    stat = npy.stat()
    manifest.update(npy_size=stat.st_size, npy_mtime_ns=stat.st_mtime_ns)
    manifest_path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert_same(first, snapshot(load_all(oasis_tree)))
    assert "the array has shape (3, 256, 256)" in capsys.readouterr().out


class Killed(BaseException):
    """Stands in for the process dying (KeyboardInterrupt-like: not an Exception)."""


def test_build_killed_while_writing_the_array_leaves_nothing(oasis_tree, cache_dir, monkeypatch):
    real_save = np.save

    def half_then_die(file, array, allow_pickle=False):
        file.write(b"\x93NUMPY" + b"\0" * 1000)
        raise Killed

    monkeypatch.setattr(data.np, "save", half_then_die)
    with pytest.raises(Killed):
        load_split(oasis_tree, "train")
    assert list(cache_dir.iterdir()) == []  # no array, no manifest, no temp file
    monkeypatch.setattr(data.np, "save", real_save)
    train = load_split(oasis_tree, "train")
    assert len(train) == 54 and cache_files(cache_dir)[1].exists()


def test_build_killed_before_the_manifest_is_not_trusted(oasis_tree, cache_dir, monkeypatch, capsys):
    first = snapshot(load_all(oasis_tree))
    # The images change, and the rebuild dies after the new array but before its manifest.
    changed = oasis_tree / "keras_png_slices_train" / "case_001_slice_0.nii.png"
    Image.fromarray(np.full((256, 256), 7, dtype=np.uint8)).save(changed)
    real_write_json = data.atomic_write_json

    def die(path, obj):
        raise Killed

    monkeypatch.setattr(data, "atomic_write_json", die)
    with pytest.raises(Killed):
        load_split(oasis_tree, "train")
    npy, manifest = cache_files(cache_dir, "pool")
    assert npy.exists() and not manifest.exists()  # the old manifest is gone: it cannot vouch for the new array
    monkeypatch.setattr(data, "atomic_write_json", real_write_json)
    capsys.readouterr()
    sets = load_all(oasis_tree)
    assert "rebuilding cache" in capsys.readouterr().out
    paths = [item.path for item in sets["train"].items + sets["val"].items]
    index = paths.index(str(changed.relative_to(oasis_tree)))
    assert (np.concatenate([sets["train"].images, sets["val"].images])[index] == 7).all()
    assert_same({"test": first["test"]}, {"test": snapshot(sets)["test"]})


def test_stray_temp_file_and_missing_manifest_after_sigkill(oasis_tree, cache_dir, capsys):
    first = snapshot(load_all(oasis_tree))
    npy, manifest = cache_files(cache_dir, "pool")
    # What a SIGKILL in the middle of a rebuild leaves: no manifest, a half temp file, the old array.
    manifest.unlink()
    stray = cache_dir / f".{npy.name}.abc123.tmp"
    stray.write_bytes(b"\x93NUMPY half")
    capsys.readouterr()
    assert_same(first, snapshot(load_all(oasis_tree)))
    assert "rebuilding cache" in capsys.readouterr().out
    assert manifest.exists()
    # A manifest whose array is missing is not trusted either.
    npy.unlink()
    assert_same(first, snapshot(load_all(oasis_tree)))
    assert "rebuilding cache" in capsys.readouterr().out


def test_changed_added_and_removed_files_invalidate_the_cache(folder_tree, capsys):
    first = load_split(folder_tree, "test")
    assert len(first) == 6
    target = folder_tree / "test" / "test_002.png"
    time.sleep(0.02)
    Image.fromarray(np.full((208, 176), 33, dtype=np.uint8)).save(target)
    capsys.readouterr()
    test = load_split(folder_tree, "test")
    assert "the image files changed since it was built" in capsys.readouterr().out
    index = [Path(item.path).name for item in test.items].index("test_002.png")
    assert (np.asarray(test.images[index])[24:232, 40:216] == 33).all()
    Image.fromarray(brain_slice(208, 176, seed=99)).save(folder_tree / "test" / "zz_new.png")
    assert len(load_split(folder_tree, "test")) == 7
    (folder_tree / "test" / "test_000.png").unlink()
    (folder_tree / "test" / "zz_new.png").unlink()
    test = load_split(folder_tree, "test")
    assert len(test) == 5 and "test/test_000.png" not in {item.path for item in test.items}
    # Train/val are re-derived from the changed pool as well.
    (folder_tree / "train" / "ClassA" / "img_000.jpg").unlink()
    assert len(load_split(folder_tree, "train")) + len(load_split(folder_tree, "val")) == 39


# ----------------------------------------------------------------------------- bad input


def test_corrupt_image_raises_naming_the_file(folder_tree):
    bad = folder_tree / "train" / "ClassB" / "img_003.jpg"
    bad.write_bytes(b"this is not a JPEG")
    with pytest.raises(DataError) as error:
        load_split(folder_tree, "train")
    assert str(bad) in str(error.value) and "--skip-bad" in str(error.value)


def test_truncated_png_raises_naming_the_file(oasis_tree):
    bad = oasis_tree / "keras_png_slices_test" / "case_021_slice_1.nii.png"
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(DataError, match="case_021_slice_1.nii.png"):
        load_split(oasis_tree, "test")


def test_skip_bad_skips_with_a_counted_warning(folder_tree):
    bad = [folder_tree / "train" / "ClassA" / "img_005.jpg", folder_tree / "train" / "ClassB" / "img_010.jpg"]
    for path in bad:
        path.write_bytes(b"\x89PNG garbage")
    with pytest.warns(UserWarning, match=r"Skipped 2 undecodable image\(s\)"):
        train = load_split(folder_tree, "train", skip_bad=True)
    val = load_split(folder_tree, "val", skip_bad=True)  # from the cache: no warning needed, same pool
    assert len(train) + len(val) == 38 and len(val) == 4
    kept = {item.path for item in train.items + val.items}
    assert not kept & {str(p.relative_to(folder_tree)) for p in bad}
    assert len(train.images) == len(train.items)
    with pytest.raises(DataError, match="img_005.jpg"):  # a skip_bad cache never serves a strict load
        load_split(folder_tree, "train")


def test_every_image_bad_is_an_error(folder_tree):
    for path in (folder_tree / "test").iterdir():
        path.write_bytes(b"nope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="failed to decode"):
            load_split(folder_tree, "test", skip_bad=True)


@pytest.mark.parametrize("make", ["missing", "empty", "unrelated"])
def test_unknown_folder_names_the_expected_layouts(tmp_path, make):
    root = tmp_path / "data"
    if make != "missing":
        root.mkdir()
    if make == "unrelated":
        (root / "pictures").mkdir()
        Image.new("L", (8, 8)).save(root / "pictures" / "a.png")
    with pytest.raises(DataError) as error:
        load_split(root, "train")
    message = str(error.value)
    assert str(root) in message
    assert "keras_png_slices_data" in message and "train/" in message and "--data-dir" in message
    if make == "missing":
        assert "does not exist" in message


def test_empty_train_and_test_folders_say_so(tmp_path):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "train" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="No PNG or JPEG slices found in the train/validate part") as error:
        load_split(root, "train")
    assert "keras_png_slices_data" in str(error.value)


def test_nested_oasis_folder_suggests_the_right_path(tmp_path):
    make_oasis_tree(tmp_path / "download" / "keras_png_slices_data", train_cases=2, validate_cases=1,
                    test_cases=1, slices=1)
    with pytest.raises(DataError, match="one level down"):
        load_split(tmp_path / "download", "train")


def test_missing_oasis_subfolder_is_named(oasis_tree):
    for path in (oasis_tree / "keras_png_slices_validate").iterdir():
        path.unlink()
    (oasis_tree / "keras_png_slices_validate").rmdir()
    with pytest.raises(DataError, match="keras_png_slices_validate.*is missing"):
        load_split(oasis_tree, "train")


@pytest.mark.parametrize("name", ["brain_001.png", "case_7_slice.nii.png", "case_x_slice_1.nii.png"])
def test_misnamed_oasis_file_is_a_clear_error(oasis_tree, name):
    Image.fromarray(brain_slice(256, 256, seed=3)).save(oasis_tree / "keras_png_slices_validate" / name)
    with pytest.raises(DataError) as error:
        load_split(oasis_tree, "val")
    assert name in str(error.value) and "case_NNN_slice_S.nii.png" in str(error.value)


# ----------------------------------------------------------------------------- torch side


def _positions(size: int, axis: int, n: int) -> np.ndarray:
    ramp = np.arange(size, dtype=np.uint8)
    image = np.broadcast_to(ramp[:, None] if axis == 0 else ramp[None, :], (size, size))
    return np.ascontiguousarray(np.broadcast_to(image, (n, size, size)))


def test_crops_are_fixed_by_seed_epoch_and_index():
    rows, cols = _positions(256, 0, 12), _positions(256, 1, 12)

    def windows(seed: int, epoch: int) -> list[tuple[int, int]]:
        by_row, by_col = SliceDataset(rows, crop=64, seed=seed), SliceDataset(cols, crop=64, seed=seed)
        by_row.set_epoch(epoch)
        by_col.set_epoch(epoch)
        out = []
        for index in range(len(by_row)):
            a, b = by_row[index], by_col[index]
            assert a.shape == (1, 64, 64) and a.dtype == torch.float32
            top, left = round(float(a[0, 0, 0]) * 255), round(float(b[0, 0, 0]) * 255)
            assert 0 <= top <= 192 and 0 <= left <= 192
            assert round(float(a[0, 63, 0]) * 255) == top + 63 and round(float(b[0, 0, 63]) * 255) == left + 63
            out.append((top, left))
        return out

    base = windows(seed=0, epoch=0)
    assert windows(seed=0, epoch=0) == base  # a fresh dataset (e.g. after a resume) sees the same crops
    assert len(set(base)) > 1  # different indices, different windows
    assert windows(seed=0, epoch=1) != base and windows(seed=1, epoch=0) != base
    # Reading order does not matter: an item's crop depends only on (seed, epoch, index).
    dataset = SliceDataset(rows, crop=64, seed=0)
    assert [round(float(dataset[i][0, 0, 0]) * 255) for i in reversed(range(12))] == [t for t, _ in base][::-1]
    # No crop, or a crop as large as the image, returns the whole slice.
    assert SliceDataset(rows, crop=None)[3].shape == (1, 256, 256)
    assert SliceDataset(rows, crop=256)[3].shape == (1, 256, 256)


def _order(loader) -> list[int]:
    return [round(v) for batch in loader for v in (batch[:, 0, 0, 0] * 255).tolist()]


def test_loader_shuffle_is_fixed_by_seed():
    images = np.repeat(np.arange(40, dtype=np.uint8)[:, None, None], 8, axis=1).repeat(8, axis=2)
    dataset = SliceDataset(images)
    a = _order(make_loader(dataset, batch_size=6, shuffle=True, seed=3))
    b = _order(make_loader(dataset, batch_size=6, shuffle=True, seed=3))
    c = _order(make_loader(dataset, batch_size=6, shuffle=True, seed=4))
    assert a == b and sorted(a) == list(range(40))
    assert a != list(range(40)) and c != a
    assert _order(make_loader(dataset, batch_size=6, shuffle=False, seed=3)) == list(range(40))
    dropped = list(make_loader(dataset, batch_size=6, shuffle=True, seed=3, drop_last=True))
    assert len(dropped) == 6 and all(batch.shape == (6, 1, 8, 8) for batch in dropped)


# ----------------------------------------------------------------------------- the real data set


@pytest.mark.slow
def test_real_alzheimer_set(real_data):
    sets = load_all(real_data, seed=0)
    train, val, test = sets["train"], sets["val"], sets["test"]
    assert (len(train), len(val), len(test)) == (4609, 512, 1279)
    pool = len(train) + len(val)
    assert pool == 5121 and len(val) == round(pool * 0.1)
    train_paths, val_paths = {i.path for i in train.items}, {i.path for i in val.items}
    assert train_paths.isdisjoint(val_paths) and len(train_paths | val_paths) == 5121
    assert all(p.startswith("train/") for p in train_paths | val_paths)
    assert all(i.path.startswith("test/") for i in test.items)
    labels = {"MildDemented", "ModerateDemented", "NonDemented", "VeryMildDemented"}
    assert {i.label for i in train.items} == labels and {i.label for i in test.items} == labels
    for s in (train, val, test):
        assert s.images.shape == (len(s), 256, 256) and s.images.dtype == np.uint8 and s.layout == "folder"
    # The 176x208 slices sit centred: 24 black rows above and below, 40 black columns each side.
    sample = np.asarray(test.images[::10])
    assert sample[:, :24].max() == 0 and sample[:, 232:].max() == 0
    assert sample[:, :, :40].max() == 0 and sample[:, :, 216:].max() == 0
    assert sample[:, 24:232, 40:216].max() > 200
    x = SliceDataset(train.images)[100]
    assert x.shape == (1, 256, 256) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    assert [i.path for i in load_split(real_data, "val", seed=0).items] == [i.path for i in val.items]
    assert [i.path for i in load_split(real_data, "val", seed=1).items] != [i.path for i in val.items]


def test_zoom_frames_scales_the_brain_about_the_frame_centre():
    frame = np.zeros((1, 256, 256), np.uint8)
    frame[0, 24:232, 40:216] = 200                     # a 208x176 "brain", placed as to_slice places one
    assert np.array_equal(data.zoom_frames(frame, 1.0), frame)
    for factor in (0.9, 1.1):
        zoomed = data.zoom_frames(frame, factor)
        rows, cols = np.nonzero(zoomed[0] > 100)
        assert zoomed.shape == frame.shape and zoomed.dtype == np.uint8
        assert abs((rows.max() - rows.min() + 1) - 208 * factor) <= 2
        assert abs((cols.max() - cols.min() + 1) - 176 * factor) <= 2
        assert abs((rows.max() + rows.min()) / 2 - 127.5) <= 1 and abs((cols.max() + cols.min()) / 2 - 127.5) <= 1
