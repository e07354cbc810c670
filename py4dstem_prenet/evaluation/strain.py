"""Strain mapping end to end in py4DSTEM: no calibration vs classical vs PreNet.

Every route ends in py4DSTEM's unchanged ``find_Bragg_disks`` ->
``braggvectors.setcal`` -> ``StrainMap`` (``fit_basis_vectors``, ``get_strain``
against one reference region of grain 0). The routes differ only in the origin and
ellipse calibration (and, for PreNet, the denoised data the disks are found in):

- ``none``: the origin at the detector centre, no ellipse;
- ``classical``: py4DSTEM ``get_origin`` (radius hand-set to the true disk radius)
  + ``fit_origin`` (parabola), ellipse by ``fit_ellipse_amorphous_ring`` on the
  origin-aligned mean of the amorphous strip (the user picks the region and the
  fit radii);
- ``prenet``: ``prenet.preprocess(datacube)`` and nothing else;
- ``exact``: the true origin maps and ellipse on the recorded data: the floor any
  calibration can reach with the same disk detection and lattice fit (what is left
  is the noise of the Bragg-disk positions);
- ``exact, PreNet data``: the same on PreNet's denoised output, the floor of the
  PreNet route (its disks are found in other data).

:func:`strain_verdicts` compares each route with the floor on its own data: the
false strain a calibration adds is the part of a route's RMS error above that
floor, ``sqrt(rms^2 - rms_floor^2)``.

Hands-on steps shared by all routes: the disk-detection template and thresholds,
and the basis vectors of each grain (the clicks of ``choose_basis_vectors``; here the
true unstrained basis, rotated per grain). The truth is py4DSTEM's own
``get_strain_from_reference_g1g2`` applied to the exact reciprocal bases, so the
errors measure the calibration and the measurement, not a convention.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..baselines.origin import _quiet
from ..conventions import ellipse_to_e12

__all__ = ["LATTICE_KEYS", "StrainConfig", "lattice_shape", "measure_strain", "run_strain_benchmark", "strain_markdown",
           "strain_verdicts", "verdicts_markdown", "true_strain", "ROUTES"]

#: The calibration routes: three a user can take, and the exact calibration on the
#: recorded data and on PreNet's denoised data (the floors of the others).
ROUTES = ("none", "classical", "prenet", "exact", "exact, PreNet data")

#: The route whose data and error floor each route is judged against.
_FLOOR = {"none": "exact", "classical": "exact", "prenet": "exact, PreNet data",
          "exact, PreNet data": "exact"}  # the last: what PreNet's denoising adds

#: A route within this factor of the exact route's RMS error adds no measurable false
#: strain: the routes tie at the floor set by the noise of the disk positions.
FLOOR_TOLERANCE = 1.1

#: The strain components of the verdicts (rotation is reported, not judged).
_STRAIN_KEYS = ("e_xx", "e_yy", "e_xy")

_COMPONENTS = ("e_xx", "e_yy", "e_xy", "theta")

#: The absolute lattice of each pattern, what phase identification compares with a
#: database: |g1| / |g2| and the angle between g1 and g2 (radians). Neither depends on
#: the camera length or the scan rotation, and neither cancels against a reference.
LATTICE_KEYS = ("lattice_ratio", "lattice_angle")


def lattice_shape(g1g2: np.ndarray) -> np.ndarray:
    """(2, ...) |g1| / |g2| and the angle between g1 and g2 (radians) of (..., 2, 2) bases (rows g1, g2)."""
    g1, g2 = g1g2[..., 0, :], g1g2[..., 1, :]
    n1, n2 = np.hypot(g1[..., 0], g1[..., 1]), np.hypot(g2[..., 0], g2[..., 1])
    cross = g1[..., 0] * g2[..., 1] - g1[..., 1] * g2[..., 0]
    dot = g1[..., 0] * g2[..., 0] + g1[..., 1] * g2[..., 1]
    return np.stack([n1 / n2, np.abs(np.arctan2(cross, dot))])


@dataclass
class StrainConfig:
    """What the strain benchmark runs.

    Attributes
    ----------
    cases : dict
        Case name -> keyword arguments of
        :func:`~py4dstem_prenet.simulation.strain.simulate_strain_datacube`.
    doses : tuple of float
        Electrons per pattern.
    scan_shape : tuple of int
        Probe positions.
    seed : int
        Seed of the first scan (one scan per case and dose).
    """

    cases: dict = field(default_factory=lambda: {
        "two grains (0 and 30 deg), a/b = 1.03": dict(ellipse=(1.03, 0.4), grain_rotation_deg=(0.0, 30.0)),
        "two grains, a/b = 1.03, 256x256 detector": dict(ellipse=(1.03, 0.4), grain_rotation_deg=(0.0, 30.0),
                                                          detector_shape=(256, 256)),
        "descan 12 px, bright disks, hot pixels, a/b = 1.02": dict(
            ellipse=(1.02, 2.0), grain_rotation_deg=(0.0,), descan_amplitude=12.0, bright_disks=True, hot=True),
        "one grain, a/b = 1.00 (calibration should not matter)": dict(ellipse=(1.0, 0.0), grain_rotation_deg=(0.0,)),
    })
    doses: tuple[float, ...] = (1e4, 1e5, 1e6)
    scan_shape: tuple[int, int] = (14, 12)
    seed: int = 20_000_000

    @classmethod
    def quick(cls) -> "StrainConfig":
        """A seconds-long configuration for tests."""
        return cls(cases={"two grains, a/b = 1.03": dict(ellipse=(1.03, 0.4), grain_rotation_deg=(0.0, 30.0))},
                   doses=(1e5,), scan_shape=(8, 6))


def _g1g2_slice(g1g2: np.ndarray):
    """A py4DSTEM RealSlice ('g1x', 'g1y', 'g2x', 'g2y', 'mask') from (R_Nx, R_Ny, 2, 2) bases."""
    from py4DSTEM import RealSlice

    ok = np.all(np.isfinite(g1g2.reshape(*g1g2.shape[:2], 4)), axis=-1)
    data = np.stack([g1g2[..., 0, 0], g1g2[..., 0, 1], g1g2[..., 1, 0], g1g2[..., 1, 1], ok.astype(float)])
    return RealSlice(data=np.nan_to_num(data), slicelabels=("g1x", "g1y", "g2x", "g2y", "mask"), name="g1g2_map")


def true_strain(truth) -> np.ndarray:
    """(4, R_Nx, R_Ny) e_xx, e_yy, e_xy, theta from the exact bases, by py4DSTEM's own formula."""
    from py4DSTEM.process.strain.latticevectors import get_strain_from_reference_g1g2

    ref = truth.g1g2[truth.reference]
    g1, g2 = np.median(ref[:, 0], axis=0), np.median(ref[:, 1], axis=0)
    with _quiet():
        sm = get_strain_from_reference_g1g2(_g1g2_slice(truth.g1g2), g1, g2)
    out = np.stack([sm.get_slice(k).data for k in _COMPONENTS])
    out[:, truth.grain < 0] = np.nan
    return out


