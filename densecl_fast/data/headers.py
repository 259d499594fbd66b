"""Image sizes from file headers, without decoding.

The DALI loader computes each crop window on the host (torchvision's rule needs the image size),
so it needs the size of every file before the graph decodes it; a header that does not parse also
flags most unreadable files before they reach the decoder.
"""
from __future__ import annotations

import io
from typing import Optional, Tuple

from PIL import Image

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_hw(data: bytes) -> Optional[Tuple[int, int]]:
    """(height, width) from a JPEG's SOF marker; None when `data` ends before it or is not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:                       # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
            continue
        if marker in _SOF:
            if i + 9 > n:
                return None
            h, w = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            return (h, w) if h > 0 and w > 0 else None
        if marker in (0xD9, 0xDA):               # end of image / start of scan before any frame
            return None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def image_hw(data: bytes) -> Optional[Tuple[int, int]]:
    """(height, width) of an encoded image from its header (JPEG and PNG parsed directly, other
    formats through PIL's lazy open); None when it is not a readable image header."""
    if data[:2] == b"\xff\xd8":
        return jpeg_hw(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return (h, w) if h > 0 and w > 0 else None
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
        return (h, w) if h > 0 and w > 0 else None
    except Exception:  # PIL raises many types for non-images; all mean "unreadable header"
        return None


def file_hw(path: str, head: int = 1 << 16) -> Optional[Tuple[int, int]]:
    """`image_hw` of a file, reading only its head unless the header is longer."""
    with open(path, "rb") as f:
        data = f.read(head)
        hw = image_hw(data)
        if hw is None and len(data) == head:
            hw = image_hw(data + f.read())
    return hw
