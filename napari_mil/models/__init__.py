"""MIL models. Every model maps a bag (B, N, D) with an optional padding mask (B, N) to a
``MILOutput``: logits (B, C), bag embedding (B, E) and per-instance attention (B, N)."""
