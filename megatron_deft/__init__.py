"""megatron-deft: pretraining-grade SFT on Megatron-Core with token-level objectives.

Layout:
    objectives/  vocab-parallel token-level SFT objectives (the loss layer)
"""

__version__ = "0.1.0"
