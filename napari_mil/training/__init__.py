"""Training: MHIM-MIL (masked hard instance mining with an EMA teacher)."""
