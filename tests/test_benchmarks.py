"""Every benchmark runs at a tiny size, so none of them can rot (those marked ``benchmark`` in
``make bench-smoke``, which CI runs after ``make test``: their own start-ups, six minutes on
2 cores, kept out of the product's test loop). The GPU check's dry run on the CPU stays in
``make test``: it is the only check of the CUDA path's code on a machine without CUDA."""

import json

import pytest

from benchmarks import cache, featurize, head, scale, storage
from benchmarks.common import save_json


@pytest.mark.slow
@pytest.mark.benchmark
def test_featurize_benchmark(ray_session, tmp_path):
    result = featurize.run(images=24, batch_size=8, threads=1, workers=1, image_size=64, large_images=2, thread_plans=(1,))
    assert result["cpu"][0]["images_per_s"] > 0 and result["cpu"][1]["rows"] == 24 and result["ratio"] > 0
    assert result["cpu"][-1]["system"] == "freezeray featurize, 1 torch threads in the actor" and result["cpu"][-1]["rows"] == 24
    assert set(result["stage_ms_per_image"]) == {"read_ms", "preprocess_ms", "model_ms", "write_ms"}
    prep = result["preprocess"]  # before/now x small/large x bilinear/the model's bicubic
    assert len(prep) == 8 and all(r["one_core_per_core_s"] > 0 and r["machine_images_per_s"] > 0 for r in prep)
    assert all(r["one_core_ratio"] > 0 and r["machine_ratio"] > 0 for r in prep[1::2])
    assert "per core-second" in featurize.report(result)
    assert result["limit"]["best_images_per_s"] == max(result["limit"]["rates"].values())
    assert "freezeray / the model alone at its best" in featurize.report(result)
    path = save_json("featurize", result, tmp_path)
    assert json.loads(path.read_text())["machine"]["cpus"] >= 1


def test_old_preprocessing_kept_for_the_benchmark_is_the_pil_path():
    """The benchmark's "before" is what the PIL path still computes (whole-image resize)."""
    from imagesets import draw, encode

    from freezeray.images import PreprocessConfig, decode_image, resize_crop

    data = encode(draw("red_disc", __import__("numpy").random.default_rng(0), 300), "JPEG")
    for mode in ("center", "squash", "border"):
        config = PreprocessConfig(input_size=(3, 96, 96), crop_mode=mode, interpolation="bicubic")
        assert (featurize.old_preprocess(data, config) == resize_crop(decode_image(data), config)).all()


@pytest.mark.slow
def test_gpu_check_runs_dry_on_the_cpu(ray_session, tmp_path):
    """benchmarks/gpu.py's whole sequence on the CPU (every step but the CUDA calls)."""
    from benchmarks import gpu

    result = gpu.run(images=16, dry=True, check_images=16, digits_per_class=4, image_size=48, min_accuracy=0.0)
    assert result["dry"] and result["failures"] == [], result["failures"]
    names = [r["check"] for r in result["checks"]]
    assert len(names) == 6 and names[0].startswith("pixels") and "mixed_precision='bf16'" in names[4]
    assert [(r["model"], r["decode"]) for r in result["throughput"]] == [
        ("efficientnet_lite0", "cpu"), ("efficientnet_lite0", "gpu"), ("resnet50", "cpu"), ("resnet50", "gpu")]
    assert all(r["rows"] == 16 for r in result["throughput"])
    assert "dry run" in gpu.report(result)
    assert json.loads(save_json("gpu", result, tmp_path).read_text())["dry"] is True


@pytest.mark.slow
@pytest.mark.benchmark
def test_cache_benchmark(ray_session):
    result = cache.run(images=24, epoch_counts=(1, 2), batch_size=8, image_size=64)
    assert [r["epochs"] for r in result["rows"]] == [1, 2] and all(r["ratio"] > 0 for r in result["rows"])
    assert "limit for N=10" in cache.report(result)


@pytest.mark.slow
@pytest.mark.benchmark
def test_head_benchmark(ray_session):
    result = head.run(rows=3000, epochs=1, batch_size=256, workers=1)
    assert result["rows"][0]["rows_per_s"] > 0 and result["rows"][1]["startup_s"] > 0
    assert "rows/s ratio" in head.report(result)


@pytest.mark.slow
@pytest.mark.benchmark
def test_scale_benchmark(ray_session):
    result = scale.run(images=8, factors=(1, 2), image_size=48)
    assert [r["images"] for r in result["rows"]] == [8, 16] and result["rows"][0]["driver_peak_mb"] > 0
    assert "peak memory" in scale.report(result)


@pytest.mark.benchmark
def test_storage_benchmark():
    result = storage.run(images=16)
    f16, f32 = result["rows"]
    assert f16["raw_feature_bytes"] * 2 == f32["raw_feature_bytes"] and 0.45 < result["float16_over_float32"] < 0.56
    assert "float16 / float32" in storage.report(result)


@pytest.mark.slow
@pytest.mark.benchmark
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
@pytest.mark.benchmark
def test_nodes_benchmark():
    from benchmarks import nodes

    result = nodes.run(images=8, nodes=2, image_size=32, timeout=600)
    single, cluster = result["rows"]
    assert single["rows"] == cluster["rows"] == 8 and single["writer_nodes"] == 1
    assert "cluster / single node" in nodes.report(result)


@pytest.mark.slow
@pytest.mark.benchmark
def test_staged_benchmark(ray_session):
    from benchmarks import staged

    result = staged.run(head_epochs=2, tune_epochs=1, per_class=4)  # the surfaces: 4 training patches a class
    head, ours, images, kept = result["rows"]
    assert result["settings"]["train_rows"] == 40 and ours["seconds"] > head["seconds"]  # the staged run includes the head
    assert result["accuracy_gain_over_head"] == ours["test_accuracy"] - head["test_accuracy"]
    assert "images throughout / staged wall time" in staged.report(result)


@pytest.mark.slow
@pytest.mark.benchmark
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
@pytest.mark.benchmark
def test_stream_benchmark(ray_session):
    from benchmarks import stream

    result = stream.run(rows=3000, factor=2, workers=1, epochs=1, batch_size=256)
    memory, streamed, large = result["rows"]
    assert (memory["mode"], streamed["mode"], large["rows"]) == ("in memory", "streaming", 6000)
    assert result["rows_per_s_ratio"] == streamed["rows_per_s"] / memory["rows_per_s"]
    assert "streaming / in memory" in stream.report(result)
