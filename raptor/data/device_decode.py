"""JPEG decoding on the GPU (`data.decode=gpu`): loader workers only read the shards and
pass each image's encoded bytes on; the main process decodes a whole batch at once with
`torchvision.io.decode_jpeg(..., device=cuda)` (nvJPEG) and applies the evaluation
transform there: shorter side resized to `resize_side` (antialiased, the configured
interpolation), center crop to input_size, scaled to [0, 1] and normalized.

The device is the current CUDA device (the rank's, under DDP), or the CPU where there is
none (same code, decoded by libjpeg: what the tests run). Results match the CPU path
(PIL decode + resize) up to the two decoders' and resamplers' rounding, not bit for bit.
Only JPEG is read; another format is a bad sample, skipped and counted like a corrupt
one. A JPEG that passes the header check but fails to decode becomes a zero image with
valid=False (warned), so one bad file cannot stop a run.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Dict, List

import torch

JPEG_MAGIC = b"\xff\xd8\xff"


class EncodedJpeg:
    """Worker-side 'transform' of data.decode=gpu: raw bytes -> 1-D uint8 tensor, after
    checking the JPEG signature (ValueError otherwise)."""

    encoded = True  # decode_sample passes the bytes, not a PIL image

    def __call__(self, data: bytes, ext: str) -> torch.Tensor:
        if not bytes(data[:3]) == JPEG_MAGIC:
            raise ValueError(f".{ext} is not a JPEG (data.decode=gpu reads JPEG only)")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class DeviceDecoder:
    """A batch whose "image" is a list of encoded JPEGs (empty = padding row) -> the same
    batch with "image" a normalized float (B, 3, H, W) tensor on the decoding device."""

    def __init__(self, resolved: Dict[str, Any], resize: int) -> None:
        self.side = int(resolved["input_size"][-1])
        self.resize = int(resize)
        self.interpolation = str(resolved.get("interpolation") or "bicubic")
        self.mean = torch.tensor(resolved["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(resolved["std"], dtype=torch.float32).view(3, 1, 1)

    @staticmethod
    def device() -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        encoded: List[torch.Tensor] = batch["image"]
        if isinstance(encoded, torch.Tensor):  # already decoded (a CPU-decoded batch)
            return batch
        device = self.device()
        rows = [i for i, e in enumerate(encoded) if e.numel()]
        decoded = self._decode([encoded[i] for i in rows], device)
        out = torch.zeros(len(encoded), 3, self.side, self.side, device=device)
        valid = batch["valid"].clone()
        by_shape = defaultdict(list)  # images of one size are resized together
        for i, img in zip(rows, decoded):
            if img is None:
                valid[i] = False
            else:
                by_shape[tuple(img.shape)].append((i, img))
        for group in by_shape.values():
            index = [i for i, _ in group]
            out[index] = self._transform(torch.stack([img for _, img in group]))
        return {**batch, "image": out, "valid": valid}

    def _decode(self, encoded: List[torch.Tensor], device: torch.device) -> List[Any]:
        from torchvision.io import ImageReadMode, decode_jpeg

        if not encoded:
            return []
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one corrupt file fails the batch: decode one by one
            pass
        images = []
        for data in encoded:
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as exc:
                warnings.warn(f"data.decode=gpu: a JPEG failed to decode ({exc})", stacklevel=2)
                images.append(None)
        return images

    def _transform(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, h, w) -> normalized float (N, 3, side, side): torchvision's Resize
        (shorter side) + CenterCrop arithmetic."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        h, w = images.shape[-2:]
        r = self.resize
        size = [r, int(r * w / h)] if h <= w else [int(r * h / w), r]
        mode = InterpolationMode(self.interpolation)
        x = images.float()
        if [h, w] != size:
            x = TF.resize(x, size, interpolation=mode, antialias=True)
        x = TF.center_crop(x, [self.side, self.side]).clamp_(0, 255).div_(255)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x - mean) / std
