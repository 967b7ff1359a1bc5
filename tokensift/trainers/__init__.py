"""Trainers: DeepSpeed loop, weighted losses, MoE balancing, mixture-of-depths."""