def measure_strain(datacube, origin: tuple[np.ndarray, np.ndarray], ellipse: tuple[float, float, float] | None,
                   truth, max_peak_spacing: float = 2.5) -> np.ndarray:
    """Strain maps measured by py4DSTEM with a given calibration.

    Parameters
    ----------
    datacube : py4DSTEM.DataCube
        The data Bragg disks are found in (it is not changed: a copy of its
        calibration is set).
    origin : tuple of numpy.ndarray
        (qx0, qy0) maps, pixels.
    ellipse : tuple or None
        (a, b, theta) for ``calibration.set_ellipse``, or None for no correction.
    truth : StrainTruth
        For the grain masks, the reference region and the basis of each grain
        (what the user selects in ``choose_basis_vectors``).
    max_peak_spacing : float
        Indexing tolerance of ``fit_basis_vectors``, pixels (scaled with the detector).

    Returns
    -------
    numpy.ndarray
        (6, R_Nx, R_Ny) e_xx, e_yy, e_xy, theta (radians), and the absolute lattice
        of :func:`lattice_shape` (|g1| / |g2|, angle between g1 and g2 in radians) of
        the fitted bases; NaN where py4DSTEM could not fit the lattice or outside the
        crystal.
    """
    import matplotlib.pyplot as plt
    import py4DSTEM
    from py4DSTEM.process.strain.latticevectors import index_bragg_directions

    h, w = datacube.data.shape[2:]
    scale = min(h, w) / 128
    dc = py4DSTEM.DataCube(data=datacube.data)
    probe = py4DSTEM.Probe.generate_synthetic_probe(truth.disk_radius, 1.0, (h, w))
    kernel = probe.get_kernel(mode="sigmoid", origin=None, radii=(truth.disk_radius, 2 * truth.disk_radius))
    out = np.full((4 + len(LATTICE_KEYS), *truth.grain.shape), np.nan)
    with _quiet():
        bv = dc.find_Bragg_disks(kernel, minRelativeIntensity=0.02, minPeakSpacing=6 * scale,
                                 edgeBoundary=int(4 * scale), subpixel="multicorr", upsample_factor=16,
                                 maxNumPeaks=80)
        dc.calibration.set_origin((np.asarray(origin[0], float), np.asarray(origin[1], float)))
        if ellipse is not None:
            dc.calibration.set_ellipse(tuple(float(v) for v in ellipse))
        bv.setcal(center=True, ellipse=ellipse is not None, pixel=False, rotate=False)
        ij = np.array([(i, j) for i in range(-6, 7) for j in range(-6, 7) if (i, j) != (0, 0)])
        g_ref = None
        maps = []
        for k, rot in enumerate(truth.grain_rotation):
            c, s = np.cos(rot), np.sin(rot)
            basis = truth.basis @ np.array([[c, -s], [s, c]]).T  # rows g1, g2 rotated with the grain
            pts = np.vstack([[0.0, 0.0], ij @ basis])
            pts = pts[np.hypot(pts[:, 0], pts[:, 1]) < 0.45 * min(h, w)]
            sm = py4DSTEM.StrainMap(bv)
            # what choose_basis_vectors stores when the user clicks the grain's g1 and g2
            _, _, sm.braggdirections = index_bragg_directions(0.0, 0.0, pts[:, 0], pts[:, 1], basis[0], basis[1])
            sm.g0, sm.g1, sm.g2 = (0.0, 0.0), tuple(basis[0]), tuple(basis[1])
            grain = truth.grain == k
            sm.fit_basis_vectors(mask=grain, max_peak_spacing=max_peak_spacing * scale)
            if g_ref is None:
                g_ref = sm.get_reference_g1g2(truth.reference & sm.mask)
                if not np.all(np.isfinite(g_ref)):  # no pattern of the reference region could be indexed
                    return out
            sm.get_strain(gvects=g_ref)
            plt.close("all")
            maps.append((grain & sm.mask.astype(bool), sm))
        for grain, sm in maps:
            for i, key in enumerate(_COMPONENTS):
                out[i][grain] = sm.get_slice(key).data[grain]
            g = np.stack([sm.g1g2_map.get_slice(k).data for k in ("g1x", "g1y", "g2x", "g2y")], axis=-1)
            out[4:, grain] = lattice_shape(g.reshape(*g.shape[:2], 2, 2))[:, grain]
    return out


