"""Writing matplotlib figures atomically (a crash never leaves a truncated PNG at the final
path)."""

import os


def save_figure(figure, path: str, dpi: int = 90) -> str:
    """Lays out, writes `figure` to `path` via a temporary file + rename, closes it; returns
    path."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    temp = path + ".tmp.png"
    figure.savefig(temp, dpi=dpi)
    plt.close(figure)
    os.replace(temp, path)
    return path
