"""Build the demo shards in samples/shards/ from Kodak images (run once; outputs are committed).

    python samples/make_samples.py ../shared/data/kodak

Two WebDataset shards of four samples each, mixing what archives hold: JPEG and PNG
images, a grayscale and a palette image, and metadata members (json, txt, cls) that a
compress job must carry through byte for byte. Kodak images are downscaled by 2
(to 384x256 / 256x384) to keep the repository small.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

from PIL import Image

OUT = Path(__file__).resolve().parent / "shards"


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def main(kodak: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for shard in range(2):
        with tarfile.open(OUT / f"sample-{shard:06d}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(4):
                number = 1 + shard * 4 + i
                key = f"kodim{number:02d}"
                image = Image.open(kodak / f"{key}.png").convert("RGB")
                image = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
                if number == 6:
                    image = image.convert("L")
                if number == 7:
                    image = image.quantize(colors=128)
                fmt, ext = ("JPEG", "jpg") if shard == 0 else ("PNG", "png")
                _add(tar, f"{key}.{ext}", _encode(image, fmt))
                meta = {"source": "Kodak Lossless True Color Image Suite", "image": key, "mode": image.mode}
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                _add(tar, f"{key}.cls", str(number % 3).encode())
                if i == 0:
                    _add(tar, f"{key}.txt", f"caption for {key}\n".encode())


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/kodak"))
