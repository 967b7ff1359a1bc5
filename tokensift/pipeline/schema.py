"""The Arrow data contract shared by every stage (see DESIGN.md, "Data contract")."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

ID = "id"
TEXT = "text"
N_CHARS = "n_chars"  # int64, written by the source: character count of ``text``
INPUT_IDS = "input_ids"  # list<int32>
PROMPT_LENGTH = "prompt_length"  # int32: leading tokens of ``input_ids`` that are the prompt
LOSS_MASK = "loss_mask"  # list<int8>, same length as input_ids: 1 = response (trained), 0 = prompt
TOKEN_WEIGHTS = "token_weights"  # list<float32>, same length as input_ids; a mask is weights in {0,1}
EMBEDDING = "embedding"  # fixed_size_list<float32>

TOKEN_IDS_TYPE = pa.list_(pa.int32())
TOKEN_WEIGHTS_TYPE = pa.list_(pa.float32())


def score_column(stage: str) -> str:
    """Name of the score column a scoring stage writes, e.g. ``preselect_score``."""
    return f"{stage}_score"


def rank_column(stage: str) -> str:
    """Name of the selection-rank column a select stage writes on the rows it keeps."""
    return f"{stage}_rank"


def embedding_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """An ``n x d`` float array as a ``fixed_size_list<float32>[d]`` column."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A ``fixed_size_list<float32>`` column back to an ``n x d`` numpy array (no copy where possible)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    d = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)


def ragged_column(rows: list[np.ndarray], type_: pa.DataType) -> pa.ListArray:
    """Per-row numpy arrays (token ids or weights) as one Arrow list column."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    values = np.concatenate(rows) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_.value_type))
