"""Ids are unique in every published snapshot.

Inside one input shard the read task checks its ids (``sources.check_unique_ids``). Across shards the check
is a distributed group-by over the id column of the rows about to be published (Ray Data hash-shuffles the
ids between workers), run only when the source gave the ids: generated ids (``<file>:<row>``) are unique by
construction. The driver receives at most one duplicated id and the two places it came from.
"""

from __future__ import annotations

from tokensift.pipeline import schema


class DuplicateIdError(ValueError):
    """The same id in two input shards."""


def check_across_shards(files: list[str], place_of, storage) -> None:
    """Raise :class:`DuplicateIdError` naming an id found in two of ``files`` and both places.

    Args:
        files: the committed fragments to publish.
        place_of: maps a fragment path to the input it came from (for the message).
        storage: the run's storage options.
    """
    import ray.data

    from tokensift.pipeline import fs

    if not files:
        return
    filesystem, _ = fs.resolve(files[0], storage)
    inner = [fs.resolve(f, storage)[1] for f in files]
    ids = ray.data.read_parquet(inner, filesystem=filesystem, columns=[schema.ID], include_paths=True)
    counts = ids.groupby(schema.ID).count().rename_columns({"count()": "n"})
    repeated = counts.filter(expr="n > 1").take(1)
    if not repeated:
        return
    value = repeated[0][schema.ID]
    where = [place_of(r["path"]) for r in ids.filter(expr=f"{schema.ID} == {value!r}").take(2)]
    raise DuplicateIdError(f"duplicate id {value!r} (column 'id') in {where[0]} and {where[-1]}")
