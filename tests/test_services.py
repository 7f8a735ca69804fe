"""The real services in the fixtures work the way the rest of the suite uses them."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def test_parquet_round_trip_through_s3(s3_server, s3_bucket):
    fs = s3_server.filesystem()
    table = pa.table({"row": np.arange(100), "x": np.linspace(0.0, 1.0, 100)})
    with fs.open(f"{s3_bucket}/data/part-0.parquet", "wb") as f:
        pq.write_table(table, f)
    assert fs.ls(f"{s3_bucket}/data") == [f"{s3_bucket}/data/part-0.parquet"]
    with fs.open(f"{s3_bucket}/data/part-0.parquet", "rb") as f:
        back = pq.read_table(f)
    assert back.equals(table)


def test_safetensors_round_trip_through_s3(s3_server, s3_bucket):
    fs = s3_server.filesystem()
    tensors = {"w": torch.randn(4, 3), "b": torch.arange(4, dtype=torch.int64)}
    fs.pipe(f"{s3_bucket}/weights.safetensors", st_save(tensors))
    back = st_load(fs.cat(f"{s3_bucket}/weights.safetensors"))
    assert set(back) == {"w", "b"}
    assert torch.equal(back["w"], tensors["w"]) and torch.equal(back["b"], tensors["b"])


def test_pyarrow_s3_filesystem_reaches_the_fixture(s3_server, s3_bucket):
    from pyarrow import fs as pafs

    s3 = pafs.S3FileSystem(
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        endpoint_override=s3_server.endpoint_url.removeprefix("http://"),
        scheme="http",
        region="us-east-1",
    )
    pq.write_table(pa.table({"a": [1, 2, 3]}), f"{s3_bucket}/a.parquet", filesystem=s3)
    assert pq.read_table(f"{s3_bucket}/a.parquet", filesystem=s3).column("a").to_pylist() == [1, 2, 3]


def test_trivial_ray_data_job(ray_session):
    import ray

    ds = ray.data.range(1000, override_num_blocks=4).map_batches(lambda b: {"sq": b["id"] ** 2})
    assert ds.sum("sq") == sum(i * i for i in range(1000))
