"""How much of Qwen2.5-VL's per-row patch buffers is padding, for a realistic mix of photo sizes and several
choices of patch buckets (no model, no images: the grids follow from the sizes).

    python benchmarks/patch_padding.py [--batch=8] [--batches=2000] [--max_pixels=401408]

Sizes drawn uniformly from common camera, phone, screenshot and web-image sizes in both orientations;
1 image per record (2 for a quarter of the records). A batch's buffer length is the smallest bucket
holding its fullest row; padding share = 1 − real patches / buffer slots over all batches. The last line
is the alternative layout: one buffer for the whole batch (a row's patches after the previous row's),
buckets ×2 apart.
"""

import numpy as np
from absl import app, flags

from rdpo_jax.models.qwen2_5_vl import images as qwen_images

_BATCH = flags.DEFINE_integer("batch", 8, "Rows per batch (per process).")
_BATCHES = flags.DEFINE_integer("batches", 2000, "Batches drawn.")
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", 512 * 28 * 28, "Pixel budget per image (the 7B configs').")

SIZES = [(640, 480), (640, 427), (500, 375), (800, 600), (1024, 768), (1280, 720), (1920, 1080), (4032, 3024),
         (3000, 4000), (1170, 2532), (1080, 1920), (2560, 1440), (300, 200), (224, 224), (512, 512), (1600, 900)]
BUCKETS = {"one (4096)": (4096,), "powers of 2 (256…4096)": (256, 512, 1024, 2048, 4096),
           "×4 (256, 1024, 4096)": (256, 1024, 4096), "the 7B configs' (1024, 2048, 4096)": (1024, 2048, 4096)}


def main(argv):
    del argv
    cfg = qwen_images.QwenImageConfig(max_pixels=_MAX_PIXELS.value)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(_BATCHES.value * _BATCH.value):
        n = 2 if rng.random() < 0.25 else 1
        total = 0
        for _ in range(n):
            w, h = SIZES[rng.integers(len(SIZES))]
            if rng.random() < 0.5:
                w, h = h, w
            _, gh, gw = qwen_images.grid(h, w, cfg)
            total += gh * gw
        rows.append(total)
    rows = np.asarray(rows).reshape(_BATCHES.value, _BATCH.value)
    print(f"patches per row: median {int(np.median(rows))}, max {rows.max()} (max_pixels {_MAX_PIXELS.value})")
    for name, buckets in BUCKETS.items():
        need = rows.max(axis=1)
        if need.max() > buckets[-1]:
            print(f"{name}: rows up to {need.max()} patches do not fit")
            continue
        length = np.array([next(b for b in buckets if b >= x) for x in need])
        share = 1 - rows.sum() / (length * _BATCH.value).sum()
        print(f"{name:40s} padding {share:6.1%}; programs used {len(set(length.tolist()))}")
    # the alternative: one buffer per batch (rows' patches one after another, attention by segment ids)
    flat = rows.sum(axis=1)
    buckets = [b * _BATCH.value for b in (1024, 2048, 4096)]
    buckets = [b for b in (buckets[0] // 2, *buckets, buckets[-1] * 2)]
    length = np.array([next(b for b in buckets if b >= x) for x in flat])
    print(f"{'one flat buffer per batch, ×2 buckets':40s} padding {1 - flat.sum() / length.sum():6.1%}; "
          f"programs used {len(set(length.tolist()))}")


if __name__ == "__main__":
    app.run(main)
