"""moe-lightning: high-throughput MoE batch inference on GPUs far smaller than the model.

The engine (`moe_lightning.engine`) imports only torch, safetensors and tokenizers, so that it runs on
a bare GPU machine; Hydra, Optuna and wandb are imported only by the CLI, the tuner and the loggers.
"""

__version__ = "0.1.0"
