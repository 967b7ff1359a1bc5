"""The PreSelect chain from S3 to S3 on a Ray cluster of a head and two worker nodes (tests only).

``python multinode_job.py SPEC.json``: starts ``ray.cluster_utils.Cluster`` on loopback (a head without CPUs,
two worker nodes with their own raylets and object stores), runs ``spec["overrides"]`` with a gate that
holds the later shards back, kills one worker node with SIGKILL once ``spec["kill_after"]`` shards are
committed, adds a fresh node, opens the gate, and prints the published snapshot's URI.
"""

import json
import sys
import threading
import time
from pathlib import Path

import gate_stage  # noqa: F401  registers the test_gate stage
import ray
from ray.cluster_utils import Cluster

from tokensift.config import RunConfig, load
from tokensift.pipeline import fs, runner

NODE = {"num_cpus": 1, "object_store_memory": 200 * 2**20, "node_ip_address": "127.0.0.1"}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(**NODE) for _ in range(2)]
    cfg = load(RunConfig, None, spec["overrides"] + [f"ray.address={cluster.address}"])
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(out=runner.run(cfg)), daemon=True)
    thread.start()
    markers = fs.join(f"{cfg.output.path}.partial", "seg0")
    while len([e for e in fs.listdir(markers) if e.path.endswith(".json")]) < spec["kill_after"]:
        if not thread.is_alive():
            sys.exit("the run ended before the node could be killed")
        time.sleep(0.2)
    cluster.remove_node(workers[0], allow_graceful=False)  # SIGKILL: raylet, object store, workers
    cluster.add_node(**NODE)
    print("killed a worker node", flush=True)
    Path(spec["gate"]).unlink()
    thread.join(timeout=600)
    print(json.dumps({"out": str(result.get("out"))}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
