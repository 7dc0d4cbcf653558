"""The engine: functional Mixtral math, checkpoint loading, the reference engine and CGOPipe.

Importable with torch, safetensors and tokenizers alone (no Hydra, Optuna or wandb).
"""
