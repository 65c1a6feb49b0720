"""Weight-free encoders: ``histo-texture`` (the offline default) and ``pixels:<size>``.

``histo-texture`` describes a microscopy image by its staining and texture, with numpy/scipy
only, deterministically, and without any learned weights, so every hospital can compute it
offline and get identical features for identical images.

The image is first resized (PIL bilinear, antialiased) so that its short side is at most
``MAX_SIDE`` = 512 pixels: features of a 2048 x 2048 tile describe it at the scale of a
512 x 512 one (smaller images are used as they are, never upsampled). Descriptor blocks, in
output order (``HistoTextureEncoder.feature_names()`` names every column):

=====================  ====  =============================================================
block                  dims  what
=====================  ====  =============================================================
rgb                     21   per R, G, B in [0, 1]: mean, std, 5/25/50/75/95th percentiles
stain                   21   per haematoxylin, eosin, residual concentration (colour
                             deconvolution with the Ruifrok & Johnston 2001 H&E vectors,
                             residual = H x E): mean, std, 5/25/50/75/95th percentiles
optical_density          3   tissue fraction (OD sum > 0.3), mean and std of the
                             channel-mean OD
grey_hist               16   grey-level histogram, 16 bins over [0, 1]
stain_hist              24   8-bin histograms of H, E, residual over [0, 2.4]
glcm                    36   grey-level co-occurrence (16 levels, symmetric), distances
                             1, 2, 4, averaged over 0/45/90/135 degrees (rotation
                             invariance): contrast, dissimilarity, homogeneity, energy,
                             correlation, entropy, each from grey and from haematoxylin
lbp                     20   rotation-invariant uniform LBP (8 neighbours, radius 1 and 2,
                             bilinear sampling): 10-bin histograms
gabor                   24   Gabor magnitude, wavelengths 4, 8, 16 px x 4 orientations:
                             mean and std, orientations ranked by mean energy
nuclei                   6   haematoxylin masks at H > 0.8 and H > 1.2: area fraction,
                             blobs (>= 5 px) per 100 px, mean log blob area / 5
=====================  ====  =============================================================

Total ``HISTO_TEXTURE_DIM`` = 171. Every column lies in [-1, 5.5] and, on tissue, mostly in
[0, 3] (fractions, normalised GLCM statistics, stain concentrations), so distances between
descriptors are meaningful without a learned normaliser; standardising with training-set
statistics is still advisable before a linear model.

Any input gives finite values, including constant images (correlation of a constant image is
defined as 1, as in scikit-image) and 28 x 28 grayscale images (Fashion-MNIST bags).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache, lru_cache

import numpy as np
import scipy.fft
import torch
from PIL import Image
from scipy import ndimage

from micromil_core.encoders.base import Encoder, _empty_output
from micromil_core.encoders.images import to_rgb_uint8

__all__ = ["HISTO_TEXTURE_DIM", "HistoTextureEncoder", "PixelsEncoder", "histo_texture"]

MAX_SIDE = 512
PERCENTILES = (0.05, 0.25, 0.50, 0.75, 0.95)

# Ruifrok & Johnston, "Quantification of histochemical staining by color deconvolution",
# Anal Quant Cytol Histol 23:291-299 (2001): optical-density vectors of H and E.
_HAEMATOXYLIN = np.array([0.650, 0.704, 0.286])
_EOSIN = np.array([0.072, 0.990, 0.105])

# Ranges of stain concentrations: fixed (not per image) so histograms of different images
# are comparable. Chosen from H&E and IHC test images, whose 1-99 % concentration
# range lies within [-0.2, 2.6].
_CONC_LO, _CONC_HI, _CONC_BINS = -0.5, 3.5, 256
_STAIN_HIST_HI = 2.4
# The value each histogram bin stands for: 8-bit levels, and fine concentration bin centres.
_UNIT_VALUES = np.arange(256, dtype=np.float64) / 255.0
_CONC_VALUES = _CONC_LO + (np.arange(_CONC_BINS) + 0.5) * (_CONC_HI - _CONC_LO) / _CONC_BINS
_TISSUE_OD = 0.3  # OD sum below this is glass/background (about RGB 230, 230, 230)
_NUCLEI_THRESHOLDS = (0.8, 1.2)
_MIN_BLOB_PX = 5

GLCM_LEVELS = 16
GLCM_DISTANCES = (1, 2, 4)
LBP_RADII = (1, 2)
GABOR_WAVELENGTHS = (4, 8, 16)
GABOR_ORIENTATIONS = 4

_GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "entropy")


def _stain_matrix() -> np.ndarray:
    """Rows: unit OD vectors of H, E and the residual (orthogonal to both)."""
    h = _HAEMATOXYLIN / np.linalg.norm(_HAEMATOXYLIN)
    e = _EOSIN / np.linalg.norm(_EOSIN)
    r = np.cross(h, e)
    return np.stack([h, e, r / np.linalg.norm(r)])


# od (N, 3) = conc (N, 3) @ stains (3, 3)  =>  conc = od @ inv(stains)
_UNMIX = np.linalg.inv(_stain_matrix()).astype(np.float32)
# OD of each 8-bit intensity; +1 keeps black finite (Beer-Lambert with I0 = 256).
_OD_LUT = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)
# ITU-R BT.601 luma, the grey image used for texture.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _resize_short_side(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink so the short side is <= max_side; never upsample.  (H, W, 3) -> (h, w, 3)"""
    h, w = rgb.shape[:2]
    short = min(h, w)
    if short <= max_side:
        return rgb
    scale = max_side / short
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def _hist_stats(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean, std and PERCENTILES of a channel from its histogram.

    Histograms instead of sorting because sorting 262k values per channel would dominate
    the run time; for 8-bit channels (one bin per value) the statistics are exact, for
    stain concentrations they are within half a bin (1/128).

    Shapes:
        counts, values (the value each bin stands for): (B,) -> (7,)
    """
    total = max(float(counts.sum()), 1.0)
    mean = float(counts @ values) / total
    var = max(float(counts @ (values - mean) ** 2) / total, 0.0)
    cdf = np.cumsum(counts, dtype=np.float64) / total
    idx = np.minimum(np.searchsorted(cdf, PERCENTILES, side="left"), counts.size - 1)
    return np.concatenate([[mean, np.sqrt(var)], values[idx]])


def _rebin(counts: np.ndarray, values: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray:
    """Sum a fine histogram into n bins over [lo, hi] (outside values join the end bins)."""
    return np.bincount(_quantise(values, lo, hi, n), weights=counts, minlength=n)


def _glcm_features(levels: np.ndarray) -> np.ndarray:
    """Rotation-averaged GLCM statistics at GLCM_DISTANCES.

    Shapes:
        levels: (H, W) ints in [0, GLCM_LEVELS) -> (len(GLCM_DISTANCES) * 6,)
    """
    n = GLCM_LEVELS
    h, w = levels.shape
    # uint8 halves memory traffic and cannot overflow: a * 16 + b <= 255.
    flat = levels.astype(np.uint8)
    mats = []
    for d in GLCM_DISTANCES:
        for dy, dx in ((0, d), (-d, d), (-d, 0), (-d, -d)):  # 0, 45, 90, 135 degrees
            y0, y1 = max(0, -dy), h - max(0, dy)
            x0, x1 = max(0, -dx), w - max(0, dx)
            if y1 <= y0 or x1 <= x0:  # image smaller than the offset
                mats.append(np.zeros((n, n)))
                continue
            a = flat[y0:y1, x0:x1]
            b = flat[y0 + dy:y1 + dy, x0 + dx:x1 + dx]
            pair = a * np.uint8(n) + b
            counts = np.bincount(pair.ravel(), minlength=n * n).reshape(n, n)
            mats.append(counts + counts.T)  # symmetric: direction sign does not matter
    p = np.stack(mats).astype(np.float64)  # (K, n, n)
    total = p.sum(axis=(1, 2), keepdims=True)
    p = np.divide(p, total, out=np.zeros_like(p), where=total > 0)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    diff = (i - j).astype(np.float64)
    contrast = (p * diff**2).sum(axis=(1, 2)) / (n - 1) ** 2
    dissimilarity = (p * np.abs(diff)).sum(axis=(1, 2)) / (n - 1)
    homogeneity = (p / (1.0 + diff**2)).sum(axis=(1, 2))
    energy = np.sqrt((p**2).sum(axis=(1, 2)))
    mu_i = (p * i).sum(axis=(1, 2))
    mu_j = (p * j).sum(axis=(1, 2))
    sd_i = np.sqrt((p * (i - mu_i[:, None, None]) ** 2).sum(axis=(1, 2)))
    sd_j = np.sqrt((p * (j - mu_j[:, None, None]) ** 2).sum(axis=(1, 2)))
    cov = (p * (i - mu_i[:, None, None]) * (j - mu_j[:, None, None])).sum(axis=(1, 2))
    denom = sd_i * sd_j
    # A constant image has no spread: define its correlation as 1 (scikit-image does too).
    correlation = np.where(denom > 1e-12, cov / np.maximum(denom, 1e-12), 1.0)
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    entropy = -(p * logp).sum(axis=(1, 2)) / np.log(n * n)
    props = np.stack([contrast, dissimilarity, homogeneity, energy, correlation, entropy], 1)
    # (K, 6) -> mean over the 4 angles of each distance -> (len(D), 6)
    return props.reshape(len(GLCM_DISTANCES), 4, 6).mean(axis=1).ravel()


def _quantise(x: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray:
    """Map values in [lo, hi] to integer levels 0..n-1 (clipping outside)."""
    q = np.floor((x - lo) * (n / (hi - lo)))
    return np.clip(q, 0, n - 1).astype(np.intp)


@cache
def _lbp_table() -> np.ndarray:
    """Rotation-invariant uniform ("riu2") label of every 8-bit neighbour pattern.

    Uniform patterns (at most two 0/1 transitions around the circle) get their number of
    ones (0..8); the rest share label 9 (Ojala et al., TPAMI 24:971, 2002).
    """
    table = np.empty(256, dtype=np.intp)
    for code in range(256):
        bits = [(code >> k) & 1 for k in range(8)]
        transitions = sum(bits[k] != bits[(k + 1) % 8] for k in range(8))
        table[code] = sum(bits) if transitions <= 2 else 9
    return table


def _lbp_histogram(grey: np.ndarray, radius: int) -> np.ndarray:
    """10-bin riu2 LBP histogram with 8 bilinearly sampled neighbours at ``radius``.

    Shapes:
        grey: (H, W) float32 in [0, 1] -> (10,)
    """
    h, w = grey.shape
    pad = radius + 1
    padded = np.pad(grey, pad, mode="edge")
    # The tolerance keeps interpolation round-off in flat regions from flipping bits;
    # real grey steps are 1/255, far above it.
    threshold = grey - np.float32(1e-5)
    code = np.zeros((h, w), dtype=np.uint8)
    bit = np.empty((h, w), dtype=bool)
    top = np.empty((h, w), dtype=np.float32)
    bottom = np.empty((h, w), dtype=np.float32)

    def shifted(oy: int, ox: int) -> np.ndarray:
        return padded[pad + oy:pad + oy + h, pad + ox:pad + ox + w]

    for k in range(8):
        angle = 2.0 * np.pi * k / 8
        dy, dx = -radius * np.sin(angle), radius * np.cos(angle)
        y0, x0 = int(np.floor(dy)), int(np.floor(dx))
        fy = np.float32(0.0 if abs(dy - y0) < 1e-9 else dy - y0)
        fx = np.float32(0.0 if abs(dx - x0) < 1e-9 else dx - x0)
        if fx == 0 and fy == 0:  # axis-aligned neighbour: an exact pixel
            np.greater_equal(shifted(y0, x0), threshold, out=bit)
        else:
            # Bilinear sample, in place: lerp along x on two rows, then along y.
            a, b = shifted(y0, x0), shifted(y0, x0 + 1)
            c, d = shifted(y0 + 1, x0), shifted(y0 + 1, x0 + 1)
            np.subtract(b, a, out=top)
            top *= fx
            top += a
            np.subtract(d, c, out=bottom)
            bottom *= fx
            bottom += c
            bottom -= top
            bottom *= fy
            bottom += top
            np.greater_equal(bottom, threshold, out=bit)
        code |= bit.view(np.uint8) << np.uint8(k)
    counts = np.bincount(code.ravel(), minlength=256).astype(np.float64)
    # Histogram of the 256 raw patterns, then summed per riu2 label: no per-pixel lookup.
    return np.bincount(_lbp_table(), weights=counts, minlength=10) / counts.sum()


@cache
def _gabor_kernels(wavelength: float) -> np.ndarray:
    """Complex Gabor kernels (even + i * odd) at GABOR_ORIENTATIONS angles, one octave.

    Shapes:
        returns (GABOR_ORIENTATIONS, k, k) complex128
    """
    sigma = 0.56 * wavelength  # one-octave half-response bandwidth
    half = int(np.ceil(2.5 * sigma))
    y, x = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    envelope = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    kernels = []
    for k in range(GABOR_ORIENTATIONS):
        theta = np.pi * k / GABOR_ORIENTATIONS
        u = x * np.cos(theta) + y * np.sin(theta)
        even = envelope * np.cos(2 * np.pi * u / wavelength)
        odd = envelope * np.sin(2 * np.pi * u / wavelength)
        even -= envelope * (even.sum() / envelope.sum())  # zero DC: flat regions give 0
        kernels.append((even + 1j * odd) / np.abs(even).sum())
    return np.stack(kernels)


@lru_cache(maxsize=32)
def _gabor_spectra(wavelength: float, shape: tuple[int, int]) -> np.ndarray:
    """FFTs of ``_gabor_kernels`` zero-padded to ``shape``; cached because tiles of one
    dataset share a size.  Shapes: -> (GABOR_ORIENTATIONS, *shape) complex64"""
    kernels = _gabor_kernels(wavelength)
    return scipy.fft.fft2(kernels, s=shape, axes=(-2, -1)).astype(np.complex64)


def _gabor_features(grey: np.ndarray) -> np.ndarray:
    """Mean and std of Gabor magnitude per wavelength and orientation (FFT convolution).

    Shapes:
        grey: (H, W) float32 -> (2 * len(GABOR_WAVELENGTHS) * GABOR_ORIENTATIONS,)
    """
    h, w = grey.shape
    means, stds = [], []
    for wavelength in GABOR_WAVELENGTHS:
        # Longer wavelengths run on a 2x/4x mean-pooled image with a proportionally
        # shorter kernel: the same filter at a quarter or a sixteenth of the cost.
        factor = max(1, min(wavelength // 4, h // 8, w // 8))
        img = grey
        if factor > 1:
            hh, ww = (h // factor) * factor, (w // factor) * factor
            img = grey[:hh, :ww].reshape(hh // factor, factor, ww // factor, factor).mean((1, 3))
        half = _gabor_kernels(wavelength / factor).shape[-1] // 2
        padded = np.pad(img.astype(np.float32), half, mode="symmetric")
        # Linear (not circular) convolution needs room for the kernel; fast FFT sizes.
        shape = tuple(scipy.fft.next_fast_len(n + 2 * half) for n in padded.shape)
        spectrum = scipy.fft.fft2(padded, s=shape)
        full = scipy.fft.ifft2(spectrum[None] * _gabor_spectra(wavelength / factor, shape),
                               axes=(-2, -1))
        # Output index n holds the kernel centred on padded index n - half.
        mag = np.abs(full[:, 2 * half:2 * half + img.shape[0], 2 * half:2 * half + img.shape[1]])
        mean, std = mag.mean(axis=(1, 2)), mag.std(axis=(1, 2))
        # Tissue has no canonical orientation: rank orientations by energy (strongest
        # first) so rotating or flipping a tile by 90 degrees leaves the features unchanged
        # while anisotropy (strongest vs weakest) is kept.
        order = np.argsort(-mean, kind="stable")
        means.append(mean[order])
        stds.append(std[order])
    return np.concatenate([np.concatenate(means), np.concatenate(stds)])


def _nuclei_features(haem: np.ndarray) -> np.ndarray:
    """Area fraction, blob density and mean log blob size of haematoxylin masks.

    A crude, threshold-based stand-in for nucleus counting: enough to tell densely
    cellular tissue from stroma or glass.

    Shapes:
        haem: (H, W) haematoxylin concentration -> (3 * len(_NUCLEI_THRESHOLDS),)
    """
    out = []
    for threshold in _NUCLEI_THRESHOLDS:
        mask = haem > threshold
        labels, n_labels = ndimage.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=n_labels + 1)[1:]
        # Specks below _MIN_BLOB_PX are stain noise or JPEG artefacts, not nuclei.
        sizes = sizes[sizes >= _MIN_BLOB_PX]
        mean_log_size = float(np.log(sizes).mean()) if sizes.size else 0.0
        # Scaled to about [0, 1]: nuclei of ~10 px diameter pack at most ~10 per 1000 px,
        # and log areas of nuclei at <= 512 px tiles are mostly below 5 (150 px).
        out += [mask.mean(), 100.0 * sizes.size / haem.size, mean_log_size / 5.0]
    return np.asarray(out)


def histo_texture(image: np.ndarray) -> np.ndarray:
    """The ``histo-texture`` descriptor of one image (see the module docstring).

    Shapes:
        image: (H, W, 3) uint8 (or any layout ``to_rgb_uint8`` accepts) -> (171,) float32
    """
    rgb = _resize_short_side(to_rgb_uint8(image), MAX_SIDE)
    h, w = rgb.shape[:2]
    planes = np.ascontiguousarray(rgb.reshape(-1, 3).T)  # (3, N) uint8, one row per channel
    n_px = planes.shape[1]

    # Colour in RGB: 8-bit values, so 256-bin histograms give exact statistics.
    rgb_counts = [np.bincount(planes[c], minlength=256) for c in range(3)]
    rgb_stats = [_hist_stats(cnt, _UNIT_VALUES) for cnt in rgb_counts]

    # Stains: Beer-Lambert optical density, then unmixing into H, E and residual.
    od = np.take(_OD_LUT, planes)  # (3, N)
    conc = _UNMIX.T @ od  # (3, N): haematoxylin, eosin, residual
    conc_counts = [
        np.bincount(_quantise(conc[c], _CONC_LO, _CONC_HI, _CONC_BINS), minlength=_CONC_BINS)
        for c in range(3)
    ]
    stain_stats = [_hist_stats(cnt, _CONC_VALUES) for cnt in conc_counts]
    od_sum = od[0] + od[1] + od[2]  # (N,)
    # Mean OD over channels (not the sum) keeps the columns within [0, 5.5] like the rest.
    od_stats = [(od_sum > _TISSUE_OD).mean(), od_sum.mean() / 3.0, od_sum.std() / 3.0]

    luma = _LUMA / 255.0
    grey = (luma[0] * planes[0] + luma[1] * planes[1] + luma[2] * planes[2]).reshape(h, w)
    grey_hist = np.bincount(_quantise(grey.ravel(), 0.0, 1.0, 16), minlength=16) / n_px
    # Coarse stain histograms are sums of the fine ones (no second pass over pixels).
    stain_hist = [_rebin(cnt, _CONC_VALUES, 0.0, _STAIN_HIST_HI, 8) / n_px
                  for cnt in conc_counts]

    haem = conc[0].reshape(h, w)
    glcm = np.concatenate([
        _glcm_features(_quantise(grey, 0.0, 1.0, GLCM_LEVELS)),
        _glcm_features(_quantise(haem, 0.0, _STAIN_HIST_HI, GLCM_LEVELS)),
    ])
    lbp = np.concatenate([_lbp_histogram(grey, r) for r in LBP_RADII])
    gabor = _gabor_features(grey)
    nuclei = _nuclei_features(haem)

    feats = np.concatenate([
        *rgb_stats, *stain_stats, od_stats, grey_hist, *stain_hist, glcm, lbp, gabor, nuclei,
    ]).astype(np.float32)
    # Belt and braces: every block is finite by construction; a NaN here would be a bug,
    # and silently poisoning a federated model is worse than a zero.
    return np.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0)


def _feature_names() -> list[str]:
    stats = ["mean", "std", *(f"p{round(q * 100):02d}" for q in PERCENTILES)]
    names = [f"rgb.{c}.{s}" for c in "rgb" for s in stats]
    names += [f"stain.{c}.{s}" for c in ("haem", "eosin", "resid") for s in stats]
    names += ["od.tissue_fraction", "od.mean", "od.std"]
    names += [f"grey_hist.{k}" for k in range(16)]
    names += [f"stain_hist.{c}.{k}" for c in ("haem", "eosin", "resid") for k in range(8)]
    names += [
        f"glcm.{src}.d{d}.{p}" for src in ("grey", "haem") for d in GLCM_DISTANCES
        for p in _GLCM_PROPS
    ]
    names += [f"lbp.r{r}.{k}" for r in LBP_RADII for k in range(10)]
    names += [
        f"gabor.{s}.l{lam}.rank{o}" for s in ("mean", "std") for lam in GABOR_WAVELENGTHS
        for o in range(GABOR_ORIENTATIONS)
    ]
    names += [
        f"nuclei.h{t}.{s}" for t in _NUCLEI_THRESHOLDS
        for s in ("fraction", "blobs_per_100px", "mean_log_area")
    ]
    return names


HISTO_TEXTURE_DIM = len(_feature_names())


class HistoTextureEncoder(Encoder):
    """``histo-texture``: deterministic colour, stain and texture descriptor, no weights.

    Runs on the CPU with numpy/scipy whatever ``device`` is (nothing to accelerate).
    """

    name = "histo-texture"
    dim = HISTO_TEXTURE_DIM
    version = 1  # bump on any change to the descriptor: it renames every site's cache

    def params(self) -> dict[str, object]:
        return {"max_side": MAX_SIDE}

    @staticmethod
    def feature_names() -> list[str]:
        """One name per output column, in order."""
        return _feature_names()

    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Shapes: n images (H_i, W_i, 3) uint8 -> (n, 171) float32."""
        if len(images) == 0:
            return _empty_output(self)
        return torch.from_numpy(np.stack([histo_texture(img) for img in images]))


class PixelsEncoder(Encoder):
    """``pixels:<size>``: the grey image resized to size x size, flattened, in [0, 1].

    A trivial baseline for small images such as 28 x 28 Fashion-MNIST bags, where raw
    pixels are already a reasonable instance representation.
    """

    version = 1

    def __init__(self, size: int = 28) -> None:
        super().__init__()
        self.size = int(size)
        self.name = f"pixels{self.size}"
        self.dim = self.size * self.size

    def params(self) -> dict[str, object]:
        return {"size": self.size, "resample": "bilinear", "grey": "bt601"}

    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Shapes: n images (H_i, W_i, 3) uint8 -> (n, size * size) float32."""
        if len(images) == 0:
            return _empty_output(self)
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for k, image in enumerate(images):
            rgb = to_rgb_uint8(image)
            grey = rgb.astype(np.float32) @ _LUMA  # (H, W) in [0, 255]
            img = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32))  # mode "F"
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
            out[k] = np.clip(np.asarray(img, dtype=np.float32).ravel() / 255.0, 0.0, 1.0)
        return torch.from_numpy(out)
