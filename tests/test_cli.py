import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokensift.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
# the quickstart's one-line alternative without models: the longest half of the documents by tokens
LENGTH_CUT = "stages=[{stage: tokenize}, {stage: score_threshold, column: n_tokens, top_p: 0.5, weight: docs}]"


def test_help_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_every_command_module_builds_its_parser():
    from tokensift.cli import build_parser

    for name in COMMANDS:
        sub = build_parser(name)._subparsers._group_actions[0].choices[name]
        assert sub.format_help().startswith(f"usage: tokensift {name}")


def test_dry_run_prints_resolved_config_and_plan(sample_dir, capsys, tmp_path):
    args = ["run", "examples/quickstart.yaml", "--dry-run", f"source.paths=[{sample_dir}/*.parquet]", "stages.1.budget=64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "budget: 64" in out and "# 4 input file(s)" in out and "embed -> sift -> tokenize -> eslm" in out


def test_config_errors_exit_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: {paths: [x]}\noutput: {path: o, rows_per_shard: lots}\n")
    proc = subprocess.run([sys.executable, "-m", "tokensift.cli", "run", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("tokensift run: config error:") and "rows_per_shard" in proc.stderr


def test_missing_input_is_one_clear_error(tmp_path, capsys):
    assert main(["run", "examples/quickstart.yaml", "--dry-run", f"source.paths=[{tmp_path}/none.parquet]"]) == 1
    assert "none.parquet: no such file or directory" in capsys.readouterr().err


# --- expected failures: one line naming the file, exit 1 (2 for config); --verbose adds the traceback -------


def _tiny_source(directory: Path, int_domain: bool = False) -> Path:
    """One small Parquet shard of real documents (40 news rows; ``int_domain``: the next 40, domain as int64)."""
    directory.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(ROOT / "sample_data" / "news.parquet", columns=["id", "text", "domain"])
    table = table.slice(40 if int_domain else 0, 40)
    if int_domain:
        table = table.set_column(2, "domain", pa.array(range(len(table)), pa.int64()))
    pq.write_table(table, directory / f"shard-{int(int_domain)}.parquet")
    return directory


def _run(capsys, source: Path, out: Path, *extra: str) -> tuple[int, str]:
    """``tokensift run`` in this process; returns the exit code and the last line of stderr (in-process, the
    session's Ray was started by a fixture, not quieted by the command: its logs precede the line)."""
    code = main(["run", str(ROOT / "examples" / "quickstart.yaml"), f"source.paths=[{source}]", f"output.path={out}",
                 "stages=[]", "output.report=false", *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.splitlines()[-1]


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` (yields True), or a plain directory where mounting is not permitted."""
    path.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                                   capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


def test_read_only_output_location_is_one_line_naming_it(sample_dir, tmp_path, capsys):
    source = _tiny_source(tmp_path / "in")
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as mounted:
        if not mounted:
            if os.geteuid() == 0:
                pytest.skip("root without permission to mount: a read-only directory cannot be made")
            (tmp_path / "ro").chmod(0o555)
        code, err = _run(capsys, source, tmp_path / "ro" / "snap")
    assert code == 1 and err.startswith(f"tokensift run: {tmp_path / 'ro' / 'snap'}"), err
    assert ("Read-only file system" if mounted else "Permission denied") in err


def test_full_disk_is_one_line(ray_local, sample_dir, tmp_path, capsys, monkeypatch):
    source = _tiny_source(tmp_path / "in")
    with _tmpfs(tmp_path / "small", "size=64k") as mounted:
        if not mounted:  # simulate what a full disk raises from a write: ENOSPC without a file name
            from tokensift.pipeline import runner

            monkeypatch.setattr(runner, "run", lambda cfg, restart=False: (_ for _ in ()).throw(
                OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
        code, err = _run(capsys, source, tmp_path / "small" / "snap")
    assert code == 1 and err.startswith("tokensift run: ") and "No space left on device" in err, err
    if not mounted:  # raised without a file name in this process: the command names where the run writes
        assert err == f"tokensift run: {tmp_path / 'small' / 'snap'}: No space left on device"


def test_shards_with_conflicting_column_types_are_one_line(ray_local, sample_dir, tmp_path, capsys):
    source = _tiny_source(tmp_path / "in")
    _tiny_source(source, int_domain=True)
    code, err = _run(capsys, source, tmp_path / "snap")
    assert code == 1 and err.startswith("tokensift run: ") and "domain" in err and "int64" in err, err


def test_verbose_adds_the_traceback_before_the_line(tmp_path, capsys):
    missing = tmp_path / "none.parquet"
    for flags in (["--verbose"], ["-v"]):
        assert main(["run", "examples/quickstart.yaml", "--dry-run", f"source.paths=[{missing}]", *flags]) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback") and err.endswith(f"tokensift run: {missing}: no such file or directory\n")
    assert main(["--verbose", "run", "examples/quickstart.yaml", "--dry-run", "stages.1.lam=0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("tokensift run: config error: ")


def test_a_bug_keeps_its_traceback(monkeypatch):
    from tokensift.commands import verify

    monkeypatch.setattr(verify, "main", lambda args: {}["missing"])
    with pytest.raises(KeyError):
        main(["verify", "somewhere"])


def _raise_value_error_outside_tokensift():
    raise ValueError("a bug in a library")


def test_describe_maps_expected_failures_and_leaves_bugs():
    from tokensift.failures import describe
    from tokensift.pipeline.sources import SourceError, expand

    assert describe(OSError(errno.EROFS, "Read-only file system", "/data/out")) == "/data/out: Read-only file system"
    assert describe(OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")) == "/a -> /b: Invalid cross-device link"
    assert describe(FileExistsError("/o exists; set output.overwrite=true")) == "/o exists; set output.overwrite=true"
    assert describe(pa.lib.ArrowTypeError("Unable to merge: Field domain has incompatible types")).startswith("Unable")
    with pytest.raises(SourceError) as raised:  # raised by tokensift's code: expected
        expand(["/no/such/input.parquet"])
    assert describe(raised.value) == "/no/such/input.parquet: no such file or directory"
    with pytest.raises(ValueError) as raised:  # raised outside tokensift: a bug, shown with its traceback
        _raise_value_error_outside_tokensift()
    assert describe(raised.value) is None
    assert describe(KeyError("x")) is None


def test_describe_reads_the_cause_of_ray_task_and_ray_data_errors(ray_local):
    import ray

    from tokensift.failures import describe

    @ray.remote
    def full_disk():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/part-0.parquet")

    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(full_disk.remote())
    assert describe(raised.value) == "/data/out/part-0.parquet: No space left on device"

    def bad_batch(batch):
        raise ValueError("/data/in/x.parquet row 3 column 'text': null")

    with pytest.raises(Exception) as raised:  # Ray Data keeps only the text of the original exception
        ray.data.range(4).map_batches(bad_batch).materialize()
    assert describe(raised.value) == "/data/in/x.parquet row 3 column 'text': null"

    def bug(batch):
        return {}["missing"]

    with pytest.raises(Exception) as raised:
        ray.data.range(4).map_batches(bug).materialize()
    assert describe(raised.value) is None


def test_native_stderr_goes_to_the_log_and_python_stderr_to_the_console(tmp_path):
    """What Ray's C++ core worker writes on file descriptor 2 lands in the log file, not on the console."""
    code = ("import os, sys; from tokensift.pipeline.ray_env import _native_stderr_to; "
            f"_native_stderr_to({str(tmp_path / 'driver.err')!r}); "
            "os.write(2, b'E core_worker.cc: native noise\\n'); print('ours', file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stderr == "ours\n"
    assert (tmp_path / "driver.err").read_text() == "E core_worker.cc: native noise\n"


@pytest.mark.slow
def test_console_shows_tokensift_not_ray_unless_verbose(sample_dir, tmp_path):
    source = _tiny_source(tmp_path / "in")
    args = [sys.executable, "-m", "tokensift.cli", "run", "examples/quickstart.yaml", f"source.paths=[{source}]",
            "output.report=false", "ray.num_cpus=2", LENGTH_CUT]
    quiet = subprocess.run([*args, f"output.path={tmp_path / 'a'}"], capture_output=True, text=True, cwd=ROOT)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    ray_lines = ("\tINFO ", "core_worker.cc", "(run_segment pid=")  # Ray's logs, and its workers' (forwarded)
    assert not any(line in quiet.stderr for line in ray_lines), quiet.stderr[-2000:]
    assert f"snapshot written: {tmp_path / 'a'}" in quiet.stdout
    loud = subprocess.run([*args, f"output.path={tmp_path / 'b'}", "--verbose"], capture_output=True, text=True,
                          cwd=ROOT)
    assert loud.returncode == 0 and "(run_segment pid=" in loud.stderr, loud.stderr[-2000:]
