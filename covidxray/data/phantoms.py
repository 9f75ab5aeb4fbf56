"""Synthetic chest-radiograph phantoms with exact lung masks.

**This is NOT medical data.** A phantom is a cartoon of a posteroanterior (PA) chest radiograph, drawn from
a handful of analytic shapes and random textures. It exists so that every command and every test of
``covidxray`` can run anywhere, without the real database. Nothing learnt from phantoms says anything
about real patients.

Radiograph convention: air and lungs are DARK, bone and soft tissue BRIGHT; the patient's left is the
image's right. The scene is built as a map of "density" (a unitless stand-in for X-ray attenuation) and
turned into 8-bit grey values at the end, which is why overlapping structures add up the way they do on
film. It contains:

* body outline (neck, sloping shoulders, chest wall) with soft tissue brighter than the air around it;
* two lung fields, each with random width, height, position, tilt, apex rounding, diaphragm dome height
  and costophrenic-angle sharpness, plus bronchovascular markings radiating from the hila;
* heart (shifted to the image's right) and mediastinum with aortic knob, trachea, spine with vertebrae;
* posterior ribs (arched bands), faint anterior ribs, clavicles;
* diaphragm domes (lung bases convex upward) with the bright abdomen below, sometimes a gastric bubble;
* film-like noise, blur and per-image brightness/contrast/gamma variation.

Class patterns (added inside the lung fields only):

* ``normal``: clear lungs;
* ``viral_pneumonia``: diffuse bilateral interstitial haze with a reticular (net-like) texture, heavier
  around the hila;
* ``covid``: bilateral ground-glass patches, peripheral (along the lateral lung borders) and mostly in
  the lower zones, plus a faint lower-peripheral haze.

The mask marks the *visible* lung fields (0/255): the lung shapes minus the cardiomediastinal silhouette
(heart and aortic knob), as in JSRT/Montgomery-style lung masks. It is computed from the same implicit
shapes and thresholds that draw the lungs, before any class opacity, so it is exact by construction;
each lung is then kept as one 4-connected region (at tiny sizes a costophrenic tip thinner than a pixel
could otherwise leave a stray pixel), so the mask always has exactly two components, one per side.

Determinism: the output depends only on ``label``, ``size`` and the state of ``rng``. ``rng`` is advanced
by exactly one draw of three seeds (anatomy, pathology, noise), so for the same ``rng`` state the three
classes share the same anatomy and noise and differ only by their pathology, which makes paired
comparisons between classes possible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PHANTOM_CLASSES = ("covid", "normal", "viral_pneumonia")

_MIN_SIZE = 8
# Log-attenuation gain of the density -> grey mapping: bigger values compress bright structures more.
_ATTENUATION = 1.5
# Density that maps to (nearly) full white: the spine behind the heart.
_WHITE_DENSITY = 1.8


@dataclass(frozen=True)
class _Lung:
    """Geometry of one lung field, in normalised image units (image width = height = 1).

    ``side`` is -1 for the lung on the image's left (patient's right) and +1 for the image's right.
    Distances ``medial``/``lateral`` are measured from the midline towards the lung's own side.
    """

    side: int
    top: float  # apex row
    bottom: float  # costophrenic-angle row
    medial: float  # medial border, distance from the midline
    lateral: float  # lateral border, distance from the midline
    apex_pos: float  # where the apex sits between medial (0) and lateral (1) border
    apex_round: float  # exponent of the width profile: smaller = blunter, rounder apex
    dome_height: float  # diaphragm dome height as a fraction of the lung height
    dome_peak: float  # across-lung position (0 medial .. 1 lateral) of the dome's highest point
    cp_sharpness: float  # dome exponent: larger = steeper dome at the edge = sharper costophrenic angle
    tilt: float  # horizontal shear per unit of height (lung axis tilt)
    hilum_x: float  # hilum column (absolute u)
    hilum_y: float  # hilum row (absolute v)


@dataclass(frozen=True)
class _Anatomy:
    """Everything random about one patient and exposure (class independent)."""

    lungs: tuple[_Lung, _Lung]
    body_half: float  # chest half-width
    neck_half: float
    shoulder_row: float
    heart: tuple[float, float, float, float, float]  # centre u, v; half-width left, right; half-height
    knob: tuple[float, float, float, float]  # aortic knob centre u, v, half-width, half-height
    spine_half: float
    vertebra_period: float
    carina_row: float
    rib_first: float
    rib_spacing: float
    rib_arch: tuple[float, float]  # centreline v = v_k - a*d + b*d^2 (d: distance from the midline)
    rib_thickness: float  # fraction of the rib period occupied by bone
    clavicle_row: float
    gastric: tuple[float, float, float] | None  # gastric bubble u, v, radius (None: not visible)
    amps: dict[str, float]  # density amplitudes of the structures
    gain: float
    bias: float
    gamma: float
    blur_sigma: float  # film blur, as a fraction of the image size
    noise_density: float  # quantum mottle (density units, before blur)
    noise_grain: float  # film grain (grey levels, after blur)
    exposure_tilt: tuple[float, float]  # linear exposure gradient along x and y


# ---------------------------------------------------------------------------------------------- helpers


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function; used for anti-aliased edges (argument in pixels)."""
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    """Cubic ramp 0 -> 1 on [0, 1], clamped outside."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _interp_weights(n_out: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Lattice index and smooth weight of the next node for ``n_out`` pixel centres over ``cells`` cells."""
    pos = (np.arange(n_out, dtype=np.float32) + 0.5) / n_out * cells
    i0 = np.minimum(np.floor(pos).astype(np.intp), cells - 1)
    return i0, _smoothstep(pos - i0)


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field with about ``cells`` features across the image, zero mean, unit std.

    Separable interpolation (rows, then columns) by gathering the two neighbouring lattice nodes: no
    matrix product, whose BLAS threads cost more than the arithmetic at these sizes. The feature scale
    is in normalised units, so the texture scales with the anatomy.
    """
    lattice = rng.standard_normal((cells + 1, cells + 1), dtype=np.float32)
    i0, f = _interp_weights(size, cells)
    rows = lattice[i0] * (1.0 - f)[:, None] + lattice[i0 + 1] * f[:, None]  # (size, cells + 1)
    field = rows[:, i0] * (1.0 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
    return (field - field.mean()) / (field.std() + 1e-8)


def _polar_noise(rng: np.random.Generator, angle: np.ndarray, radius: np.ndarray,
                 n_angle: int, radial_cell: float, n_radial: int) -> np.ndarray:
    """Random field on polar coordinates (periodic in angle), smoothly interpolated between lattice nodes.

    Fast variation in angle and slow variation in radius gives zero-crossings that run outward like
    vessels from a hilum.
    """
    lattice = rng.standard_normal((n_angle, n_radial + 1), dtype=np.float32)
    a = (angle / (2 * np.pi) + 0.5) * n_angle
    b = np.clip(radius / radial_cell, 0.0, n_radial - 1e-6)
    a0 = np.floor(a)
    b0 = np.floor(b)
    fa = _smoothstep(a - a0)
    fb = _smoothstep(b - b0)
    i0 = a0.astype(int) % n_angle
    i1 = (i0 + 1) % n_angle
    j0 = b0.astype(int)
    j1 = j0 + 1
    top = lattice[i0, j0] * (1 - fb) + lattice[i0, j1] * fb
    bot = lattice[i1, j0] * (1 - fb) + lattice[i1, j1] * fb
    return top * (1 - fa) + bot * fa


def _run_ids(mask: np.ndarray) -> np.ndarray:
    """Label horizontal runs of True pixels (1, 2, ...; 0 for background)."""
    starts = mask.copy()
    starts[:, 1:] &= ~mask[:, :-1]
    return np.cumsum(starts.ravel()).reshape(mask.shape) * mask


def _connected_to(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` 4-connected to a ``seeds`` pixel (flood fill by alternating row/column runs).

    A whole run is reached as soon as one of its pixels is, so blob-like shapes need only a few passes.
    This is what keeps sub-pixel costophrenic tips from leaving stray one-pixel "lungs" at small sizes.
    """
    runs = (_run_ids(mask), _run_ids(mask.T).T)
    reached = seeds & mask
    while True:
        before = int(reached.sum())
        for ids in runs:
            hit = np.zeros(int(ids.max()) + 1, dtype=bool)
            hit[ids[reached]] = True
            hit[0] = False
            reached = hit[ids]
        if int(reached.sum()) == before:
            return reached


