"""A causal LM pretrained here, for parts whose method scores with the very model it trains (ICon).

A Llama decoder over bytes (HF transformers, vocabulary 257: the ids of the pipeline's ``byte`` tokenizer,
EOS 256) with an HF fast tokenizer that gives the same ids, pretrained by the DeepSpeed trainer
(``examples/ablate/train.yaml`` with ``model.kind=hf``) on the pool and saved as an HF model directory, so
every library path loads it as it would any checkpoint: ``icon_score``, ``load_causal_lm``, the trainer.
"""

from __future__ import annotations

from pathlib import Path

EOS = 256


def byte_tokenizer():
    """An HF fast tokenizer whose ids are the UTF-8 bytes (0-255) and ``<eos>`` = 256, as the ``byte`` tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()} | {"<eos>": EOS}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<eos>", pad_token="<eos>")


def initial_model(path: Path, layers: int, width: int, heads: int, context: int, seed: int = 0) -> Path:
    """A randomly initialised byte Llama and its tokenizer, saved as an HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=EOS + 1, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=context,
                         tie_word_embeddings=True, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)
    LlamaForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return Path(path)


def pretrain(pool: Path, work: Path, layers: int, width: int, heads: int, seq_len: int, steps: int) -> tuple[Path, dict]:
    """Train an :func:`initial_model` on the pool snapshot; returns its HF directory and the run's stats."""
    from bench.ablate_train import train_arm

    work = Path(work)
    init = initial_model(work / "init", layers, width, heads, seq_len)
    model, stats = train_arm(pool, work / "train", 0, ["model.kind=hf", f"model.path={init}", f"data.seq_len={seq_len}",
                                                       "data.micro_batch_size=8", f"max_steps={steps}"])
    model.save_pretrained(work / "model")
    byte_tokenizer().save_pretrained(work / "model")
    return work / "model", stats