def _route_calibration(route: str, dc, truth, prenet_out=None):
    """(data for disk detection, origin, ellipse, seconds) of one route.

    ``prenet_out``: the ``prenet`` route's DataCube, needed by ``exact, PreNet data``.
    """
    from ..baselines import aligned_mean_pattern, ellipse_amorphous_ring, fit_origin, get_origin
    from ..preprocess import preprocess

    h, w = dc.data.shape[2:]
    t0 = time.perf_counter()
    if route == "none":
        centre = np.full(dc.data.shape[:2], (h - 1) / 2), np.full(dc.data.shape[:2], (w - 1) / 2)
        return dc, centre, None, time.perf_counter() - t0
    if route == "classical":
        with _quiet():
            qx0, qy0 = fit_origin(*get_origin(dc, r=truth.disk_radius), "parabola")
            amorphous = truth.grain < 0
            mean, centre = aligned_mean_pattern(dc.data[amorphous][None], qx0[amorphous][None], qy0[amorphous][None])
            ring = truth.ring_radius
            ratio, theta = ellipse_amorphous_ring(mean, centre, (0.75 * ring, 1.25 * ring))
        return dc, (qx0, qy0), (ratio, 1.0, theta), time.perf_counter() - t0
    if route == "prenet":
        out = preprocess(dc, progress=False)
        return out, out.calibration.get_origin(), out.calibration.get_ellipse(), time.perf_counter() - t0
    if route in ("exact", "exact, PreNet data"):
        data = dc if route == "exact" else prenet_out
        if data is None:
            raise ValueError(f"route {route!r} needs the prenet route's output")
        return data, (truth.origin[..., 0], truth.origin[..., 1]), truth.ellipse, time.perf_counter() - t0
    raise ValueError(f"route must be one of {ROUTES}, got {route!r}")