def _gaussian_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding (numpy only; kernel is tiny at phantom sizes)."""
    if sigma_px < 0.3:
        return img
    radius = max(1, int(np.ceil(3.0 * sigma_px)))
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma_px) ** 2)
    kernel = (kernel / kernel.sum()).astype(img.dtype)  # a float64 weight would upcast the image
    h, w = img.shape
    padded = np.pad(img, ((radius, radius), (0, 0)), mode="edge")
    out = sum(k * padded[i:i + h] for i, k in enumerate(kernel))
    padded = np.pad(out, ((0, 0), (radius, radius)), mode="edge")
    return sum(k * padded[:, i:i + w] for i, k in enumerate(kernel))


# ---------------------------------------------------------------------------------------------- anatomy


def _sample_lung(rng: np.random.Generator, side: int) -> _Lung:
    """Draw one lung's shape; the patient's left lung (image right) sits a little lower and is narrower."""
    top = rng.uniform(0.08, 0.14)
    bottom = rng.uniform(0.72, 0.83) + (0.02 if side > 0 else 0.0)
    medial = rng.uniform(0.055, 0.08) + (0.01 if side > 0 else 0.0)
    lateral = rng.uniform(0.34, 0.41)
    height = bottom - top
    hilum_row = top + height * (rng.uniform(0.40, 0.48) - (0.04 if side > 0 else 0.0))
    hilum_dist = medial + rng.uniform(0.05, 0.08)
    return _Lung(
        side=side,
        top=top,
        bottom=bottom,
        medial=medial,
        lateral=lateral,
        apex_pos=rng.uniform(0.25, 0.45),
        apex_round=rng.uniform(0.35, 0.65),
        dome_height=rng.uniform(0.10, 0.20),
        dome_peak=rng.uniform(0.35, 0.55),
        cp_sharpness=rng.uniform(1.6, 3.2),
        tilt=rng.normal(0.0, 0.05),
        hilum_x=0.5 + side * hilum_dist,
        hilum_y=hilum_row,
    )


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw a patient and an exposure. Ranges are picked by eye to look like adult PA films."""
    lungs = (_sample_lung(rng, -1), _sample_lung(rng, +1))
    right = lungs[1]
    max_lateral = max(lung.lateral for lung in lungs)
    body_half = min(0.49, max_lateral + rng.uniform(0.04, 0.08))
    dome_peak_row = right.top + (1.0 - right.dome_height) * (right.bottom - right.top)
    # The heart's widest row sits at about the diaphragm; below it the silhouette runs straight down into
    # the abdomen, so its lower border is hidden by the domes as on a real film.
    heart = (
        0.5 + rng.uniform(0.01, 0.04),
        dome_peak_row + rng.uniform(-0.01, 0.03),
        rng.uniform(0.08, 0.11),  # towards the image's left (right atrium border)
        rng.uniform(0.16, 0.21),  # towards the image's right (left ventricle): the heart lies left
        rng.uniform(0.17, 0.23),
    )
    knob = (
        0.5 + right.medial + rng.uniform(-0.01, 0.005),
        right.top + rng.uniform(0.15, 0.22),
        rng.uniform(0.018, 0.026),
        rng.uniform(0.030, 0.045),
    )
    gastric_r = rng.uniform(0.025, 0.045)
    gastric = (
        (0.5 + rng.uniform(0.15, 0.25), dome_peak_row + gastric_r + rng.uniform(0.02, 0.04), gastric_r)
        if rng.random() < 0.6
        else None
    )
    body = rng.uniform(0.75, 0.90)
    amps = {
        "body": body,
        # Tied to the body: a bigger chest also holds more air. Independent draws made the lungs' base grey
        # level so variable that it drowned the class opacities.
        "lung": body * rng.uniform(0.74, 0.80),
        "heart": rng.uniform(0.22, 0.30),
        "mediastinum": rng.uniform(0.18, 0.24),
        "abdomen": rng.uniform(0.12, 0.20),
        "spine": rng.uniform(0.06, 0.10),
        "trachea": rng.uniform(0.12, 0.18),
        "rib": rng.uniform(0.07, 0.10),
        "anterior_rib": rng.uniform(0.025, 0.04),
        "clavicle": rng.uniform(0.16, 0.22),
        "vessel": rng.uniform(0.08, 0.12),
        "hilum": rng.uniform(0.10, 0.16),
        "gastric": rng.uniform(0.06, 0.12),
    }
    return _Anatomy(
        lungs=lungs,
        body_half=body_half,
        neck_half=rng.uniform(0.10, 0.14),
        shoulder_row=rng.uniform(0.07, 0.12),
        heart=heart,
        knob=knob,
        spine_half=rng.uniform(0.035, 0.045),
        vertebra_period=rng.uniform(0.040, 0.050),
        carina_row=min(lungs[0].hilum_y, right.hilum_y) - rng.uniform(0.0, 0.04),
        rib_first=rng.uniform(0.10, 0.14),
        rib_spacing=rng.uniform(0.060, 0.072),
        rib_arch=(rng.uniform(0.60, 0.80), rng.uniform(2.0, 2.6)),
        rib_thickness=rng.uniform(0.40, 0.52),
        clavicle_row=rng.uniform(0.15, 0.20),
        gastric=gastric,
        amps=amps,
        gain=rng.uniform(0.93, 1.07),
        bias=rng.uniform(-8.0, 8.0),
        gamma=rng.uniform(0.92, 1.08),
        blur_sigma=rng.uniform(0.003, 0.006),
        noise_density=rng.uniform(0.015, 0.035),
        noise_grain=rng.uniform(1.0, 2.5),
        exposure_tilt=(rng.normal(0.0, 0.04), rng.normal(0.0, 0.04)),
    )


