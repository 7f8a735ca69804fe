"""pipeline.featurize: a whole image set on S3 through Ray Data into committed Parquet
shards that equal the helper's features, with errors, reuse, resume and refusal."""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from imagesets import bad_files, write_image_folder
from outputs import sealed_shards

import surgery
from freezeray.images import preprocess_bytes
from pipeline import (
    FeatureMismatch,
    FeatureSet,
    Featurizer,
    Resources,
    featurize,
    read_images,
)
from pipeline.decode import normalize
from surgery import TransferLearning, TransferLearningHelper

SIZE = 64


@pytest.fixture(scope="module")
def lite0_pooled(lite0_imagenet):
    """efficientnet_lite0 (ImageNet weights) frozen to the global pooling."""
    return TransferLearning(lite0_imagenet).set_feature_extractor("global_pool").build()


@pytest.fixture(scope="module")
def s3_images(s3_server):
    """~100 generated images (JPEG/PNG/WebP, grayscale, RGBA, palette) plus three bad files on S3."""
    fs = s3_server.filesystem()
    bucket = s3_server.make_bucket("featurize-images")
    labels = write_image_folder(lambda p, b: fs.pipe(f"{bucket}/train/{p}", b), per_class=33)
    for p, b in bad_files().items():
        fs.pipe(f"{bucket}/train/{p}", b)
    return f"s3://{bucket}/train", labels


def test_featurize_image_folder_on_s3_equals_the_helper(ray_session, s3_server, s3_images, s3_bucket,
                                                        storage_options, lite0_pooled):
    uri, labels = s3_images
    out = f"s3://{s3_bucket}/features"
    fset = featurize(lite0_pooled, uri, out, storage_options=storage_options, image_size=SIZE, dtype="float32",
                     resources=Resources(num_workers=2, cpus_per_worker=0.5), batch_size=16, shard_rows=40)
    n_inputs = len(labels) + len(bad_files())
    assert fset.rows == len(labels) and fset.errors == 3 and fset.rows + fset.errors == n_inputs
    assert fset.classes == ("blue_bar", "green_square", "red_disc") and fset.feature_shape == (1280,)
    assert fset.boundary == ("global_pool.flatten",) and len(fset.shards) == -(-n_inputs // 40)

    feats, y = fset.to_tensors()
    table = pq.read_table(s3_server.filesystem().open(fset.shard_uris()[0].removeprefix("s3://")))
    assert table.column_names == ["row_id", "path", "label", "features"]
    paths = [p for t in (pq.read_table(s3_server.filesystem().open(u.removeprefix("s3://"))) for u in fset.shard_uris())
             for p in t.column("path").to_pylist()]
    rel = [p.split("/train/", 1)[1] for p in sorted(paths)]
    assert rel == sorted(labels) and [labels[r] for r in rel] == y.tolist()

    config = surgery.get_info(lite0_pooled).preprocessing.with_size(SIZE)
    fs = s3_server.filesystem()
    pixels = np.stack([preprocess_bytes(fs.cat(p.removeprefix("s3://")), config) for p in sorted(paths)])
    expected = TransferLearningHelper(lite0_pooled).featurize(normalize(torch.from_numpy(pixels), config))
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-4)


def test_bad_files_land_in_the_errors_table(ray_session, s3_images, s3_bucket, storage_options, lite0_pooled):
    uri, labels = s3_images
    fset = featurize(lite0_pooled, uri, f"s3://{s3_bucket}/f", storage_options=storage_options, image_size=32,
                     resources=Resources(cpus_per_worker=0.5), shard_rows=64)
    errors = fset.errors_table().to_pydict()
    reasons = dict(zip([p.rsplit("/train/", 1)[1] for p in errors["path"]], errors["reason"]))
    assert set(reasons) == set(bad_files())
    assert "empty file" in reasons["red_disc/empty.jpg"]
    assert "truncated" in reasons["red_disc/truncated.jpg"] or "decode" in reasons["red_disc/truncated.jpg"]
    assert "identify" in reasons["green_square/notes.jpg"]
    ds = fset.to_dataset()
    ids = sorted(ds.to_pandas()["row_id"].tolist() + errors["row_id"])
    assert ids == list(range(len(labels) + 3))