def run_strain_benchmark(cfg: StrainConfig | None = None, log=lambda m: None) -> list[dict]:
    """Simulate every case and dose, run every route of ROUTES, and compare with the truth.

    Returns
    -------
    list of dict
        One row per case, dose and route: RMS error of e_xx, e_yy, e_xy (strain,
        dimensionless) and theta (radians) over the crystal positions where the
        route measured, the fraction of crystal positions it could not measure,
        the calibration time, and the maps for plotting.
    """
    from ..simulation import Detector
    from ..simulation.strain import simulate_strain_datacube

    cfg = cfg or StrainConfig()
    rows = []
    for ci, (case, kw) in enumerate(cfg.cases.items()):
        kw = dict(kw)
        hot = kw.pop("hot", False)
        det = Detector(hot_fraction=2e-4, hot_level=10.0) if hot else Detector()
        for di, dose in enumerate(cfg.doses):
            log(f"{case}, {dose:.0e} e-")
            dc, truth = simulate_strain_datacube(cfg.scan_shape, dose=dose, detector=det,
                                                 seed=cfg.seed + 100 * ci + di, **kw)
            true = true_strain(truth)
            true_lattice = lattice_shape(truth.g1g2)
            crystal = truth.grain >= 0
            prenet_out = None
            for route in ROUTES:
                data, origin, ell, seconds = _route_calibration(route, dc, truth, prenet_out)
                if route == "prenet":
                    prenet_out = data
                est = measure_strain(data, origin, ell, truth)
                ok = crystal & np.all(np.isfinite(est), axis=0)
                err = est[:4] - true
                row = {"case": case, "dose": dose, "route": route, "seconds": seconds,
                       "unmeasured": float(1 - ok[crystal].mean()), "maps": est[:4], "truth": true}
                for i, key in enumerate(_COMPONENTS):
                    row[key] = float(np.sqrt(np.mean(err[i][ok] ** 2))) if ok.any() else np.nan
                # the absolute lattice: relative error of |g1| / |g2|, error of the angle
                lattice_err = (est[4] / true_lattice[0] - 1, est[5] - true_lattice[1])
                for key, e in zip(LATTICE_KEYS, lattice_err):
                    row[key] = float(np.sqrt(np.mean(e[ok] ** 2))) if ok.any() else np.nan
                if ell is not None:
                    row["ratio"] = float(ell[0] / ell[1])
                    row["ellipse_theta"] = float(ell[2]) % np.pi
                # polar / ring analysis of the amorphous strip: after the route's correction a
                # ring's radius still varies with angle by this fraction (peak to peak)
                used = ellipse_to_e12(row.get("ratio", 1.0), row.get("ellipse_theta", 0.0))
                row["ring_ellipticity"] = float(np.hypot(*(used - ellipse_to_e12(truth.ratio, truth.theta))))
                rows.append(row)
    return rows


