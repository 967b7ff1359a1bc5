"""The data path: sources, the stage protocol and registry, the Ray Data runner, snapshots, the loader."""
