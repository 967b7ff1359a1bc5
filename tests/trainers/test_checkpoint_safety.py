"""No checkpoint load runs code: a planted pickle is refused, naming its file; a real save -> load resumes."""

from __future__ import annotations

import pickle

import pytest
import torch

from tokensift.trainers import checkpoint
from tokensift.trainers.checkpoint import UnsafeCheckpointError

pytestmark = pytest.mark.usefixtures("remove_shm_buffers")


class Payload:
    """What an attacker pickles: unpickling it calls ``exec``, which writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _engine(zero_stage: int, precision: str = "fp32", seed: int = 0):
    import deepspeed

    from tokensift.trainers.train import distributed_env_defaults

    distributed_env_defaults()
    deepspeed.init_distributed()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": zero_stage},
              "bf16": {"enabled": precision == "bf16"}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1)),
    )
    return engine


def _step(engine, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, generator=g).to(next(engine.module.parameters()).dtype)
    engine.backward(engine(x).float().pow(2).mean())
    engine.step()


def _trained(tmp_path, zero_stage: int, precision: str = "fp32"):
    """An engine after 2 steps, saved at step 2 with a client state like the trainer's."""
    engine = _engine(zero_stage, precision)
    for s in range(2):
        _step(engine, s)
    state = {"loader": {"sequences": 8, "lanes": [0, 3], "seq_len": 64, "seed": 0, "tokens_per_epoch": 1234},
             "scorer": {"steps": 2, "alpha": 0.5, "history": {"w": torch.arange(3.0)}}}
    checkpoint.save(engine, tmp_path, 2, state)
    return engine, state


def test_safe_load_refuses_a_planted_pickle_and_runs_nothing(tmp_path):
    marker, planted = tmp_path / "ran.txt", tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "step": Payload(marker)}, planted)
    with pytest.raises(UnsafeCheckpointError, match=f"{planted}: refusing to load"):
        checkpoint.safe_load(planted)
    with pytest.raises(UnsafeCheckpointError, match="mp_rank_00_model_states.pt"):
        checkpoint.load_model_state(tmp_path.parent, tmp_path.name)
    assert not marker.exists()
    pickle_marker = tmp_path / "plain.txt"  # the payload is live: plain unpickling runs it
    pickle.loads(pickle.dumps(Payload(pickle_marker)))
    assert pickle_marker.read_text() == "ran"


@pytest.mark.parametrize(("zero_stage", "victim"), [(0, "mp_rank_00_model_states.pt"),
                                                    (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_resume_refuses_a_planted_checkpoint_file(tmp_path, zero_stage, victim):
    """A real checkpoint whose model (ZeRO 0) or optimizer-partition (ZeRO 2) file gained a payload."""
    _trained(tmp_path, zero_stage)
    marker, path = tmp_path / "ran.txt", tmp_path / "step_00000002" / victim
    state = checkpoint.safe_load(path)  # the attacker's side: rewrite a real file
    state["ds_version"] = Payload(marker)
    torch.save(state, path)
    with pytest.raises(UnsafeCheckpointError, match=f"{path}: refusing to load"):
        checkpoint.load(_engine(zero_stage), tmp_path)
    assert not marker.exists()


def test_latest_must_name_a_tag_inside_the_directory(tmp_path):
    (tmp_path / "latest").write_text("../elsewhere")
    with pytest.raises(UnsafeCheckpointError, match="is not a checkpoint tag"):
        checkpoint.load(object(), tmp_path)


@pytest.mark.parametrize(("zero_stage", "precision"), [(0, "fp32"), (1, "fp32"), (2, "bf16")])
def test_save_load_round_trip_resumes_exactly(tmp_path, zero_stage, precision):
    """Resume from step 2 then take step 3 == 3 uninterrupted steps: weights, optimizer, schedule, state."""
    straight, state = _trained(tmp_path / "a", zero_stage, precision)
    _step(straight, 2)
    resumed = _engine(zero_stage, precision, seed=1)  # other initial weights: all must come from the file
    client = checkpoint.load(resumed, tmp_path / "a")
    assert client["step"] == 2 and client["loader"] == state["loader"]
    assert client["scorer"]["alpha"] == 0.5 and torch.equal(client["scorer"]["history"]["w"], torch.arange(3.0))
    _step(resumed, 2)
    assert resumed.get_lr() == straight.get_lr() == [1e-2 / 4]
    for a, b in zip(straight.module.parameters(), resumed.module.parameters(), strict=True):
        assert torch.equal(a, b)
