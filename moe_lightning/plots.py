"""The two things every plot here does: a headless matplotlib (imported only when a plot is drawn) and
saving a figure to a path whose folder may not exist yet."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write and close `fig`; -> the path written."""
    import matplotlib.pyplot as plt

    from moe_lightning.files import atomic_open

    path = Path(path)
    fig.tight_layout()
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path