@dataclass(frozen=True)
class _LungField:
    """Rasterised lung: soft membership, signed margin (px, >0 inside) and the dome margin (abdomen)."""

    soft: np.ndarray
    margin: np.ndarray
    below_dome: np.ndarray  # signed distance (px) below this side's diaphragm, >0 under the dome


def _lung_field(lung: _Lung, u: np.ndarray, v: np.ndarray, size: int) -> _LungField:
    """Rasterise one lung from its implicit description.

    The lung is the set of points between a medial and a lateral border (functions of the normalised row
    ``t``: 0 at the apex, 1 at the costophrenic angle) and above the diaphragm dome (a function of the
    across-lung position ``z``). Each constraint gives a margin in pixels; the lung is where all margins
    are positive, which makes the mask exact and the image edge anti-aliased from the same numbers.
    """
    height = lung.bottom - lung.top
    t = (v - lung.top) / height  # (H,)
    tc = np.clip(t, 0.0, 1.0)
    # sin^r profiles: width grows like t^r near the apex (r=0.5 is a circular dome) and levels off below.
    lat_profile = np.sin(0.5 * np.pi * np.minimum(tc / 0.85, 1.0)) ** lung.apex_round
    med_profile = np.sin(0.5 * np.pi * np.minimum(tc / 0.30, 1.0)) ** lung.apex_round
    apex = lung.medial + lung.apex_pos * (lung.lateral - lung.medial)
    d_lat = apex + (lung.lateral - apex) * lat_profile
    d_med = apex - (apex - lung.medial) * med_profile

    # Distance from the midline towards this lung's side, sheared to tilt the lung's axis.
    d = lung.side * (u[None, :] - 0.5) - lung.tilt * (v[:, None] - 0.5 * (lung.top + lung.bottom))
    # Clamped so that the dome flattens towards the midline instead of plunging into a V, and runs out
    # flat to the chest wall beyond the costophrenic angle (the abdomen fills the full width below it).
    z = np.clip((d - lung.medial) / (lung.lateral - lung.medial), 0.0, 1.0)
    zc = np.abs(z - lung.dome_peak) / (1.0 - lung.dome_peak)
    t_bottom = 1.0 - lung.dome_height * (1.0 - zc**lung.cp_sharpness)

    m_lat = (d_lat[:, None] - d) * size
    m_med = (d - d_med[:, None]) * size
    below = (t[:, None] - t_bottom) * height * size
    m_top = (t * height * size)[:, None]
    margin = np.minimum(np.minimum(m_lat, m_med), np.minimum(-below, m_top))
    return _LungField(soft=_sigmoid(margin / 0.6), margin=margin, below_dome=below)


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, a: float, b: float,
             size: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft membership and normalised squared radius of an axis-aligned ellipse."""
    x = ((u - cu) / a)[None, :]
    y = ((v - cv) / b)[:, None]
    r2 = x * x + y * y
    margin = (1.0 - np.sqrt(r2)) * min(a, b) * size
    return _sigmoid(margin / 0.6), r2


def _heart(an: _Anatomy, u: np.ndarray, v: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft membership and density profile of the heart.

    Upper half: a lopsided ellipse (narrow towards the image's left, wide towards the right). Below its
    widest row it continues as a vertical column, hidden by the abdomen: the heart rests on the
    diaphragm and no lung can appear underneath it (which also keeps each lung field in one piece).
    """
    cu, cv, a_left, a_right, b = an.heart
    a = np.where(u < cu, np.float32(a_left), np.float32(a_right))
    x = ((u - cu) / a)[None, :]
    y = (np.minimum(v - cv, 0.0) / b)[:, None]
    r2 = x * x + y * y
    margin = (1.0 - np.sqrt(r2)) * min(a_left, b) * size
    soft = _sigmoid(margin / 0.6)
    profile = soft * (0.75 + 0.25 * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0)))
    return soft, profile