def strain_markdown(rows: list[dict]) -> str:
    """The rows as a markdown table (strain in %, rotation and the ellipse's angle in degrees).

    The absolute lattice columns are the errors of :func:`lattice_shape` of every
    measured pattern against the truth (|g1| / |g2| relative, in %; the angle between
    g1 and g2 in degrees): what phase identification reads, with no reference to cancel
    a calibration error. "ring ellipticity left" is |(e1, e2) used - (e1, e2) true|:
    the peak-to-peak fraction by which a ring's radius still varies with angle after
    the route's correction, which blurs the rings of a polar or radial-distribution
    analysis of the amorphous strip (3% uncorrected at a/b = 1.03).

    The ellipse a route used is shown to the precision that the strain resolves: at
    a/b = 1.03, an angle off by 0.3 degrees already adds a few thousandths of a percent
    between grains of different orientation.
    """
    lines = ["| case | dose e- | route | RMS e_xx % | RMS e_yy % | RMS e_xy % | RMS rotation deg | "
             "RMS abs. |g1|/|g2| % | RMS abs. g1-g2 angle deg | ring ellipticity left % | not measured | "
             "a/b used | theta used deg | calibration s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        theta = f"{np.degrees(r['ellipse_theta']):.2f}" if "ellipse_theta" in r else "-"
        lines.append(f"| {r['case']} | {r['dose']:.0e} | {r['route']} | {100 * r['e_xx']:.3f} | "
                     f"{100 * r['e_yy']:.3f} | {100 * r['e_xy']:.3f} | {np.degrees(r['theta']):.3f} | "
                     f"{100 * r['lattice_ratio']:.3f} | {np.degrees(r['lattice_angle']):.3f} | "
                     f"{100 * r['ring_ellipticity']:.3f} | "
                     f"{100 * r['unmeasured']:.0f}% | {r.get('ratio', 1.0):.4f} | {theta} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def strain_verdicts(rows: list[dict], keys: tuple[str, ...] = _STRAIN_KEYS) -> list[dict]:
    """The strain issue's targets per case and dose, judged against the exact-calibration floor.

    For each case and dose with an ``exact`` row, the worst RMS error over e_xx,
    e_yy and e_xy of every route, and the false strain each calibration adds on top
    of the floor, ``sqrt(max(rms^2 - rms_exact^2, 0))`` (worst component). Calibration
    matters where the uncalibrated route adds more than the floor itself or cannot
    measure everywhere. There, PreNet meets the target where it adds at most half
    the classical route's false strain; where both stay within FLOOR_TOLERANCE of
    their floors the routes tie (calibration error is no longer what limits the map,
    and "half of the classical route" cannot be resolved).

    Parameters
    ----------
    rows : list of dict
        From :func:`run_strain_benchmark`.
    keys : tuple of str
        The errors judged, worst of them: the strain components (default), or
        ``('lattice_ratio', 'lattice_angle')``, the absolute lattice, where no
        reference cancels a calibration error (relative error and radians).

    Returns
    -------
    list of dict
        Keys 'case', 'dose', 'matters' (bool), 'rms' (every route) and 'added'
        (none, classical, prenet, and 'exact, PreNet data': what PreNet's denoising
        adds to the exact route) (route -> worst component, dimensionless), and
        'verdict': one of
        'met', 'tie at the floor', 'NO', or 'calibration does not matter'.

    Raises
    ------
    ValueError
        If a case and dose lack one of the classical, prenet and exact rows.
    """
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["dose"]), {})[r["route"]] = r
    out = []
    for (case, dose), by_route in groups.items():
        missing = {"classical", "prenet", "exact", "exact, PreNet data"} - set(by_route)
        if missing:
            raise ValueError(f"{case}, {dose:.0e}: no {sorted(missing)} row")

        def worst(r):
            v = [r[k] for k in keys]
            return float(max(v)) if np.all(np.isfinite(v)) and r["unmeasured"] < 1 else float("inf")

        rms = {k: worst(r) for k, r in by_route.items()}
        added = {k: float(np.sqrt(max(rms[k] ** 2 - rms[f] ** 2, 0.0))) if np.isfinite(rms[k]) else float("inf")
                 for k, f in _FLOOR.items() if k in rms}
        floor = rms["exact"]
        none = by_route.get("none")
        matters = none is None or none["unmeasured"] > 0.05 or added["none"] > floor
        if not matters:
            verdict = "calibration does not matter"
        elif added["prenet"] <= 0.5 * added["classical"]:
            verdict = "met"
        elif (rms["classical"] <= FLOOR_TOLERANCE * floor
              and rms["prenet"] <= FLOOR_TOLERANCE * rms["exact, PreNet data"]):
            verdict = "tie at the floor"
        else:
            verdict = "NO"
        out.append({"case": case, "dose": dose, "matters": matters, "rms": rms, "added": added, "verdict": verdict})
    return out


