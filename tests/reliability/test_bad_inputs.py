"""Bad input: every bad file becomes one error row with its reason, every good file is
featurized exactly once, and an unusable data set is a clear error before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import badfiles
import numpy as np
import pandas as pd
import pytest
import torch
from imagesets import draw, encode, write_image_folder
from ledger import account, direct_features

import surgery
from pipeline import Resources, featurize, read_images
from surgery import TransferLearning

NON_UTF8 = b"red_disc/caf\xe9.jpg"  # Latin-1 bytes: not UTF-8


@pytest.fixture(scope="module")
def tiny_frozen(tiny_name):
    torch.manual_seed(0)
    return TransferLearning(surgery.zoo.load(tiny_name)).set_feature_extractor("flatten").build()


def _put(root):
    def put(path, data):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)

    return put


def _reference(model, files: dict[str, bytes]) -> dict[str, np.ndarray]:
    return dict(zip(files, direct_features(model, list(files.values()))))


def test_every_bad_file_is_one_error_row_and_every_good_file_is_featurized_once(ray_session, tmp_path, tiny_frozen,
                                                                              ledger):
    root = tmp_path / "images"
    put = _put(root)
    good = {}
    write_image_folder(lambda p, b: (put(p, b), good.__setitem__(p, b)), per_class=6, size=24)  # + gray/RGBA/palette
    for path, data in badfiles.odd_but_good().items():
        put(path, data)
        good[path] = data
    bad = badfiles.bad()
    for path, (data, _) in bad.items():
        put(path, data)
    os.symlink(tmp_path / "deleted.jpg", root / "blue_bar" / "gone.jpg")  # an unreadable path
    bad["blue_bar/gone.jpg"] = (b"", "cannot read: FileNotFoundError")
    with open(os.path.join(os.fsencode(root), NON_UTF8), "wb") as f:  # readable, but its name is not UTF-8
        f.write(good["green_square/0000.jpg"])
    bad["red_disc/caf\\xe9.jpg"] = (b"", "not valid UTF-8")
    n = len(good) + len(bad)

    fset = featurize(tiny_frozen, str(root), str(tmp_path / "features"), dtype="float32", shard_rows=16,
                     resources=Resources(cpus_per_worker=0.5))

    assert (fset.rows, fset.errors) == (len(good), len(bad))
    errors = fset.errors_table().to_pydict()
    reasons = {p.split("/images/", 1)[1]: r for p, r in zip(errors["path"], errors["reason"])}
    assert set(reasons) == set(bad)
    for path, (_, expected) in bad.items():
        assert expected in reasons[path], (path, reasons[path])
    checked, lost, duplicated = account(fset, n)
    assert (checked, lost, duplicated) == (n, 0, 0)
    df = fset.to_dataset().to_pandas()
    got = {p.split("/images/", 1)[1]: np.asarray(f) for p, f in zip(df["path"], df["features"])}
    assert set(got) == set(good)
    expected = _reference(tiny_frozen, good)
    for path in good:
        np.testing.assert_allclose(got[path], expected[path], rtol=1e-4, atol=1e-5, err_msg=path)
    ledger(tried=f"{len(bad)} bad files (truncated JPEG/PNG, empty, text and HTML named as images, a 144-Mpixel PNG "
                 f"bomb, a dangling link, a non-UTF-8 name) among {len(good)} good ones (CMYK, 16-bit, 48-bit, "
                 "float, animated, grayscale, RGBA, palette, unicode and 244-byte names)",
           checked="one error row with the right reason per bad file; each good file's features equal a direct "
                   "computation", inputs=len(bad), rows_checked=checked, rows_lost=lost)


def test_odd_names_and_unreadable_manifest_paths_on_s3(ray_session, s3_server, s3_bucket, storage_options,
                                                       tiny_frozen, ledger):
    fs = s3_server.filesystem()
    names = ["a b.jpg", "hash#1.jpg", "q?x=1.jpg", "pct%20.jpg", "plus+.jpg", "日本語.jpg",
             "/".join(["d" * 200] * 3) + "/" + "k" * 240 + ".jpg"]
    good = {}
    for i, name in enumerate(names):
        data = encode(draw("red_disc", np.random.default_rng(i), 24), "JPEG")
        fs.pipe(f"{s3_bucket}/set/imgs/{name}", data)
        good[f"imgs/{name}"] = data
    fs.pipe(f"{s3_bucket}/set/imgs/sub/x.jpg", good["imgs/a b.jpg"])
    missing = ["imgs/never-uploaded.jpg", "imgs/sub"]  # no such object; a "folder"
    rows = list(good) + missing
    fs.pipe(f"{s3_bucket}/set/m.csv", pd.DataFrame({"path": rows, "label": ["red_disc"] * len(rows)}).to_csv(index=False).encode())
    src = read_images(f"s3://{s3_bucket}/set/m.csv", storage_options)
    fset = featurize(tiny_frozen, src, f"s3://{s3_bucket}/features", storage_options=storage_options,
                     dtype="float32", resources=Resources(cpus_per_worker=0.5))
    assert (fset.rows, fset.errors) == (len(good), len(missing))
    reasons = dict(zip(fset.errors_table().column("path").to_pylist(), fset.errors_table().column("reason").to_pylist()))
    assert all(reasons[f"s3://{s3_bucket}/set/{m}"].startswith("cannot read: FileNotFoundError") for m in missing)
    df = fset.to_dataset().to_pandas()
    got = {p.split("/set/", 1)[1]: np.asarray(f) for p, f in zip(df["path"], df["features"])}
    expected = _reference(tiny_frozen, good)
    assert set(got) == set(good)
    for path in good:
        np.testing.assert_allclose(got[path], expected[path], rtol=1e-4, atol=1e-5, err_msg=path[:40])
    checked, lost, duplicated = account(fset, len(rows))
    assert (lost, duplicated) == (0, 0)
    ledger(tried="S3 keys with spaces, #, ?, %20, +, CJK, and an 847-character key; manifest rows for a missing object and "
                 "a prefix", inputs=len(names) + len(missing), checked="odd keys featurized with the right features; missing ones are error rows",
           rows_checked=checked, rows_lost=lost)


def test_empty_sets_and_empty_class_folders_are_clear_errors(tmp_path, ledger):
    root = tmp_path / "set"
    put = _put(root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_images(str(root))
    root.mkdir()
    with pytest.raises(ValueError, match="no images under"):
        read_images(str(root))
    put("cats/readme.txt", b"not an image")
    (root / "dogs").mkdir()
    with pytest.raises(ValueError, match="no images under"):
        read_images(str(root))
    pd.DataFrame({"path": []}, dtype=str).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(ValueError, match="lists no images"):
        read_images(str(tmp_path / "empty.csv"))

    write_image_folder(put, per_class=2, size=16, odd_modes=False)
    put(".ipynb_checkpoints/red_disc/0000.jpg", (root / "red_disc/0000.jpg").read_bytes())  # hidden: not a class
    put("red_disc/.hidden/0000.jpg", (root / "red_disc/0000.jpg").read_bytes())  # hidden: not a copy
    with pytest.raises(FileNotFoundError, match=r"class folders with no image files .*\['cats', 'dogs'\] \(2\)"):
        read_images(str(root))
    src = read_images(str(root), allow_empty=True)
    assert src.classes == ("blue_bar", "cats", "dogs", "green_square", "red_disc") and len(src) == 6
    assert sorted(set(src.labels.tolist())) == [0, 3, 4]
    ledger(tried="a missing folder, an empty folder, folders of non-images, an empty manifest, empty class folders, "
                 "hidden folders", inputs=7, checked="each is a clear error naming the problem, or (allow_empty) kept as a class")


def test_a_decompression_bomb_is_refused_without_decoding_it(tmp_path, ledger):
    """In a fresh process: decoding the 12,000 x 12,000 PNG would need 144 MB (gray) plus
    432 MB (RGB); refusing it from its header must not grow the process by even 32 MB."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(badfiles.png_bomb())
    script = f"""
import json, resource
from freezeray.images import decode_image
data = open({str(bomb)!r}, "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_image(data)
    reason = ""
except ValueError as exc:
    reason = str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"grew_kb": after - before, "reason": reason}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                    cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__)))).stdout)
    assert "image too large: 12000x12000 = 144,000,000 pixels" in out["reason"]
    assert out["grew_kb"] < 32 * 1024, out
    assert bomb.stat().st_size < 1_000_000
    ledger(tried="a 144-Mpixel PNG bomb of 0.2 MB decoded in a fresh process",
           inputs=1, checked=f"refused from its header; the process grew {out['grew_kb'] / 1024:.1f} MB")


def test_bad_members_and_a_cut_tar_on_s3_are_error_rows_and_the_rest_is_kept(ray_session, s3_server, s3_bucket,
                                                                             storage_options, tiny_frozen, ledger):
    import webdataset as wds
    from sharded import chunks, images, key_of, tar_bytes

    good = images(per_class=6, bad=False)
    parts = chunks(good, 6)
    fs = s3_server.filesystem()
    put = {}  # uri -> image bytes, for the direct computation
    fs.pipe(f"{s3_bucket}/wds/00000.tar", tar_bytes(parts[0]))
    whole = tar_bytes(parts[1])
    fs.pipe(f"{s3_bucket}/wds/00001.tar", whole[: len(whole) * 2 // 3])  # cut in the middle of a member
    odd = __import__("io").BytesIO()
    with wds.TarWriter(odd) as w:
        w.write({"__key__": "odd/notjpeg", "jpg": b"not a jpeg at all", "cls": 1})
        w.write({"__key__": "odd/noimage", "txt": "a caption without its image", "cls": 2})
        w.write({"__key__": "odd/badlabel", "jpg": next(iter(parts[0].values()))[0], "cls": "seven"})
        w.write({"__key__": "odd/fine", "png": next(iter(parts[2].values()))[0], "cls": 0})
    fs.pipe(f"{s3_bucket}/wds/00002.tar", odd.getvalue())
    fs.pipe(f"{s3_bucket}/wds/00003.tar", b"")  # an empty shard
    for part in (parts[0], parts[1]):
        for rel, (data, _) in part.items():
            put[key_of(rel)] = data
    put["odd/fine"] = next(iter(parts[2].values()))[0]
    root = f"s3://{s3_bucket}/wds"
    fset = featurize(tiny_frozen, root, f"s3://{s3_bucket}/f", storage_options=storage_options, resources=Resources(cpus_per_worker=0.5),
                     dtype="float32")
    errors = fset.errors_table().to_pandas()
    by_path = dict(zip(errors["path"], errors["reason"]))
    cut = f"{root}/00001.tar"
    assert "truncated tar" in by_path[cut] and "kept" in by_path[cut]  # the cut is one error row naming the shard
    shard1 = next(s for s in fset.shards if s.name == "00001")
    assert 0 < shard1.rows < 6  # the rows before the cut are kept
    reason = by_path[f"{root}/00002.tar#odd/notjpeg"]
    assert "cannot decode" in reason or "identify" in reason
    assert "no image member" in by_path[f"{root}/00002.tar#odd/noimage"]
    assert "not an integer" in by_path[f"{root}/00002.tar#odd/badlabel"]
    empty = next(s for s in fset.shards if s.name == "00003")
    assert (empty.rows, empty.errors) == (0, 0) and len(fset.shards) == 4
    df = fset.read().to_pandas()
    keys = [p.split("#", 1)[1] for p in df["path"]]
    assert sorted(keys) == sorted(set(keys)) and set(keys) <= set(put) and "odd/fine" in keys
    np.testing.assert_allclose(np.stack(df["features"].to_numpy()), direct_features(tiny_frozen, [put[k] for k in keys]),
                               rtol=1e-4, atol=1e-5)
    ids = np.concatenate([df["row_id"].to_numpy(), errors["row_id"].to_numpy()])
    assert len(ids) == len(set(ids)) == fset.rows + fset.errors == 6 + shard1.rows + shard1.errors + 4
    ledger(tried="tar shards on S3: a member that is not an image, a sample without an image, a label that is not an "
                 "integer, a tar cut in the middle of a member, an empty tar", inputs=5,
           checked=f"each is one error row with its reason (the cut one naming the shard, the {shard1.rows} samples "
                   "before it kept), every good sample featurized once and equal to a direct computation",
           rows_checked=len(ids), rows_lost=0)
