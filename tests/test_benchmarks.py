"""Every benchmark runs at a tiny size, so none of them can rot."""

import json

import pytest

from benchmarks import cache, featurize, head, scale, storage
from benchmarks.common import save_json


@pytest.mark.slow
def test_featurize_benchmark(ray_session, tmp_path):
    result = featurize.run(images=24, batch_size=8, threads=1, workers=1, image_size=64)
    assert result["cpu"][0]["images_per_s"] > 0 and result["cpu"][1]["rows"] == 24 and result["ratio"] > 0
    assert set(result["stage_ms_per_image"]) == {"read_ms", "decode_ms", "resize_crop_ms", "model_ms", "write_ms"}
    assert result["limit"]["best_images_per_s"] == max(result["limit"]["rates"].values())
    assert "freezeray / the model alone at its best" in featurize.report(result)
    path = save_json("featurize", result, tmp_path)
    assert json.loads(path.read_text())["machine"]["cpus"] >= 1


@pytest.mark.slow
def test_cache_benchmark(ray_session):
    result = cache.run(images=24, epoch_counts=(1, 2), batch_size=8, image_size=64)
    assert [r["epochs"] for r in result["rows"]] == [1, 2] and all(r["ratio"] > 0 for r in result["rows"])
    assert "limit for N=10" in cache.report(result)


@pytest.mark.slow
def test_head_benchmark(ray_session):
    result = head.run(rows=3000, epochs=1, batch_size=256, workers=1)
    assert result["rows"][0]["rows_per_s"] > 0 and result["rows"][1]["startup_s"] > 0
    assert "rows/s ratio" in head.report(result)


@pytest.mark.slow
def test_scale_benchmark(ray_session):
    result = scale.run(images=8, factors=(1, 2), image_size=48)
    assert [r["images"] for r in result["rows"]] == [8, 16] and result["rows"][0]["driver_peak_mb"] > 0
    assert "peak memory" in scale.report(result)


def test_storage_benchmark():
    result = storage.run(images=16)
    f16, f32 = result["rows"]
    assert f16["raw_feature_bytes"] * 2 == f32["raw_feature_bytes"] and 0.45 < result["float16_over_float32"] < 0.56
    assert "float16 / float32" in storage.report(result)


@pytest.mark.slow
def test_driver_benchmark(ray_session):
    from benchmarks import driver

    result = driver.run(images=6, image_size=96)
    narrow, wide, more = result["rows"]
    assert (narrow["rows"], wide["rows"], more["rows"]) == (6, 6, 18)
    assert wide["values_per_row"] == 512 * 3 * 3 and narrow["values_per_row"] == 1280  # VGG16 block5_pool at 96 px
    assert wide["driver_received_bytes_per_row"] == pytest.approx(narrow["driver_received_bytes_per_row"], rel=0.2)
    assert wide["driver_received_bytes_per_row"] < wide["feature_bytes_per_row"] / 20  # ids and slice names only
    assert "driver received" in driver.report(result)


@pytest.mark.slow
def test_nodes_benchmark():
    from benchmarks import nodes

    result = nodes.run(images=8, nodes=2, image_size=32, timeout=600)
    single, cluster = result["rows"]
    assert single["rows"] == cluster["rows"] == 8 and single["writer_nodes"] == 1
    assert "cluster / single node" in nodes.report(result)


@pytest.mark.slow
def test_staged_benchmark(ray_session):
    from benchmarks import staged

    result = staged.run(head_epochs=2, tune_epochs=1, per_class=4)  # the surfaces: 4 training patches a class
    head, ours, images, kept = result["rows"]
    assert result["settings"]["train_rows"] == 40 and ours["seconds"] > head["seconds"]  # the staged run includes the head
    assert result["accuracy_gain_over_head"] == ours["test_accuracy"] - head["test_accuracy"]
    assert "images throughout / staged wall time" in staged.report(result)


@pytest.mark.slow
def test_rows_benchmark(ray_session):
    from benchmarks import rows

    result = rows.run(sizes=(200, 400), per_tar=100, baseline=None, plan_shards=40, plan_rows=300)
    assert [r["images"] for r in result["runs"]] == [200, 400] and [r["shards"] for r in result["runs"]] == [2, 4]
    inc = result["incremental"]
    assert (inc["added_shards"], inc["computed_shards"]) == (1, 1)  # only the new shard is computed
    plan = result["planning"]
    assert plan["rows"] == 12_000 and plan["summaries"] == 40 * 3 and plan["incremental_to_compute"] == 4
    assert "of the full run" in rows.report(result)


@pytest.mark.slow
def test_stream_benchmark(ray_session):
    from benchmarks import stream

    result = stream.run(rows=3000, factor=2, workers=1, epochs=1, batch_size=256)
    memory, streamed, large = result["rows"]
    assert (memory["mode"], streamed["mode"], large["rows"]) == ("in memory", "streaming", 6000)
    assert result["rows_per_s_ratio"] == streamed["rows_per_s"] / memory["rows_per_s"]
    assert "streaming / in memory" in stream.report(result)
