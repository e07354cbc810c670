"""Pictures in py4DSTEM's style: ``show_*`` functions that return matplotlib figures.

- :func:`show_origin_maps`: measured, fitted and true origin maps (qx0, qy0).
- :func:`show_ellipse`: the calibrated ellipse drawn over the origin-aligned mean.
- :func:`show_denoising`: recorded, denoised (and clean) patterns side by side.
- :func:`show_strain_maps`: strain maps of several routes next to the truth.

Axes follow py4DSTEM: qx is the row (vertical) axis, qy the column axis; images are
drawn with ``origin='upper'``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["show_origin_maps", "show_ellipse", "show_denoising", "show_strain_maps"]


def _figure(nrows: int, ncols: int, size: float = 3.0):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    return fig, axes


def show_origin_maps(measured: tuple[np.ndarray, np.ndarray], fitted: tuple[np.ndarray, np.ndarray] | None = None,
                     truth: tuple[np.ndarray, np.ndarray] | None = None, title: str = ""):
    """Origin maps (qx0 top row, qy0 bottom row): measured, fitted, truth, error.

    Parameters
    ----------
    measured : tuple of numpy.ndarray
        (qx0, qy0) maps, pixels (e.g. ``metadata['prenet']['origin_measured']`` split).
    fitted : tuple of numpy.ndarray, optional
        A smooth descan fit of the same maps.
    truth : tuple of numpy.ndarray, optional
        True maps; adds a column of measured - truth.
    title : str
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    cols = [("measured", measured)]
    if fitted is not None:
        cols.append(("fitted", fitted))
    if truth is not None:
        cols.append(("truth", truth))
        cols.append(("measured - truth", tuple(np.asarray(m) - np.asarray(t) for m, t in zip(measured, truth))))
    fig, axes = _figure(2, len(cols))
    for j, (name, maps) in enumerate(cols):
        for i, label in enumerate(("qx0", "qy0")):
            m = np.asarray(maps[i], float)
            if name.endswith("truth") and name != "truth":
                lim = max(np.nanmax(np.abs(m)), 1e-3)
                im = axes[i, j].imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
            else:
                ref = np.asarray(measured[i], float)
                im = axes[i, j].imshow(m, cmap="viridis", vmin=np.nanmin(ref), vmax=np.nanmax(ref))
            axes[i, j].set_title(f"{label} {name} (px)", fontsize=9)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            fig.colorbar(im, ax=axes[i, j], fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_ellipse(image: np.ndarray, origin: tuple[float, float], ellipse: tuple[float, float, float],
                 radius: float, truth: tuple[float, float, float] | None = None, title: str = ""):
    """The calibrated ellipse over a pattern (e.g. the origin-aligned mean).

    Parameters
    ----------
    image : numpy.ndarray
        (Q_Nx, Q_Ny) pattern, drawn on a log scale.
    origin : tuple of float
        (qx0, qy0) of the image, pixels.
    ellipse : tuple of float
        (a, b, theta) in py4DSTEM's convention (theta from the qx axis).
    radius : float
        Length of the minor semi-axis b to draw, pixels (a ring radius).
    truth : tuple of float, optional
        The true (a, b, theta), drawn dashed.
    title : str
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, axes = _figure(1, 1, 5.0)
    ax = axes[0, 0]
    ax.imshow(np.log1p(np.clip(image, 0, None)), cmap="gray")
    t = np.linspace(0, 2 * np.pi, 361)
    curves = [(ellipse, "-", "calibrated")] + ([(truth, "--", "true")] if truth is not None else [])
    for (a, b, th), style, name in curves:
        u, v = radius * (a / b) * np.cos(t), radius * np.sin(t)
        qx = origin[0] + u * np.cos(th) - v * np.sin(th)
        qy = origin[1] + u * np.sin(th) + v * np.cos(th)
        ax.plot(qy, qx, style, lw=1.2, label=f"{name}: a/b = {a / b:.4f}, theta = {np.degrees(th) % 180:.1f} deg")
    ax.plot(origin[1], origin[0], "r+", ms=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def show_denoising(recorded: np.ndarray, denoised: np.ndarray, clean: np.ndarray | None = None, title: str = ""):
    """Recorded, denoised and (when known) clean patterns, same log colour scale.

    Parameters
    ----------
    recorded, denoised : numpy.ndarray
        (Q_Nx, Q_Ny) patterns or (N, Q_Nx, Q_Ny) stacks (one row each).
    clean : numpy.ndarray, optional
        The noise-free patterns.
    title : str
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    rec = np.asarray(recorded, float)
    rec = rec[None] if rec.ndim == 2 else rec
    den = np.asarray(denoised, float).reshape(rec.shape)
    panels = [("recorded", rec), ("PreNet denoised", den)]
    if clean is not None:
        panels.append(("clean (truth)", np.asarray(clean, float).reshape(rec.shape)))
    fig, axes = _figure(len(rec), len(panels))
    for i in range(len(rec)):
        vmax = np.log1p(np.percentile(np.clip(den[i], 0, None), 99.9))
        for j, (name, stack) in enumerate(panels):
            axes[i, j].imshow(np.log1p(np.clip(stack[i], 0, None)), cmap="inferno", vmin=0, vmax=vmax)
            axes[i, j].set_title(name, fontsize=9)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_strain_maps(maps: dict[str, np.ndarray], truth: np.ndarray, limit: float = 0.02, title: str = ""):
    """Strain maps of several routes next to the truth (rows e_xx, e_yy, e_xy, rotation).

    Parameters
    ----------
    maps : dict
        Route name -> (4, R_Nx, R_Ny) e_xx, e_yy, e_xy, theta (radians).
    truth : numpy.ndarray
        (4, R_Nx, R_Ny) true maps.
    limit : float
        Colour range +-limit for strain (rotation: +-limit rad too, shown in degrees).
    title : str
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    cols = {"truth": truth, **maps}
    fig, axes = _figure(4, len(cols), 2.4)
    for j, (name, m) in enumerate(cols.items()):
        for i, label in enumerate(("e_xx", "e_yy", "e_xy", "rotation")):
            data = np.asarray(m[i], float)
            if label == "rotation":
                ref = np.nanmedian(np.asarray(truth[3], float))
                im = axes[i, j].imshow(np.degrees(data), cmap="twilight", vmin=np.degrees(ref - 0.7),
                                       vmax=np.degrees(ref + 0.7))
            else:
                im = axes[i, j].imshow(100 * data, cmap="RdBu_r", vmin=-100 * limit, vmax=100 * limit)
            axes[i, j].set_title(f"{name}: {label} ({'deg' if label == 'rotation' else '%'})", fontsize=8)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == len(cols) - 1:
                fig.colorbar(im, ax=axes[i, j], fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
