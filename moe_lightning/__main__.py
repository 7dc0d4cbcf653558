"""`python -m moe_lightning ...` is the `moe-lightning` console script."""

from moe_lightning.cli import main

if __name__ == "__main__":
    main()