def verdicts_markdown(verdicts: list[dict]) -> str:
    """:func:`strain_verdicts` as a markdown table (strain in %)."""
    lines = ["| case | dose e- | exact calibration (floor) % | same on PreNet's data % | none % | classical % | "
             "PreNet % | added by classical % | added by PreNet % | added by PreNet's denoising % | PreNet <= 0.1% | "
             "verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(v):
        return "not measured" if not np.isfinite(v) else f"{100 * v:.3f}"

    for v in verdicts:
        r, a = v["rms"], v["added"]
        lines.append(f"| {v['case']} | {v['dose']:.0e} | {pct(r['exact'])} | {pct(r['exact, PreNet data'])} | "
                     f"{pct(r.get('none', np.nan))} | "
                     f"{pct(r['classical'])} | {pct(r['prenet'])} | {pct(a['classical'])} | {pct(a['prenet'])} | "
                     f"{pct(a['exact, PreNet data'])} | "
                     f"{'yes' if r['prenet'] <= 1e-3 else 'NO'} | {v['verdict']} |")
    return "\n".join(lines) + "\n"


def write_pictures(prefix: str, rows: list[dict], dose: float = 1e4, seed: int = 20_000_999) -> list[str]:
    """PNG figures of the report, written as ``prefix + '_<name>.png'``.

    - ``strain_maps``: strain maps of every route next to the truth for the first
      case at the highest dose in ``rows``;
    - ``origin_maps``, ``ellipse``, ``denoising``: PreNet on a scan of the descan /
      bright-disk case at ``dose``: measured, fitted (py4DSTEM ``fit_origin``) and
      true origins; the calibrated ellipse over the origin-aligned mean of the
      amorphous strip; recorded, denoised and clean patterns.

    Returns
    -------
    list of str
        The files written.
    """
    import matplotlib.pyplot as plt

    from ..baselines import aligned_mean_pattern, fit_origin
    from ..preprocess import preprocess
    from ..simulation import Detector
    from ..simulation.strain import simulate_strain_datacube
    from ..visualize import show_denoising, show_ellipse, show_origin_maps, show_strain_maps

    files = []

    def save(fig, name):
        path = f"{prefix}_{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)

    case = rows[0]["case"]
    top = max(r["dose"] for r in rows if r["case"] == case)
    sel = {r["route"]: r for r in rows if r["case"] == case and r["dose"] == top}
    save(show_strain_maps({k: v["maps"] for k, v in sel.items()}, sel["prenet"]["truth"],
                          title=f"{case}, {top:.0e} e-/pattern"), "strain_maps")

    dc, truth = simulate_strain_datacube((14, 12), dose=dose, ellipse=(1.02, 2.0), grain_rotation_deg=(0.0,),
                                         descan_amplitude=12.0, bright_disks=True,
                                         detector=Detector(hot_fraction=2e-4, hot_level=10.0), seed=seed)
    out = preprocess(dc, progress=False)
    measured = out.metadata["prenet"]["origin_measured"]
    qx, qy = measured[..., 0], measured[..., 1]
    save(show_origin_maps((qx, qy), fit_origin(qx, qy, "parabola"), (truth.origin[..., 0], truth.origin[..., 1]),
                          title=f"PreNet origin, descan 12 px, bright disks, hot pixels, {dose:.0e} e-"), "origin_maps")
    amorphous = truth.grain < 0
    mean, centre = aligned_mean_pattern(dc.data[amorphous][None], qx[amorphous][None], qy[amorphous][None])
    save(show_ellipse(mean, centre, out.calibration.get_ellipse(), truth.ring_radius, truth.ellipse,
                      title="PreNet ellipse over the aligned mean of the amorphous strip"), "ellipse")
    i = [(truth.grain.shape[0] - 1, 0), (0, 0)]
    save(show_denoising(np.stack([dc.data[p] for p in i]), np.stack([out.data[p] for p in i]),
                        title=f"{dose:.0e} e-/pattern: crystal (top), amorphous (bottom)"), "denoising")
    return files
