"""Sa2VA's image preprocessing, as its remote code does it: DirectResize for SAM2, InternVL's dynamic 448²
tiling and per-tile normalisation (numpy and PIL in, numpy or torch out; no model)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Hard-coded in the remote ``preparing_for_generation`` and the training datasets (they override the config).
MIN_DYNAMIC_PATCH = 1
MAX_DYNAMIC_PATCH = 12
USE_THUMBNAIL = True


def as_uint8_images(images: Any) -> np.ndarray:
    """uint8 [B, H, W, 3] (numpy or torch; [H, W, 3] is promoted to a batch of one) -> contiguous numpy."""
    arr = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B,H,W,3], got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        integral = np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0 and arr.max() <= 255
        if not integral:
            raise ValueError(f"images must be uint8 RGB in [0, 255], got dtype {arr.dtype}")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def direct_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Sa2VA's DirectResize: PIL resize to size x size ignoring the aspect ratio (PIL's default filter)."""
    from PIL import Image

    return np.array(Image.fromarray(image).resize((size, size)))


def _closest_grid(aspect: float, grids: list[tuple[int, int]], width: int, height: int, size: int):
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for grid in grids:
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * size * size * grid[0] * grid[1]:
            best = grid  # a tie goes to the larger grid only if the image is big enough to fill it
    return best


def dynamic_tiles(image, *, min_num: int, max_num: int, image_size: int, use_thumbnail: bool) -> list:
    """InternVL's dynamic tiling of a PIL image: the (cols, rows) grid with cols*rows in [min_num, max_num] whose
    aspect ratio is closest to the image's; image_size² crops row-major, plus a thumbnail if > 1 tile."""
    width, height = image.size
    grids = sorted(
        {
            (i, j)
            for n in range(min_num, max_num + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_num <= i * j <= max_num
        },
        key=lambda g: g[0] * g[1],
    )
    cols, rows = _closest_grid(width / height, grids, width, height, image_size)
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def normalize_tile(tile, size: int) -> torch.Tensor:
    """Sa2VA's ``transformer``: RGB, Resize((size, size), BICUBIC) (a no-op for tiles), ToTensor, Normalize."""
    from PIL import Image

    tile = tile.convert("RGB")
    if tile.size != (size, size):
        tile = tile.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.array(tile, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return x.sub(mean).div(std)
