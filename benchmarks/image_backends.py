"""How much transformers' torchvision image backend for Qwen2-VL-family processors would differ from the PIL
backend rdpo_jax matches (`data/qwen_images.py`).

    python benchmarks/image_backends.py

The torchvision backend resizes the uint8 image tensor with bicubic interpolation and antialiasing (torch's
`interpolate`, which torchvision's `resize` calls for tensors) where the PIL backend calls
`PIL.Image.resize(BICUBIC)`. torchvision itself cannot be imported with this CPU torch, so the script calls
torch's interpolate directly, at the sizes `smart_resize` picks, on matplotlib's sample photograph.
"""

import matplotlib.cbook as cbook
import numpy as np
import torch
from PIL import Image

from rdpo_jax.models.qwen2_5_vl import images as qwen_images


def main():
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    cfg = qwen_images.QwenImageConfig()
    std = min(cfg.image_std)
    for size in [(200, 150), (517, 333), (1000, 750), (2000, 1500)]:
        image = photo.resize(size, Image.Resampling.BICUBIC)
        _, gh, gw = qwen_images.grid(image.height, image.width, cfg)
        h, w = gh * cfg.patch_size, gw * cfg.patch_size
        pil = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC)).astype(np.float64)
        x = torch.tensor(np.asarray(image)).permute(2, 0, 1)[None].float()
        tv = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        tv = tv.round().clamp(0, 255)[0].permute(1, 2, 0).numpy()
        d = np.abs(pil - tv)
        print(f"{image.width}×{image.height} → {w}×{h}: max |Δ| {d.max():.0f}/255, mean {d.mean():.3f}/255, "
              f"{(d > 0).mean() * 100:.1f}% of values differ; after normalization ≤ {d.max() / 255 / std:.3f}")


if __name__ == "__main__":
    main()
