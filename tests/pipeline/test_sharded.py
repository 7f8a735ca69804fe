"""Sharded sources (WebDataset tars, Parquet image bytes, folders of manifests) and
incremental featurization: the same images give the same features whatever they are stored
in; a rerun computes only what changed; bad members and cut tars are error rows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sharded import CLASSES, chunks, hf_parquet_bytes, images, key_of, tar_bytes, write_folder, write_tars

import surgery
from pipeline import FeatureSet, Resources, evaluate, featurize, predict, read_images
from pipeline.sources import SourceError, expand_braces
from surgery import TransferLearning

ONE = Resources(cpus_per_worker=0.5)


@pytest.fixture(scope="module")
def model(ray_session, tiny_name):
    import torch

    torch.manual_seed(0)
    return TransferLearning(surgery.zoo.load(tiny_name)).set_feature_extractor("flatten").build()


@pytest.fixture(scope="module")
def items():
    return images(per_class=8)  # 24 images and 3 bad files


@pytest.fixture(scope="module")
def folder_features(ray_session, tmp_path_factory, items, model):
    """The reference: the same images featurized from an ImageFolder. {relative path: features}."""
    tmp = tmp_path_factory.mktemp("reference")
    root = write_folder(tmp / "imgs", items)
    fset = featurize(model, str(root), str(tmp / "f"), dtype="float32", resources=ONE)
    df = fset.read().to_pandas()
    errors = fset.errors_table().to_pydict()
    return ({os.path.relpath(p, root): f for p, f in zip(df["path"], df["features"])},
            {os.path.relpath(p, root): r for p, r in zip(errors["path"], errors["reason"])})


def _by_key(fset, items):
    """{relative path: features} of a sharded feature set (paths are ``<shard>#<key>``)."""
    by_key = {key_of(rel): rel for rel in items}
    df = fset.read().to_pandas()
    return {by_key[p.split("#", 1)[1]]: (f, label) for p, f, label in zip(df["path"], df["features"], df["label"])}


def _assert_same(got, items, reference):
    feats, _ = reference
    assert set(got) == set(feats)
    for rel, (f, label) in got.items():
        np.testing.assert_allclose(f, feats[rel], rtol=1e-5, atol=1e-6)
        assert label == items[rel][1]


def test_tar_shards_and_hf_parquet_give_the_image_folders_features(tmp_path, items, model, folder_features):
    tars = tmp_path / "wds"
    tars.mkdir()
    names = write_tars(lambda n, b: (tars / n).write_bytes(b), items, per=10)
    fset = featurize(model, str(tars), str(tmp_path / "f-tar"), dtype="float32", resources=ONE)
    assert read_images(str(tars)).format == "webdataset" and len(fset.shards) == len(names) == 3
    assert fset.rows == 24 and fset.errors == 3 and fset.classes == ("0", "1", "2")
    _assert_same(_by_key(fset, items), items, folder_features)
    reasons = dict(zip(fset.errors_table().column("path").to_pylist(), fset.errors_table().column("reason").to_pylist()))
    assert {p.split("#", 1)[1] for p in reasons} == {key_of(r) for r in folder_features[1]}

    hf = tmp_path / "hf" / "data"
    hf.mkdir(parents=True)
    parts = chunks(items, 12)
    for i, part in enumerate(parts):
        (hf / f"train-{i:05d}-of-{len(parts):05d}.parquet").write_bytes(hf_parquet_bytes(part))
    src = read_images(str(tmp_path / "hf"))
    assert (src.format, src.classes, src.rows) == ("parquet", CLASSES, 27)
    fset = featurize(model, src, str(tmp_path / "f-hf"), dtype="float32", resources=ONE)
    assert fset.classes == CLASSES and fset.rows == 24 and fset.errors == 3 and len(fset.shards) == 3
    order = [rel for part in parts for rel in part]
    df = fset.read().to_pandas()
    file_index = {f"train-{i:05d}-of-{len(parts):05d}.parquet": sum(len(p) for p in parts[:i]) for i in range(len(parts))}
    got = {}
    for p, f, label in zip(df["path"], df["features"], df["label"]):
        name, index = p.rsplit("/", 1)[1].split("#")
        got[order[file_index[name] + int(index)]] = (f, label)
    _assert_same(got, items, folder_features)


def test_tar_shards_on_s3_by_brace_range_glob_and_list(s3_server, s3_bucket, storage_options, items, model,
                                                       folder_features):
    fs = s3_server.filesystem()
    names = write_tars(lambda n, b: fs.pipe(f"{s3_bucket}/laion/{n}", b), items, per=9)
    assert len(names) == 3
    assert expand_braces(f"s3://{s3_bucket}/laion/{{00000..00002}}.tar") == [f"s3://{s3_bucket}/laion/{n}" for n in names]
    brace = featurize(model, f"s3://{s3_bucket}/laion/{{00000..00002}}.tar", f"s3://{s3_bucket}/f-brace",
                      storage_options=storage_options, dtype="float32", resources=ONE)
    _assert_same(_by_key(brace, items), items, folder_features)
    for source in (f"s3://{s3_bucket}/laion/*.tar", [f"s3://{s3_bucket}/laion/{n}" for n in names], f"s3://{s3_bucket}/laion"):
        src = read_images(source, storage_options)
        assert src.format == "webdataset" and [s.uri.rsplit("/", 1)[1] for s in src.shards] == names
    again = featurize(model, f"s3://{s3_bucket}/laion/*.tar", f"s3://{s3_bucket}/f-brace", storage_options=storage_options,
                      dtype="float32", resources=ONE)
    assert again.reused and again.version == 1  # the same shards by another name: nothing to do
    with pytest.raises(FileNotFoundError, match="1 of 4 files do not exist"):
        read_images(f"s3://{s3_bucket}/laion/{{00000..00003}}.tar", storage_options)


def _mtimes(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}


def test_incremental_runs_over_tar_shards(tmp_path, model):
    items = images(per_class=10, bad=False)  # 30 images
    root, out = tmp_path / "wds", tmp_path / "f"
    root.mkdir()
    parts = chunks(items, 5)  # 6 shards
    for i, part in enumerate(parts[:4]):
        (root / f"{i:05d}.tar").write_bytes(tar_bytes(part))
    computed = []
    first = featurize(model, str(root), str(out), resources=ONE, progress=lambda s, r, e: computed.append(s))
    assert sorted(computed) == [0, 1, 2, 3] and first.version == 1 and first.rows == 20
    before = _mtimes(out)

    for i in (4, 5):  # two shards added: only they are computed, the others' files are untouched
        (root / f"{i:05d}.tar").write_bytes(tar_bytes(parts[i]))
    computed.clear()
    second = featurize(model, str(root), str(out), resources=ONE, progress=lambda s, r, e: computed.append(s))
    assert sorted(computed) == [4, 5] and second.version == 2 and second.rows == 30 and len(second.shards) == 6
    assert {k: v for k, v in _mtimes(out).items() if k in before} == before
    assert FeatureSet.open(str(out)).version == 2

    replaced = {k: v for k, v in images(per_class=10, seed=9, bad=False).items()}
    (root / "00001.tar").write_bytes(tar_bytes(chunks(replaced, 7)[0]))  # a shard replaced: recomputed
    computed.clear()
    third = featurize(model, str(root), str(out), resources=ONE, progress=lambda s, r, e: computed.append(s))
    assert computed == [1] and third.rows == 32 and third.version == 3
    old_file = next(s.path for s in second.shards if s.shard == 1)
    assert (out / old_file).exists()  # version 2 stays readable until the next commit
    assert len(second.read()) == 30

    (root / "00002.tar").unlink()  # a shard removed: its rows leave
    computed.clear()
    fourth = featurize(model, str(root), str(out), resources=ONE, progress=lambda s, r, e: computed.append(s))
    assert computed == [] and fourth.rows == 27 and fourth.version == 4 and 2 not in {s.shard for s in fourth.shards}
    assert not (out / old_file).exists()  # superseded two versions ago: deleted
    ids = fourth.read(["row_id"]).column("row_id").to_numpy()
    assert len(set(ids)) == 27 and set(ids) >= set(third.read(["row_id"]).column("row_id").to_numpy()) - {
        2 << 32 | i for i in range(5)}
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted({s.path.split("/")[1] for s in
                                                                          fourth.shards + third.shards})


def test_incremental_runs_over_an_image_folder(tmp_path, model):
    items = images(per_class=10, bad=False)
    root, out = write_folder(tmp_path / "imgs", items), tmp_path / "f"
    computed = []
    first = featurize(model, str(root), str(out), shard_rows=8, resources=ONE, progress=lambda s, r, e: computed.append(s))
    assert sorted(computed) == [0, 1, 2, 3] and first.rows == 30
    ids_before = dict(zip(first.read().column("path").to_pylist(), first.read().column("row_id").to_pylist()))
    before = _mtimes(out)

    new = images(per_class=3, seed=4, bad=False)
    for rel, (data, _) in new.items():  # new files, each class
        (root / rel.replace("/", "/new-")).write_bytes(data)
    removed = sorted(items)[8]  # a file of shard 1
    (root / removed).unlink()
    computed.clear()
    second = featurize(model, str(root), str(out), shard_rows=8, resources=ONE, progress=lambda s, r, e: computed.append(s))
    assert sorted(computed) == [4, 5] and second.rows == 30 - 1 + 9  # the new files in new shards
    listed = {s.path.split("/")[1] for s in second.shards}
    kept = {k: v for k, v in _mtimes(out).items() if k in before and k in listed}
    assert len(kept) == 3 and all(before[k] == v for k, v in kept.items())  # shards 0, 2, 3 untouched
    rewritten = next(s for s in second.shards if s.shard == 1)  # without the removed file, and no model work
    old = next(s.path for s in first.shards if s.shard == 1)
    assert rewritten.rows == 7 and rewritten.path != old and (out / old).exists()  # version 1 is still readable
    table = second.read()
    paths = table.column("path").to_pylist()
    assert str(root / removed) not in paths and len(paths) == len(set(paths)) == 38
    for p, i in zip(paths, table.column("row_id").to_pylist()):
        if p in ids_before:
            assert ids_before[p] == i  # unchanged images keep their row ids
    fresh = featurize(model, str(root), str(tmp_path / "fresh"), shard_rows=8, resources=ONE)
    ref = dict(zip(fresh.read().column("path").to_pylist(), fresh.read().to_pandas()["features"]))
    for p, f in zip(paths, table.to_pandas()["features"]):
        np.testing.assert_allclose(f, ref[p], rtol=1e-3, atol=1e-3)


def test_a_folder_of_manifests_is_read_by_fragment(tmp_path, items, model, folder_features):
    root = write_folder(tmp_path / "set", items)
    (root / "manifests").mkdir()
    rels = sorted(items)
    for i in range(3):
        part = rels[i::3]
        pd.DataFrame({"path": [f"../{r}" for r in part], "label": [r.split("/")[0] for r in part]}).to_parquet(
            root / "manifests" / f"part-{i}.parquet")
    src = read_images(str(root / "manifests"), allow_outside=True)
    assert (src.format, src.classes, len(src.shards), src.rows) == ("manifests", CLASSES, 3, 27)
    fset = featurize(model, src, str(tmp_path / "f"), dtype="float32", resources=ONE)
    df = fset.read().to_pandas()
    got = {os.path.relpath(p, root): (f, label) for p, f, label in zip(df["path"], df["features"], df["label"])}
    _assert_same(got, items, folder_features)
    with pytest.raises(Exception, match="outside its own folder"):
        featurize(model, str(root / "manifests"), str(tmp_path / "g"), resources=ONE)


def test_auto_names_what_it_looked_for(tmp_path, items):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(SourceError, match=r"no images under .* \.tar shards \(webdataset\) and \.parquet files"):
        read_images(str(tmp_path / "empty"))
    mixed = write_folder(tmp_path / "mixed", dict(list(items.items())[:4]))
    (mixed / "00000.tar").write_bytes(tar_bytes(dict(list(items.items())[:2])))
    with pytest.raises(SourceError, match="image files in class folders and also 1 .tar files; pass format="):
        read_images(str(mixed))
    assert read_images(str(mixed), format="webdataset").format == "webdataset"
    assert read_images(str(mixed), format="folder").rows == 4
    with pytest.raises(SourceError, match="format must be one of"):
        read_images(str(mixed), format="tfrecord")
    (tmp_path / "x.parquet").write_bytes(b"")
    pd.DataFrame({"caption": ["a"]}).to_parquet(tmp_path / "y.parquet")
    with pytest.raises(SourceError, match="neither image bytes nor a 'path' column"):
        read_images(str(tmp_path / "y.parquet"))


def test_freezeray_outputs_inside_an_image_folder_are_not_read_as_classes(tmp_path, items, model):
    root = write_folder(tmp_path / "imgs", dict(list(items.items())[:9]))
    featurize(model, str(root), str(root / "freezeray-out" / "features"), resources=ONE)
    (root / "run-out").mkdir()
    (root / "run-out" / ".freezeray-output").write_text("")
    (root / "run-out" / "chart.png").write_bytes(items[next(iter(items))][0])
    src = read_images(str(root))
    assert (src.classes, src.rows) == (("blue_bar", "green_square"), 9)
    assert not any("freezeray-out" in p or "run-out" in p for p in src.paths)


def test_predict_and_evaluate_read_tar_shards(tmp_path, items, model):
    from surgery.layers import Output

    good = {k: v for k, v in items.items() if v[0] and "notes" not in k and "truncated" not in k}
    root = tmp_path / "wds"
    root.mkdir()
    write_tars(lambda n, b: (root / n).write_bytes(b), good, per=10)
    head = (TransferLearning(model).remove_vertex_keep_connections("fc2")
            .add_layer("fc2", Output(3, loss="cross_entropy")).build())
    result = predict(head, str(root), str(tmp_path / "p"), resources=ONE)
    assert (result.rows, result.errors, len(result.manifest.shards)) == (24, 0, 3)
    table = pd.concat([pd.read_parquet(str(tmp_path / "p" / s.path)) for s in result.manifest.shards])
    assert sorted(table["path"].str.split("#").str[1]) == sorted(key_of(r) for r in good)
    assert predict(head, str(root), str(tmp_path / "p"), resources=ONE).reused
    ev = evaluate(head, str(root), resources=ONE)
    assert ev.rows == 24 and ev.errors == 0 and sum(map(sum, ev.confusion)) == 24


def test_a_changed_computation_under_the_same_fingerprint_is_not_mixed_in(tmp_path, model, monkeypatch):
    import torch

    items = images(per_class=4, bad=False)
    root = tmp_path / "wds"
    root.mkdir()
    parts = chunks(items, 6)
    (root / "00000.tar").write_bytes(tar_bytes(parts[0]))
    fset = featurize(model, str(root), str(tmp_path / "f"), resources=ONE)
    conv = torch.nn.Conv2d.forward
    monkeypatch.setattr(torch.nn.Conv2d, "forward", lambda self, x: conv(self, x) * 1.01)  # a "library upgrade"
    assert surgery.frozen_fingerprint(model) == fset.model_fingerprint  # the same names and weights...
    (root / "00001.tar").write_bytes(tar_bytes(parts[1]))
    with pytest.raises(FileExistsError, match="now computes other values .*largest difference"):
        featurize(model, str(root), str(tmp_path / "f"), resources=ONE)  # ...would mix two computations
    with pytest.warns(UserWarning, match="now computes other values"):
        fset.check(model)
    monkeypatch.setattr(torch.nn.Conv2d, "forward", conv)
    assert featurize(model, str(root), str(tmp_path / "f"), resources=ONE).version == 2
