"""Native kernels with pure-PyTorch fallbacks (built on first use; see each module)."""
