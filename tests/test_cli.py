import subprocess
import sys

from tokensift.cli import COMMANDS, main


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
    args = ["run", "examples/quickstart.yaml", "--dry-run", f"source.paths=[{sample_dir}/*.parquet]", "stages.1.top_p=0.2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "top_p: 0.2" in out and "# 4 input file(s)" in out and "tokenize -> score_threshold" in out


def test_config_errors_exit_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: {paths: [x]}\noutput: {path: o, rows_per_shard: lots}\n")
    proc = subprocess.run([sys.executable, "-m", "tokensift.cli", "run", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("tokensift run: config error:") and "rows_per_shard" in proc.stderr


def test_missing_input_is_one_clear_error(tmp_path, capsys):
    assert main(["run", "examples/quickstart.yaml", "--dry-run", f"source.paths=[{tmp_path}/none.parquet]"]) == 1
    assert "none.parquet: no such file or directory" in capsys.readouterr().err
