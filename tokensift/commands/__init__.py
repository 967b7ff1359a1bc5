"""CLI subcommands, one module each (see tokensift.cli)."""
