"""Multi-node featurization: images/s and where the work ran, on a real Ray cluster of
several raylets started on this machine (``ray.cluster_utils.Cluster``: a head that
schedules nothing and ``--nodes`` worker nodes sharing this machine's cores), against the
same featurization on a single node with all the cores.

On one machine the nodes share its cores, so the cluster cannot be faster than the single
node; what this measures is that the work spreads (actors and shard writers on every
node, rows per node) and what the cluster's extra processes cost.

    python -m benchmarks.nodes [--images 400] [--nodes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .common import RESULTS, save_json, table, write_jpegs
from .scale import DATA

_DRIVER = r"""
import json, os, sys, time
import ray
from ray.cluster_utils import Cluster
from benchmarks.common import frozen_lite0

root, out, nodes, cpus, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if nodes:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus // nodes)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
else:
    ray.init(address="local", num_cpus=cpus, log_to_driver=False, include_dashboard=False)
from ray.data import DataContext
DataContext.get_current().enable_progress_bars = False
import pipeline
model, config = frozen_lite0(size or None)
t = time.perf_counter()
fset = pipeline.featurize(model, root, out, preprocessing=config)
seconds = time.perf_counter() - t
per_node = {}
for shard in fset.shards:  # the node whose actors computed most of its rows
    node = shard.nodes[0] if shard.nodes else shard.parts[0].node
    per_node[node] = per_node.get(node, 0) + shard.rows
print("RESULT " + json.dumps({"rows": fset.rows, "seconds": seconds, "rows_per_node": per_node,
                              "nodes_alive": len([n for n in ray.nodes() if n["Alive"]])}))
ray.shutdown()
if nodes:
    cluster.shutdown()
"""


def _run(root: Path, out: Path, nodes: int, cpus: int, image_size: int, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(root), str(out), str(nodes), str(cpus), str(image_size)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln]
        raise RuntimeError(f"the featurize driver failed ({proc.returncode}):\n" + "\n".join(errors[-20:]))
    return json.loads(line.removeprefix("RESULT "))


def run(images: int = 400, nodes: int = 2, image_size: int = 0, timeout: float = 1800) -> dict[str, Any]:
    import shutil
    import tempfile

    root = DATA / f"jpegs-{images}"
    write_jpegs(root, images)
    cpus = os.cpu_count() or 2
    rows = []
    for label, n in (("single node, all cores", 0), (f"cluster: head (0 CPUs) + {nodes} nodes", nodes)):
        out = Path(tempfile.mkdtemp(prefix="fr-nodes-"))
        try:
            r = _run(root, out / "f", n, cpus, image_size, timeout)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        placement = ", ".join(f"{node[:8]}: {count}" for node, count in sorted(r["rows_per_node"].items()))
        rows.append({"system": label, "rows": r["rows"], "seconds": r["seconds"], "images_per_s": r["rows"] / r["seconds"],
                     "writer_nodes": len(r["rows_per_node"]), "rows_per_node": placement})
    return {"settings": {"images": images, "nodes": nodes, "cpus": cpus, "image_size": image_size or 224}, "rows": rows,
            "cluster_over_single": rows[1]["images_per_s"] / rows[0]["images_per_s"]}


def report(result: dict[str, Any]) -> str:
    return "\n".join([
        table(result["rows"], ["system", "rows", "seconds", "images_per_s", "writer_nodes", "rows_per_node"]),
        f"cluster / single node images/s: {result['cluster_over_single']:.2f} (the same {result['settings']['cpus']} "
        "cores shared by every node)",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nodes", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--image-size", type=int, default=0, help="0: the model's own (224)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    result = run(a.images, a.nodes, a.image_size)
    print(report(result))
    print(f"wrote {save_json('nodes', result, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