def test_rerun_reuses_and_an_interrupted_run_resumes(ray_session, tmp_path, tiny_name):
    root = tmp_path / "imgs"
    labels = write_image_folder(lambda p, b: (root / p).parent.mkdir(parents=True, exist_ok=True) or (root / p).write_bytes(b),
                                per_class=10, size=24, odd_modes=False)
    model = TransferLearning(surgery.zoo.load(tiny_name)).set_feature_extractor("flatten").build()
    out = str(tmp_path / "features")
    written = []

    def crash_after_two(shard, rows, errors):
        written.append(shard)
        if len(written) == 2:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        featurize(model, str(root), out, shard_rows=5, resources=Resources(cpus_per_worker=0.5), progress=crash_after_two)
    with pytest.raises(FileNotFoundError, match="no committed feature set"):
        FeatureSet.open(out)
    count = -(-len(labels) // 5)
    done = sealed_shards(out)
    assert set(written) <= set(done)  # the shards were sealed before the driver heard of them
    Path(done[max(done)]).unlink()  # and one shard loses its file: it is unfinished now
    before = set(done) - {max(done)}
    written.clear()
    fset = featurize(model, str(root), out, shard_rows=5, resources=Resources(cpus_per_worker=0.5),
                     progress=lambda s, r, e: written.append(s))
    assert sorted(written) == sorted(set(range(count)) - before) and max(done) in written
    assert len(fset.shards) == count == 6
    ids = sorted(fset.to_dataset().to_pandas()["row_id"].tolist())
    assert ids == list(range(len(labels)))  # every row once, none twice
    assert len(list((Path(out) / "shards").iterdir())) == len(fset.shards)  # no stray files
    assert not (Path(out) / "_staging").exists() and fset.version == 1

    written.clear()
    again = featurize(model, str(root), out, shard_rows=5, resources=Resources(cpus_per_worker=0.5), progress=lambda s, r, e: written.append(s))
    assert written == [] and again.fingerprint == fset.fingerprint

    other = TransferLearning(surgery.zoo.load(tiny_name)).set_feature_extractor("flatten").build()  # new random weights
    with pytest.raises(FileExistsError, match="already holds features with fingerprint"):
        featurize(other, str(root), out, shard_rows=5)
    with pytest.raises(FeatureMismatch, match=f"fingerprint {fset.model_fingerprint}.*this model's frozen part has fingerprint"):
        fset.check(other)
    fset.check(model)


def test_float16_shards_are_half_the_size_and_pandas_reads_them(ray_session, tmp_path, lite0_pooled):
    root = tmp_path / "imgs"
    write_image_folder(lambda p, b: (root / p).parent.mkdir(parents=True, exist_ok=True) or (root / p).write_bytes(b),
                       per_class=20, size=32, odd_modes=False)
    sizes = {}
    for dtype in ("float16", "float32"):
        fset = featurize(lite0_pooled, str(root), str(tmp_path / dtype), image_size=32, dtype=dtype, resources=Resources(cpus_per_worker=0.5))
        sizes[dtype] = sum(s.bytes for s in fset.shards)
        df = pd.read_parquet(fset.shard_uris()[0])
        assert list(df.columns) == ["row_id", "path", "label", "features"] and df["features"].iloc[0].shape == (1280,)
        assert df["features"].iloc[0].dtype == np.dtype(dtype)
    assert 0.45 <= sizes["float16"] / sizes["float32"] <= 0.56


def test_featurizer_maps_a_batch_without_ray(tiny_name):
    model = TransferLearning(surgery.zoo.load(tiny_name)).set_feature_extractor("flatten").build()
    frozen = surgery.split(model).frozen
    config = surgery.get_info(model).preprocessing
    f = Featurizer(frozen, config.to_dict(), "float32", [(64,)])
    pixels = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    batch = {"row_id": np.arange(3), "path": np.array(["a", "b", "c"], dtype=object), "label": np.zeros(3, np.int32),
             "shard": np.zeros(3), "error": np.array(["", "bad", ""], dtype=object), "pixels": pixels}
    out = f(batch)
    assert out["features"].shape == (3, 64) and not out["features"][1].any()
    with torch.no_grad():
        expected = frozen(normalize(torch.from_numpy(pixels[[0, 2]]), config)).numpy()
    np.testing.assert_allclose(out["features"][[0, 2]], expected, rtol=1e-5, atol=1e-6)


def test_read_images_from_a_manifest_and_memory_filesystem(tmp_path):
    import fsspec

    mem = fsspec.filesystem("memory")
    labels = write_image_folder(lambda p, b: mem.pipe(f"/set/{p}", b), per_class=3, size=16, odd_modes=False)
    src = read_images("memory://set")
    assert len(src) == 9 and src.classes == ("blue_bar", "green_square", "red_disc")
    pd.DataFrame({"path": list(labels), "label": [p.split("/")[0] for p in labels]}).to_csv(tmp_path / "m.csv", index=False)
    for p in labels:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(mem.cat(f"/set/{p}"))
    man = read_images(str(tmp_path / "m.csv"))
    assert man.layout == "manifest" and man.classes == src.classes and man.labels.tolist() == src.labels.tolist()
    assert man.paths[0] == str(tmp_path / list(labels)[0])
    pd.DataFrame({"path": list(labels), "label": [7] * 9}).to_parquet(tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"labels \[7\] outside 0..2"):
        read_images(str(tmp_path / "m.parquet"), classes=["a", "b", "c"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_images(str(tmp_path / "nope"))


def test_actor_plan_defaults_to_one_actor_per_node_using_its_cores(ray_session):
    from pipeline.runtime import plan_actors

    plan = plan_actors()  # the session: one node, 2 CPUs, no GPU
    assert (plan.actors, plan.gpus, plan.cpus, plan.threads) == (1, 0.0, 1.0, 2)  # one CPU reserved to decode; the model threads on both
    two = plan_actors(Resources(num_workers=2))
    assert (two.actors, two.threads) == (2, 1) and two.cpus * 2 <= 1.0
    with pytest.raises(ValueError, match="num_workers must be a positive integer for model actors, got 0"):
        plan_actors(Resources(num_workers=0))
    for bad in (-1, 1.5, "two"):
        with pytest.raises(ValueError, match="num_workers"):
            Resources(num_workers=bad)


def test_on_single_cpu_nodes_the_actor_and_a_decode_task_fit_together(monkeypatch):
    import pipeline.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_nodes", lambda: [1.0, 1.0])
    plan = runtime.plan_actors()  # each asking for a whole CPU, they would wait for each other forever
    assert (plan.actors, plan.threads) == (2, 1) and plan.cpus + plan.decode_cpus <= 1.0 and plan.decode_cpus > 0
    monkeypatch.setattr(runtime, "cpu_nodes", lambda: [4.0])
    assert (runtime.plan_actors().cpus, runtime.plan_actors().decode_cpus) == (3.0, 1.0)
