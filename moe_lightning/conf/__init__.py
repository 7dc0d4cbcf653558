"""Hydra configs: YAML presets in the group folders, structured schemas in `store.py`."""
