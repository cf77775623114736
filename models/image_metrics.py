"""Ground-truth image metrics in an edited region: PSNR / SSIM in the mask's bounding box, L1
and gradient magnitude similarity inside the mask.

One home for the arithmetic that evaluation (evaluation/refinement.py) and training
diagnostics (models/denoising_gain.py) both score with. PSNR, SSIM and L1 reward a smooth fill
(OpenCV Telea beats a correct but 1 px shifted sharp fill on PSNR); gradient magnitude
similarity does not: a fill without the target's edges scores low wherever the target has
detail.

All images are uint8 HxWx3 numpy arrays, masks bool HxW.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)


def mask_box_slices(mask: np.ndarray) -> tuple[slice, slice]:
    """(rows, cols) slices of the mask's bounding box; the metrics' region of interest."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("empty mask")
    return slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float [1,3,H,W] in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


def psnr_in_box(output: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, data range 1) inside the mask's bounding box; inf when identical there."""
    rows, cols = mask_box_slices(mask)
    value = peak_signal_noise_ratio(to_tensor(output[rows, cols]), to_tensor(target[rows, cols]),
                                    data_range=1.0)
    return float(value)


def ssim_in_box(output: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Gaussian SSIM inside the mask's bounding box, the window shrunk to fit small boxes."""
    rows, cols = mask_box_slices(mask)
    side = min(rows.stop - rows.start, cols.stop - cols.start)
    kernel = min(11, side if side % 2 else side - 1)  # odd, and its pad < side for reflection
    value = structural_similarity_index_measure(
        to_tensor(output[rows, cols]), to_tensor(target[rows, cols]), data_range=1.0,
        kernel_size=kernel, sigma=1.5 * kernel / 11,
    )
    return float(value)


def masked_l1(output: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute error in [0,1] units over the mask's pixels and channels."""
    if not mask.any():
        raise ValueError("empty mask")
    diff = np.abs(output.astype(np.float64) - target.astype(np.float64)) / 255.0
    return float(diff[mask].mean())


GMS_C = 170 / 255**2  # GMSD's stability constant (170 on 0..255 images)


def gradient_magnitude(image: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of the luminance in [0,1] units per pixel (Sobel / 4)."""
    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float32)
    gray /= 255.0
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT) / 4
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT) / 4
    return np.hypot(gx, gy)


def gradient_similarity(output: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Mean gradient magnitude similarity inside the mask (1 = every edge as the target's).

    The per-pixel map of GMSD (Xue et al., 2014), (2 g_o g_t + c) / (g_o^2 + g_t^2 + c) on
    Sobel magnitudes of the whole images (so mask-border pixels see their real neighbours),
    averaged over the mask's pixels. Missing detail (g_o << g_t) and invented edges
    (g_o >> g_t) both lower it; flat regions filled flat keep 1.
    """
    if not mask.any():
        raise ValueError("empty mask")
    g_o, g_t = gradient_magnitude(output), gradient_magnitude(target)
    similarity = (2 * g_o * g_t + GMS_C) / (g_o**2 + g_t**2 + GMS_C)
    return float(similarity[mask].mean())


def ground_truth_metrics(output: np.ndarray, target: np.ndarray, mask: np.ndarray
                         ) -> dict[str, float]:
    """PSNR / SSIM in the mask's box, L1 and gradient similarity in the mask, vs the target."""
    return {"psnr": psnr_in_box(output, target, mask), "ssim": ssim_in_box(output, target, mask),
            "l1": masked_l1(output, target, mask),
            "gms": gradient_similarity(output, target, mask)}
