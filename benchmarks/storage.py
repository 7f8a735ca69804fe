"""Storage: bytes per row of float16 and float32 feature shards, written by the same
writer featurize uses, against the raw feature size (values x itemsize).

    python -m benchmarks.storage [--images 256]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .common import RESULTS, frozen_lite0, save_json, table, write_jpegs

DATA = Path(__file__).parent / "data"


def run(images: int = 256) -> dict[str, Any]:
    import pyarrow.parquet as pq

    import surgery
    from freezeray.images import preprocess_bytes
    from pipeline.decode import normalize
    from pipeline.shards import to_arrow_columns, write_table

    root = DATA / f"jpegs-{images}"
    paths = sorted(write_jpegs(root, images))
    model, config = frozen_lite0()
    helper = surgery.TransferLearningHelper(model)
    pixels = np.stack([preprocess_bytes(p.read_bytes(), config) for p in paths])
    feats = torch.cat([helper.featurize(normalize(torch.from_numpy(pixels[i:i + 64]), config))
                       for i in range(0, len(pixels), 64)]).numpy()
    rows = []
    for dtype in ("float16", "float32"):
        values = feats.astype(dtype)
        table_ = pa.table(to_arrow_columns({"row_id": np.arange(len(values), dtype=np.int64),
                                            "path": np.asarray([str(p) for p in paths], dtype=object),
                                            "label": np.zeros(len(values), np.int32), "features": values}))
        out = Path("/tmp") / f"fr-storage-{dtype}-{time.time_ns()}.parquet"
        size = write_table(str(out), table_, None)
        back = pq.read_table(out)
        assert back.num_rows == len(values)
        out.unlink()
        raw = values.shape[1] * values.dtype.itemsize
        rows.append({"dtype": dtype, "rows": len(values), "bytes_per_row": size / len(values), "raw_feature_bytes": raw,
                     "overhead_bytes_per_row": size / len(values) - raw, "ratio_to_raw": size / len(values) / raw})
    return {"settings": {"images": images, "feature_shape": list(feats.shape[1:]), "model": "efficientnet_lite0"},
            "rows": rows, "float16_over_float32": rows[0]["bytes_per_row"] / rows[1]["bytes_per_row"]}


def report(result: dict[str, Any]) -> str:
    return "\n".join([table(result["rows"], ["dtype", "rows", "bytes_per_row", "raw_feature_bytes",
                                             "overhead_bytes_per_row", "ratio_to_raw"]),
                      f"float16 / float32 shard size: {result['float16_over_float32']:.3f}"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.storage", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    result = run(a.images)
    print(report(result))
    print(f"wrote {save_json('storage', result, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