def _band(dist: np.ndarray, half_width: float, size: int) -> np.ndarray:
    """Anti-aliased band of ``half_width`` around dist == 0 (normalised units)."""
    return _sigmoid((half_width - np.abs(dist)) * size / 0.6)


def _knob(an: _Anatomy, u: np.ndarray, v: np.ndarray, size: int) -> np.ndarray:
    """Aortic knob: a half-ellipse bulging from the mediastinum into the image-right lung.

    Between its centre and the midline it is a horizontal band, so that no sliver of lung is left
    between the knob and the mediastinum.
    """
    cu, cv, a, b = an.knob
    x = (np.maximum(np.maximum(u - cu, 0.5 - u), 0.0) / a)[None, :]
    y = ((v - cv) / b)[:, None]
    margin = (1.0 - np.sqrt(x * x + y * y)) * a * size
    return _sigmoid(margin / 0.6)


def _lung_mask(fields: list[_LungField], silhouette: np.ndarray) -> np.ndarray:
    """Exact mask of the visible lung fields, uint8 0/255.

    A pixel is lung where its lung margin is positive and the cardiomediastinal silhouette is below the
    0.5 level, i.e. the same implicit shapes (and threshold) that draw the image. Each lung is then
    reduced to the 4-connected region holding its deepest point, so each lung field is one piece at
    every size.
    """
    visible = silhouette < 0.5
    mask = np.zeros(silhouette.shape, dtype=bool)
    for field in fields:
        inside = (field.margin > 0) & visible
        seed = np.zeros_like(inside)
        seed.flat[int(np.argmax(np.where(inside, field.margin, -np.inf)))] = True
        mask |= _connected_to(inside, seed)
    return mask.astype(np.uint8) * 255


