"""Descriptors: what happens between decoded pixels and the stored vector, besides the
network's weights. A descriptor names a pooling of the network's last feature map and
whether uniform borders are trimmed before the resize; it is recorded in each source, and
sources of different descriptors are never matched.

The steps are plain numpy here, so each is testable on small arrays; the model builder
applies the same pooling inside the graph (`models.pooling`), and decoding trims borders
(`decode.decode_image`). docs/accuracy.md has what each costs and gains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GEM_P = 3.0  # the generalised-mean power (the retrieval literature's usual value)
RMAC_LEVELS = 3  # regions of R-MAC: the whole map, then 2x2 and 3x3 overlapping windows

GEM_EPSILON = 1e-6  # activations are clamped to this before the power (ReLU6 maps are >= 0)
BORDER_STD = 5.0  # a row or column whose pixels vary less than this (0..255) is uniform;
# 5 rather than 10: dark or pale photo backgrounds are not borders (docs/accuracy.md)
BORDER_KEEP = 0.2  # trimming never leaves less than this fraction of a side


def gem_pool(maps: np.ndarray, p: float) -> np.ndarray:
    """Generalised-mean pooling of feature maps (..., height, width, channels) over the
    spatial axes: (mean of x^p)^(1/p). p=1 is average pooling; p -> inf approaches max."""
    x = np.maximum(maps.astype(np.float64), GEM_EPSILON)
    return (np.mean(x**p, axis=(-3, -2)) ** (1.0 / p)).astype(np.float32)


def uniform_border_box(
    pixels: np.ndarray, max_std: float = BORDER_STD, keep: float = BORDER_KEEP
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of `pixels` (height, width, 3) without its uniform edges:
    frames, letterbox bars, a screenshot's margins and title bar. A line (row or column) is
    uniform when its pixels' standard deviation is under `max_std` in every channel, counting
    only the part of it inside the lines kept so far; rows and columns are trimmed in turn
    until nothing changes. An axis that would keep less than `keep` of its length is left
    whole."""
    height, width = pixels.shape[:2]
    x = pixels.astype(np.float32)
    box = (0, 0, width, height)
    edges = (x[0], x[-1], x[:, 0], x[:, -1])
    if all(edge.std(axis=0).max() >= max_std for edge in edges):
        return box  # the common case, answered from the four outermost lines alone
    for _ in range(4):  # each round can only uncover more uniform lines; 2 rounds suffice
        left, top, right, bottom = box
        inner = x[top:bottom, left:right]
        rows = _kept(inner.std(axis=1).max(axis=-1) < max_std, keep * height, top)
        cols = _kept(inner.std(axis=0).max(axis=-1) < max_std, keep * width, left)
        new = (cols[0], rows[0], cols[1], rows[1])
        if new == box:
            break
        box = new
    return box


def _kept(uniform: np.ndarray, least: float, offset: int) -> tuple[int, int]:
    """(start, end), from `offset`, of the span inside the leading and trailing uniform
    lines; the whole span if that would be shorter than `least`."""
    varied = np.flatnonzero(~uniform)
    if len(varied) == 0 or varied[-1] + 1 - varied[0] < least:
        return offset, offset + len(uniform)
    return offset + int(varied[0]), offset + int(varied[-1]) + 1


def region_boxes(size: int, levels: int = RMAC_LEVELS) -> list[tuple[int, int, int]]:
    """(top, left, side) of the square regions R-MAC pools over a `size` x `size` map: the
    whole map, then at level L an L x L grid of windows of side ceil(2 * size / (L + 1)),
    spread evenly so that neighbours overlap."""
    boxes = [(0, 0, size)]
    for level in range(2, levels + 1):
        side = min(size, -(-2 * size // (level + 1)))
        starts = sorted({round(s) for s in np.linspace(0, size - side, level)})
        boxes += [(top, left, side) for top in starts for left in starts]
    return boxes


def region_weights(size: int, levels: int = RMAC_LEVELS) -> np.ndarray:
    """(regions, size * size) float32: row r averages the cells of region r of
    `region_boxes`, so one matrix product gives every region's mean."""
    boxes = region_boxes(size, levels)
    weights = np.zeros((len(boxes), size, size), np.float32)
    for r, (top, left, side) in enumerate(boxes):
        weights[r, top : top + side, left : left + side] = 1.0 / (side * side)
    return weights.reshape(len(boxes), size * size)


def regional_gem(maps: np.ndarray, p: float = GEM_P, levels: int = RMAC_LEVELS) -> np.ndarray:
    """R-MAC with GeM regions: each region of `region_boxes` GeM-pooled and L2-normalised,
    then summed. Maps are (..., size, size, channels)."""
    size = maps.shape[-2]
    total = np.zeros((*maps.shape[:-3], maps.shape[-1]), np.float32)
    for top, left, side in region_boxes(size, levels):
        pooled = gem_pool(maps[..., top : top + side, left : left + side, :], p)
        total += pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return total


@dataclass(frozen=True)
class Descriptor:
    """A named way from the network's last feature map to the stored vector."""

    name: str
    pooling: str  # "avg", "gem" or "rmac"
    trim_borders: bool
    summary: str
    version: int = 1  # bumped whenever the same name would give other vectors

    @property
    def key(self) -> str:
        """What a source records and matching compares: `rmac-trim/v1`."""
        return f"{self.name}/v{self.version}"


DESCRIPTORS: dict[str, Descriptor] = {
    d.name: d
    for d in (
        Descriptor("avg", "avg", False, "global average pooling (the original's)"),
        Descriptor("gem", "gem", False, f"generalised-mean pooling, p={GEM_P:g}"),
        Descriptor("rmac", "rmac", False, f"regional GeM (R-MAC, {RMAC_LEVELS} levels)"),
        Descriptor(
            "rmac-trim",
            "rmac",
            True,
            f"uniform borders trimmed, then regional GeM (R-MAC, {RMAC_LEVELS} levels)",
        ),
    )
}
LEGACY = DESCRIPTORS["avg"].key  # sources written before descriptors were recorded
IMPORTED = "imported"  # the descriptor of imported vectors (what made them is their `model`)
