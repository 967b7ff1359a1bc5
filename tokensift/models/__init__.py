"""Models: causal-LM loading and per-token losses, embeddings, the built-in GPT family."""