def _body_shape(an: _Anatomy, u: np.ndarray, v: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft body membership and relative tissue thickness (1 in the midline, 0 at the skin)."""
    # The chest widens slightly towards the lower ribs.
    chest = an.body_half - 0.03 * (1.0 - np.sin(np.pi * np.clip(v, 0.0, 1.0)))
    half = an.neck_half + (chest - an.neck_half) * _smoothstep(v / an.shoulder_row)
    d = np.abs(u[None, :] - 0.5)
    inside = _sigmoid((half[:, None] - d) * size / 0.8)
    thickness = np.sqrt(np.clip(1.0 - (d / half[:, None]) ** 2, 0.0, 1.0))
    return inside, thickness


def _bone_density(an: _Anatomy, u: np.ndarray, v: np.ndarray, size: int, body: np.ndarray) -> np.ndarray:
    """Spine, posterior and anterior ribs, clavicles (``body``: soft body membership)."""
    d = np.abs(u - 0.5)  # (W,)
    # Spine: a vertical band whose vertebral bodies are separated by darker disc spaces.
    disc = 0.5 + 0.5 * np.cos(2 * np.pi * v / an.vertebra_period)
    spine = np.outer(1.0 - 0.3 * disc**8, _band(d, an.spine_half, size))
    dens = an.amps["spine"] * spine

    # Posterior ribs: arches that rise from the spine and fall laterally; the rib index is a periodic
    # function of the row after removing the arch, so all ribs are drawn at once.
    a, b = an.rib_arch
    vp = v[:, None] - (-a * d + b * d * d)[None, :]
    s = (vp - an.rib_first) / an.rib_spacing
    s = s * (1.0 - 0.08 * np.clip(s, 0, None) / 10.0)  # lower ribs are spaced a little wider
    frac = s - np.floor(s)
    half = 0.5 * an.rib_thickness
    spacing_px = an.rib_spacing * size
    rib = _sigmoid((half - np.abs(frac - half)) * spacing_px / 0.6)
    rib *= _sigmoid(s * spacing_px / 0.6) * _sigmoid((9.0 - s) * spacing_px / 0.6)
    lateral_fade = _smoothstep((d - an.spine_half) / 0.05)
    dens += an.amps["rib"] * rib * lateral_fade[None, :]

    # Anterior ribs: fainter, running down and inwards from the lateral wall, invisible medially
    # (costal cartilage).
    s2 = (v[:, None] + 0.55 * d[None, :] - an.rib_first - 0.12) / (1.25 * an.rib_spacing)
    frac2 = s2 - np.floor(s2)
    ant = _sigmoid((0.2 - np.abs(frac2 - 0.2)) * 1.25 * spacing_px / 0.6)
    ant *= _sigmoid(s2 * spacing_px / 0.6) * _sigmoid((6.0 - s2) * spacing_px / 0.6)
    dens += an.amps["anterior_rib"] * ant * (_smoothstep((d - 0.12) / 0.08) * lateral_fade)[None, :]

    # Clavicles: gently S-shaped bars from the sternal notch up towards the shoulders.
    dc = d - 0.035
    centre = an.clavicle_row - 0.12 * dc + 0.015 * np.sin(2 * np.pi * dc / 0.34)
    extent = _sigmoid(dc * size / 0.8) * _sigmoid((min(0.36, an.body_half - 0.07) - dc) * size / 1.5)
    clav = _band(v[:, None] - centre[None, :], 0.021, size) * extent[None, :]
    dens += an.amps["clavicle"] * clav
    # Bones live inside the body (the shoulders' slope hides the rib and clavicle ends).
    return dens * body


def _mediastinum_density(an: _Anatomy, u: np.ndarray, v: np.ndarray, size: int,
                         heart: np.ndarray, knob: np.ndarray, abdomen: np.ndarray) -> np.ndarray:
    """Mediastinum, heart, aortic knob and the dark trachea."""
    d = np.abs(u - 0.5)
    dens = an.amps["mediastinum"] * np.outer(_smoothstep((an.heart[1] - v) / 0.2) + 0.3,
                                             _smoothstep((0.10 - d) / 0.05))
    # The heart sits on the diaphragm: don't let its lower half add a second outline inside the abdomen.
    dens += an.amps["heart"] * (heart * (1.0 - 0.8 * abdomen) + 0.35 * knob)
    trachea = np.outer(_sigmoid((an.carina_row - v) * size / 2.0), _band(u - 0.5 - 0.005, 0.017, size))
    dens -= an.amps["trachea"] * trachea
    return dens


def _hilum_offsets(an: _Anatomy, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (du, dv) of every pixel from the hilum of its own side of the chest."""
    left, right = an.lungs
    on_left = (u < 0.5)[None, :]
    f32 = np.float32  # keep the float32 pipeline: Python floats in np.where would give float64
    du = u[None, :] - np.where(on_left, f32(left.hilum_x), f32(right.hilum_x))
    dv = v[:, None] - np.where(on_left, f32(left.hilum_y), f32(right.hilum_y))
    return du, dv


def _vessel_density(an: _Anatomy, rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Hilar shadows and bronchovascular markings that thin out towards the periphery."""
    du, dv = _hilum_offsets(an, u, v)
    r = np.sqrt(du * du + dv * dv)
    angle = np.arctan2(dv, du)
    field = _polar_noise(rng, angle, r, n_angle=28, radial_cell=0.09, n_radial=6)
    decay = np.exp(-r / 0.13)
    width = 0.12 + 0.35 * decay
    vessels = np.exp(-((field / width) ** 2)) * decay * _smoothstep(r / 0.03)
    hilum = np.exp(-((r / 0.045) ** 2))
    return an.amps["vessel"] * vessels + an.amps["hilum"] * hilum


# ---------------------------------------------------------------------------------------------- pathology


def _lung_coords(lung: _Lung, t: float, z: float) -> tuple[float, float]:
    """Image position (u, v) of row ``t`` and across-lung position ``z`` (0 medial, 1 lateral)."""
    apex = lung.medial + lung.apex_pos * (lung.lateral - lung.medial)
    lat = apex + (lung.lateral - apex) * np.sin(0.5 * np.pi * min(t / 0.85, 1.0)) ** lung.apex_round
    med = apex - (apex - lung.medial) * np.sin(0.5 * np.pi * min(t / 0.30, 1.0)) ** lung.apex_round
    v = lung.top + t * (lung.bottom - lung.top)
    d = med + z * (lat - med) + lung.tilt * (v - 0.5 * (lung.top + lung.bottom))
    return 0.5 + lung.side * d, v


def _covid_density(an: _Anatomy, rng: np.random.Generator, u: np.ndarray, v: np.ndarray,
                   size: int) -> np.ndarray:
    """Bilateral, peripheral, lower-zone ground-glass patches (soft, mottled blobs)."""
    dens = np.zeros((v.size, u.size), dtype=np.float32)
    for lung in an.lungs:  # at least three patches per lung: the pattern is bilateral
        for _ in range(int(rng.integers(3, 6))):
            t = rng.uniform(0.50, 0.92) if rng.random() < 0.8 else rng.uniform(0.2, 0.92)
            cu, cv = _lung_coords(lung, t, rng.uniform(0.70, 0.98))
            su = rng.uniform(0.04, 0.08)
            sv = su * rng.uniform(1.0, 1.8)  # elongated along the pleura
            amp = rng.uniform(0.18, 0.30)
            # A 2-D Gaussian is the outer product of two 1-D ones: cheap at any size.
            dens += amp * np.outer(np.exp(-(((v - cv) / sv) ** 2)), np.exp(-(((u - cu) / su) ** 2)))
    # Faint haze in the lower, lateral part of both lungs, under the patches.
    lower = _smoothstep((v - 0.40) / 0.30)
    lateral = _smoothstep((np.abs(u - 0.5) - 0.15) / 0.20)
    dens += rng.uniform(0.03, 0.06) * np.outer(lower, lateral)
    mottle = 0.65 + 0.35 * np.tanh(_value_noise(rng, size, 12))
    return dens * mottle


def _viral_density(an: _Anatomy, rng: np.random.Generator, u: np.ndarray, v: np.ndarray,
                   size: int) -> np.ndarray:
    """Diffuse bilateral interstitial haze with a reticular texture, heavier around the hila."""
    du, dv = _hilum_offsets(an, u, v)
    perihilar = np.exp(-(du * du + dv * dv) / 0.2**2)
    patchy = 1.0 + 0.25 * _value_noise(rng, size, 5)
    reticular = np.exp(-((_value_noise(rng, size, 22) / 0.35) ** 2))
    haze = rng.uniform(0.09, 0.14) * (0.6 + 0.4 * perihilar) * patchy
    net = rng.uniform(0.06, 0.10) * reticular * (0.6 + 0.4 * perihilar)
    return haze + net


# ---------------------------------------------------------------------------------------------- public


def render_phantom(label: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic PA chest-radiograph phantom (NOT medical data) and its lung mask.

    Args:
        label: one of ``PHANTOM_CLASSES``.
        size: side of the square output in pixels (16..512 in practice; at least 8). The anatomy is drawn
            in normalised units, so every size shows the same scene at a different resolution.
        rng: source of randomness; advanced by exactly one draw. Same state -> identical output.

    Returns:
        ``(image, mask)``: ``image`` uint8 HxW (dark lungs, bright bone and soft tissue); ``mask`` uint8
        HxW with values exactly 0 and 255 marking the two visible lung fields (heart and aortic knob
        excluded), taken before any class opacity is added.

    Raises:
        ValueError: unknown ``label`` or too small ``size``.
    """
    if label not in PHANTOM_CLASSES:
        raise ValueError(f"unknown phantom class {label!r}; expected one of {', '.join(PHANTOM_CLASSES)}")
    if int(size) != size or size < _MIN_SIZE:
        raise ValueError(f"phantom size must be an integer >= {_MIN_SIZE}, got {size!r}")
    size = int(size)
    # Independent streams: the anatomy and noise do not depend on the label, so for one rng state the
    # classes differ only by their pathology.
    seeds = rng.integers(0, 2**63 - 1, size=3)
    anatomy_rng, pathology_rng, noise_rng = (np.random.default_rng(int(s)) for s in seeds)

    an = _sample_anatomy(anatomy_rng)
    # float32 throughout: transcendental functions are 2-3x faster than in float64.
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = coords, coords  # u: column (left -> right), v: row (top -> bottom)

    fields = [_lung_field(lung, u, v, size) for lung in an.lungs]
    on_left = (u < 0.5)[None, :]
    lung_soft = np.maximum(fields[0].soft, fields[1].soft)
    lung_margin = np.maximum(fields[0].margin, fields[1].margin)
    below_dome = np.where(on_left, fields[0].below_dome, fields[1].below_dome)
    body, thickness = _body_shape(an, u, v, size)
    abdomen = _sigmoid(below_dome / 0.6) * body

    heart, heart_profile = _heart(an, u, v, size)
    knob = _knob(an, u, v, size)
    silhouette = np.maximum(heart, knob)

    mask = _lung_mask(fields, silhouette)

    # Soft tissue of neck, shoulders and chest, thicker (brighter) in the middle like a cylinder.
    density = an.amps["body"] * body * (0.45 + 0.55 * thickness)
    density += an.amps["abdomen"] * abdomen * (1.0 - lung_soft)
    # Lungs are thicker (more air, darker) away from their borders; the heart displaces most of the lung
    # behind it, so little air is subtracted there and the heart stays bright.
    visible = lung_soft * (1.0 - silhouette)
    depth = 0.55 + 0.45 * (1.0 - np.exp(-np.clip(lung_margin, 0.0, None) / (0.05 * size)))
    density -= an.amps["lung"] * lung_soft * (1.0 - 0.8 * silhouette) * depth
    density += _mediastinum_density(an, u, v, size, heart_profile, knob, abdomen)
    density += _bone_density(an, u, v, size, body)
    density += visible * _vessel_density(an, anatomy_rng, u, v)
    if an.gastric is not None:
        bubble, _ = _ellipse(u, v, an.gastric[0], an.gastric[1], 1.3 * an.gastric[2], an.gastric[2], size)
        density -= an.amps["gastric"] * bubble * abdomen

    if label == "covid":
        density += visible * _covid_density(an, pathology_rng, u, v, size)
    elif label == "viral_pneumonia":
        density += visible * _viral_density(an, pathology_rng, u, v, size)

    return _expose(an, noise_rng, density, u, v, size), mask


def _expose(an: _Anatomy, rng: np.random.Generator, density: np.ndarray, u: np.ndarray, v: np.ndarray,
            size: int) -> np.ndarray:
    """Film response: mottle, blur, log-attenuation to grey, contrast/brightness/gamma, grain."""
    density = density + an.noise_density * rng.standard_normal(density.shape, dtype=np.float32)
    density = _gaussian_blur(density, an.blur_sigma * size)
    signal = 1.0 - np.exp(-_ATTENUATION * np.clip(density, 0.0, None))
    signal /= 1.0 - np.exp(-_ATTENUATION * _WHITE_DENSITY)
    exposure = 1.0 + an.exposure_tilt[0] * (u[None, :] - 0.5) + an.exposure_tilt[1] * (v[:, None] - 0.5)
    grey = 12.0 + an.bias + an.gain * 238.0 * np.clip(signal, 0.0, None) ** an.gamma * exposure
    grey += an.noise_grain * rng.standard_normal(grey.shape, dtype=np.float32)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)
