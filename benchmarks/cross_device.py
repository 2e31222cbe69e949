"""Cross-device decodability of ncpipe bitstreams, and what the exact integer path costs in rate.

    python -m benchmarks.cross_device ../shared/data/kodak                       # CPU: every registry model
    python -m benchmarks.cross_device ../shared/data/kodak --devices cpu,cuda    # GPU machine: all pairs

For every registry model over the images of a directory (a variable-rate model at each of
``--qualities``: by default its lowest, default and highest level):

(1) Decodability. Each image is encoded under every (encode device, batch size, torch threads)
    configuration; every bitstream is then decoded *alone* on every (decode device, threads)
    configuration, and the decoded latents are compared bit for bit with the encoder's: the
    symbols z and y, the scale-table indexes, and ŷ = Δ·y + μ. Target: 100 % identical.
    ``--save-bitstreams DIR`` / ``--check-bitstreams DIR`` do the same across machines.
(2) Rate cost (fixed-rate models: CompressAI's ``compress()`` has no quantization steps). bpp
    of ncpipe's bitstreams against CompressAI's own float ``compress()`` with the same model and
    padded input (CompressAI: its strings' bytes only; ncpipe: the coded streams, and separately
    its container overhead), plus CompressAI's float entropy parameters coded
    with ncpipe's rANS, which splits the difference into "integer h_s" and "coder".
(3) What the integer path removes. The float path's entropy parameters are recomputed under
    perturbations representative of cross-device float differences (h_s in float64; with TF32
    convolutions, a GPU's default; ±1 ulp noise on its outputs; other thread counts, batch
    compositions and devices, for real); CompressAI's y strings are then decoded with the perturbed
    parameters. Counted per image: a changed table index (the rANS stream desynchronises), a
    changed mean (ŷ differs), and whether the decoded symbols actually differ (measured desync).

Prints a table and writes everything (with machine and date) as JSON.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncpipe import bitstream as fmt
from ncpipe.codec import LearnedCodec, padded_shape, stack_padded
from ncpipe.device import resolve_device
from ncpipe.entropy import rans
from ncpipe.images import decode_image
from ncpipe.models.cards import machine_description, now_utc
from ncpipe.models.checkpoint import CodecModel
from ncpipe.models.registry import list_models, load_model

CONTAINER_BYTES_PER_CHUNK = fmt.CHUNK_OVERHEAD + 4  # length + CRC32, and the stream's u32 word count


# -- images and configurations ------------------------------------------------------------


def load_images(directory: Path, limit: int | None) -> list[tuple[str, np.ndarray]]:
    paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:limit]
    if not paths:
        raise SystemExit(f"no images in {directory}")
    return [(p.name, decode_image(p.read_bytes(), p.suffix.lstrip(".")).pixels) for p in paths]


def batches(indexes: list[int], images: list[tuple[str, np.ndarray]], size: int) -> list[list[int]]:
    """Image indexes grouped by padded shape (as the pipeline batches), ``size`` at a time."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i in indexes:
        groups.setdefault(padded_shape(*images[i][1].shape[:2]), []).append(i)
    return [group[j : j + size] for group in groups.values() for j in range(0, len(group), size)]


@dataclass(frozen=True)
class Encoded:
    config: str
    image: int
    data: bytes
    symbols_digest: str  # z, y symbols and scale indexes, as the encoder computed them
    latents_digest: str  # ŷ = y + μ in float64, as the encoder computed it


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for array in arrays:
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def _codec(model: CodecModel, device: torch.device, threads: int) -> LearnedCodec:
    return LearnedCodec(model.to(device), coder_threads=threads)


@torch.inference_mode()
def encode_all(codec: LearnedCodec, images, batch_size: int, config: str, quality: int) -> list[Encoded]:
    out = []
    for group in batches(list(range(len(images))), images, batch_size):
        analysed = codec.analyse([images[i][1] for i in group], quality=quality)
        qualities = [quality] * len(group)
        _, means = codec.entropy_parameters(torch.from_numpy(analysed.z_symbols), qualities)
        y_hat = codec.dequantize(torch.from_numpy(analysed.y_symbols), means, qualities).cpu().numpy()
        pending = [codec.submit_entropy_coding(analysed, k, "RGB") for k in range(len(group))]
        for k, (i, bitstream) in enumerate(zip(group, pending)):
            out.append(Encoded(
                config, i, bitstream.result(),
                _digest(analysed.z_symbols[k], analysed.y_symbols[k], analysed.scale_indexes[k]),
                _digest(y_hat[k]),
            ))
    return out


@torch.inference_mode()
def decoded_digests(codec: LearnedCodec, data: bytes) -> tuple[str, str]:
    header, symbols = codec.decode_symbols(data)
    indexes, means = codec.entropy_parameters(torch.from_numpy(symbols.z)[None], [header.quality])
    y_hat = codec.dequantize(torch.from_numpy(symbols.y)[None], means, [header.quality])
    return _digest(symbols.z, symbols.y, indexes[0].cpu().numpy()), _digest(y_hat[0].cpu().numpy())


def model_qualities(model: CodecModel, asked: list[int] | None) -> list[int]:
    """The quality levels to test: ``asked``, or a variable-rate model's lowest, default and highest (0: fixed)."""
    if model.quality is None:
        return [0]
    return asked or sorted({1, model.quality.default, len(model.quality.lambdas)})


def decodability(name: str, images, devices: list[str], batch_sizes: list[int], threads: list[int],
                 decode_threads: list[int], qualities: list[int]) -> tuple[dict[str, Any], list[Encoded]]:
    encoded: list[Encoded] = []
    for device in devices:
        codec = _codec(load_model(name), resolve_device(device), 1)
        for t in threads:
            _set_threads(t)
            for b in batch_sizes:
                for quality in qualities:
                    config = f"enc {device} batch {b} threads {t}" + (f" quality {quality}" if quality else "")
                    started = time.perf_counter()
                    encoded += encode_all(codec, images, b, config, quality)
                    print(f"  {config}: {time.perf_counter() - started:.1f}s", file=sys.stderr)
        codec.close()
    pairs = {}
    for device in devices:
        for t in decode_threads:
            _set_threads(t)
            codec = _codec(load_model(name), resolve_device(device), t)
            started = time.perf_counter()
            for item in encoded:
                symbols, latents = decoded_digests(codec, item.data)
                key = f"{item.config} -> dec {device} threads {t}"
                row = pairs.setdefault(key, {"bitstreams": 0, "identical_symbols": 0, "identical_latents": 0})
                row["bitstreams"] += 1
                row["identical_symbols"] += symbols == item.symbols_digest
                row["identical_latents"] += latents == item.latents_digest
            print(f"  decode on {device} threads {t}: {time.perf_counter() - started:.1f}s", file=sys.stderr)
            codec.close()
    by_image: dict[int, set[bytes]] = {}
    for item in encoded:
        by_image.setdefault(item.image, set()).add(item.data)
    total = sum(row["bitstreams"] for row in pairs.values())
    return {
        "pairs": pairs,
        "bitstreams_decoded": total,
        "identical_latents": sum(row["identical_latents"] for row in pairs.values()),
        "identical_symbols": sum(row["identical_symbols"] for row in pairs.values()),
        "images_with_identical_bitstreams_across_encode_configs": sum(len(v) == 1 for v in by_image.values()),
        "images": len(images),
    }, encoded


# -- rate cost and the float path ---------------------------------------------------------


@dataclass
class FloatPath:
    """CompressAI's ``compress()`` for one image, with the intermediate entropy parameters kept."""

    y: torch.Tensor
    z_hat: torch.Tensor
    scales: torch.Tensor
    means: torch.Tensor | None
    indexes: torch.Tensor
    y_strings: list[bytes]
    z_strings: list[bytes]


@torch.inference_mode()
def float_path(model: CodecModel, x: torch.Tensor) -> FloatPath:
    """The steps of CompressAI's ``MeanScaleHyperprior.compress`` / ``ScaleHyperprior.compress``."""
    adapter, net = model.adapter, model.adapter.model
    y, z = adapter.analysis(x)
    z_strings = net.entropy_bottleneck.compress(z)
    z_hat = net.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
    scales, means = hyper_parameters(model, z_hat)
    indexes = net.gaussian_conditional.build_indexes(scales)
    y_strings = net.gaussian_conditional.compress(y, indexes, means=means)
    return FloatPath(y, z_hat, scales, means, indexes, y_strings, z_strings)


def hyper_parameters(model: CodecModel, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    scales, means = model.adapter.split_entropy_parameters(model.adapter.model.h_s(z_hat))
    return scales, means if model.adapter.spec.has_means else None


def ncpipe_coder_on_float_parameters(codec: LearnedCodec, path: FloatPath, z_symbols: np.ndarray) -> int:
    """Bytes of the float path's symbols coded with ncpipe's rANS (same chunks): isolates the coder."""
    means = path.means if path.means is not None else torch.zeros_like(path.y)
    y_symbols = torch.round(path.y - means)[0].to(torch.int32).numpy()
    indexes = path.indexes[0].numpy()
    total = len(rans.encode(z_symbols, np.repeat(np.arange(z_symbols.shape[0], dtype=np.int32),
                                                 z_symbols[0].size), codec.model.z_tables))
    for start in range(0, y_symbols.shape[0], codec.y_chunk_channels):
        stop = start + codec.y_chunk_channels
        total += len(rans.encode(y_symbols[start:stop], indexes[start:stop], codec.model.y_tables))
    return total


def _one_ulp_noise(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each element moved by one ulp up or down (or kept), at random."""
    step = torch.randint(-1, 2, values.shape, generator=generator)
    up = torch.nextafter(values, torch.full_like(values, float("inf")))
    down = torch.nextafter(values, torch.full_like(values, float("-inf")))
    return torch.where(step > 0, up, torch.where(step < 0, down, values))


def perturbations(model: CodecModel, path: FloatPath, others: list[torch.Tensor], devices: list[str],
                  generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Entropy parameters a decoder on other hardware or settings could compute from the same ẑ."""
    net = model.adapter.model
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    with torch.inference_mode():
        h_s64 = _double_copy(net.h_s)
        params = h_s64(path.z_hat.double()).float()
        out["h_s in float64"] = _split(model, params)
        out["h_s with TF32 convolutions"] = _split(model, _tf32_copy(net.h_s)(path.z_hat))
        out["±1 ulp on h_s outputs"] = (
            _one_ulp_noise(path.scales, generator),
            None if path.means is None else _one_ulp_noise(path.means, generator),
        )
        previous = torch.get_num_threads()
        other = 1 if previous != 1 else 2
        torch.set_num_threads(other)
        out[f"h_s float32, {other} thread(s) (measured)"] = hyper_parameters(model, path.z_hat)
        torch.set_num_threads(previous)
        same_shape = [z for z in others if z.shape == path.z_hat.shape][:7]
        if same_shape:
            batch = torch.cat([path.z_hat, *same_shape])
            scales, means = hyper_parameters(model, batch)
            label = "h_s float32, batched with other images (measured)"
            out[label] = (scales[:1], None if means is None else means[:1])
        for device in devices:
            if device != "cpu":
                net.h_s.to(device)
                scales, means = hyper_parameters(model, path.z_hat.to(device))
                net.h_s.to("cpu")
                out[f"h_s float32 on {device} (measured)"] = (scales.cpu(), None if means is None else means.cpu())
    return out


def _double_copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).double()


def _to_tf32(values: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32 (10 mantissa bits), as tensor cores read conv operands."""
    bits = values.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _tf32_copy(module: torch.nn.Module) -> torch.nn.Module:
    """h_s as a GPU runs it with PyTorch's default ``torch.backends.cudnn.allow_tf32 = True``:
    weights and inputs of every convolution rounded to TF32, accumulation in float32."""
    copied = copy.deepcopy(module)
    for layer in copied.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            layer.weight.data = _to_tf32(layer.weight.data)
            layer.register_forward_pre_hook(lambda _, inputs: tuple(_to_tf32(t) for t in inputs))
    return copied


def _split(model: CodecModel, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    scales, means = model.adapter.split_entropy_parameters(params)
    return scales, means if model.adapter.spec.has_means else None


@torch.inference_mode()
def desync(model: CodecModel, path: FloatPath, scales: torch.Tensor, means: torch.Tensor | None) -> dict[str, int]:
    """Decode the float path's y strings with other parameters; count what changes."""
    gc = model.adapter.model.gaussian_conditional
    indexes = gc.build_indexes(scales)
    reference = gc.decompress(path.y_strings, path.indexes, means=path.means)
    decoded = gc.decompress(path.y_strings, indexes, means=means)
    ref_symbols = reference - (path.means if path.means is not None else 0)
    new_symbols = decoded - (means if means is not None else 0)
    return {
        "index_changes": int((indexes != path.indexes).sum()),
        "mean_changes": 0 if means is None else int((means != path.means).sum()),
        "symbol_changes": int((torch.round(new_symbols) != torch.round(ref_symbols)).sum()),
        "latent_changes": int((decoded != reference).sum()),
        "elements": int(path.indexes.numel()),
    }


def rate_and_float_path(name: str, images, encoded: list[Encoded], config: str, devices: list[str],
                        seed: int) -> dict[str, Any]:
    model = load_model(name)
    codec = LearnedCodec(model, coder_threads=1)
    reference = {item.image: item.data for item in encoded if item.config == config}
    generator = torch.Generator().manual_seed(seed)
    totals = {"pixels": 0, "compressai_bytes": 0, "ncpipe_bytes": 0, "ncpipe_container_bytes": 0,
              "float_params_ncpipe_coder_bytes": 0}
    z_hats, per_image, counts = [], [], {}
    paths = []
    for index, (image_name, pixels) in enumerate(images):
        x = stack_padded([pixels], pin=False).float().div_(255.0)
        path = float_path(model, x)
        if index == 0:
            _check_float_path_is_compressai(model, x, path)
        paths.append(path)
        z_hats.append(path.z_hat)
        data = reference[index]
        parsed = fmt.parse(data)
        container = parsed.header.size + CONTAINER_BYTES_PER_CHUNK * (1 + len(parsed.y_streams))
        z_symbols = codec.decode_symbols(data)[1].z
        h, w = pixels.shape[:2]
        row = {
            "image": image_name, "pixels": h * w,
            "compressai_bytes": sum(len(s) for s in path.y_strings + path.z_strings),
            "ncpipe_bytes": len(data), "ncpipe_container_bytes": container,
            "float_params_ncpipe_coder_bytes": ncpipe_coder_on_float_parameters(codec, path, z_symbols),
        }
        per_image.append(row)
        for key in totals:
            totals[key] += row[key]
    for index, path in enumerate(paths):
        others = z_hats[:index] + z_hats[index + 1 :]
        for label, (scales, means) in perturbations(model, path, others, devices, generator).items():
            result = desync(model, path, scales, means)
            entry = counts.setdefault(label, {"images": 0, "images_index_changed": 0, "images_mean_changed": 0,
                                              "images_desynced": 0, "images_latents_differ": 0,
                                              "index_changes": 0, "mean_changes": 0, "elements": 0})
            entry["images"] += 1
            entry["images_index_changed"] += result["index_changes"] > 0
            entry["images_mean_changed"] += result["mean_changes"] > 0
            entry["images_desynced"] += result["symbol_changes"] > 0
            entry["images_latents_differ"] += result["latent_changes"] > 0
            for key in ("index_changes", "mean_changes", "elements"):
                entry[key] += result[key]
    codec.close()
    bits = 8.0 / totals["pixels"]
    coded = totals["ncpipe_bytes"] - totals["ncpipe_container_bytes"]
    return {
        "rate": {
            "compressai_bpp": totals["compressai_bytes"] * bits,
            "ncpipe_bpp": totals["ncpipe_bytes"] * bits,
            "ncpipe_coded_bpp": coded * bits,
            "ncpipe_container_bpp": totals["ncpipe_container_bytes"] * bits,
            "float_params_ncpipe_coder_bpp": totals["float_params_ncpipe_coder_bytes"] * bits,
            "coded_vs_compressai": coded / totals["compressai_bytes"] - 1,
            "total_vs_compressai": totals["ncpipe_bytes"] / totals["compressai_bytes"] - 1,
            "integer_h_s_cost": coded / totals["float_params_ncpipe_coder_bytes"] - 1,
            "coder_difference": totals["float_params_ncpipe_coder_bytes"] / totals["compressai_bytes"] - 1,
            "ncpipe_bitstreams_from": config,
        },
        "per_image": per_image,
        "float_path_perturbations": counts,
    }


def _check_float_path_is_compressai(model: CodecModel, x: torch.Tensor, path: FloatPath) -> None:
    with torch.inference_mode():
        strings = model.adapter.model.compress(x)["strings"]
    if strings != [path.y_strings, path.z_strings]:
        raise AssertionError("the benchmark's float path no longer reproduces CompressAI's compress()")


# -- across machines -------------------------------------------------------------------------


def save_bitstreams(directory: Path, name: str, encoded: list[Encoded], images) -> None:
    out = directory / name
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for n, item in enumerate(encoded):
        file = f"{n:05d}.ncb"
        (out / file).write_bytes(item.data)
        index.append({"file": file, "image": images[item.image][0], "config": item.config,
                      "symbols_digest": item.symbols_digest, "latents_digest": item.latents_digest})
    (out / "index.json").write_text(json.dumps({"machine": machine_description(), "date": now_utc(),
                                                "bitstreams": index}, indent=1))


def check_bitstreams(directory: Path, name: str, devices: list[str], threads: list[int]) -> dict[str, Any]:
    index = json.loads((directory / name / "index.json").read_text())
    results = {}
    for device in devices:
        for t in threads:
            _set_threads(t)
            codec = _codec(load_model(name), resolve_device(device), t)
            same = sum(
                decoded_digests(codec, (directory / name / e["file"]).read_bytes())
                == (e["symbols_digest"], e["latents_digest"])
                for e in index["bitstreams"]
            )
            codec.close()
            results[f"dec {device} threads {t}"] = {"bitstreams": len(index["bitstreams"]), "identical_latents": same}
    return {"encoded_on": index["machine"], "encoded_date": index["date"], "decoded": results}


# -- driver -----------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", type=Path, help="image directory (Kodak: ../shared/data/kodak)")
    parser.add_argument("--models", nargs="*", help="registry names (default: every registry model)")
    parser.add_argument("--devices", default="cpu", help="encode and decode devices, e.g. cpu,cuda (all pairs)")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 4, 8])
    parser.add_argument("--threads", type=_ints, default=[1, 2], help="torch threads while encoding")
    parser.add_argument("--decode-threads", type=_ints, default=[1, 2])
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--qualities", type=_ints, help="quality levels of a variable-rate model "
                        "(default: its lowest, default and highest)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the ±1 ulp perturbation")
    parser.add_argument("--save-bitstreams", type=Path, help="also write every bitstream + encoder digests here")
    parser.add_argument("--check-bitstreams", type=Path, help="only decode bitstreams saved (on another machine) here")
    parser.add_argument("--out", type=Path, default=Path("out/cross_device.json"))
    args = parser.parse_args(argv)
    devices = args.devices.split(",")
    names = args.models or [ref.name for ref in list_models()]
    images = load_images(args.images, args.limit)
    report: dict[str, Any] = {
        "date": now_utc(), "machine": machine_description(), "platform": platform.platform(),
        "command": " ".join(["python", *sys.argv]), "images": f"{args.images} ({len(images)} images)",
        "models": {},
    }
    for name in names:
        print(f"{name}", file=sys.stderr)
        if args.check_bitstreams:
            report["models"][name] = {"cross_machine": check_bitstreams(args.check_bitstreams, name, devices,
                                                                        args.decode_threads)}
            continue
        started = time.perf_counter()
        qualities = model_qualities(load_model(name), args.qualities)
        decoded, encoded = decodability(name, images, devices, args.batch_sizes, args.threads, args.decode_threads,
                                        qualities)
        if args.save_bitstreams:
            save_bitstreams(args.save_bitstreams, name, encoded, images)
        _set_threads(max(args.threads))
        config = f"enc cpu batch 1 threads {max(args.threads)}"
        result = (rate_and_float_path(name, images, encoded, config, devices, args.seed) if qualities == [0]
                  else {"rate": None, "note": "variable-rate: CompressAI's compress() has no quantization steps"})
        report["models"][name] = {"decodability": decoded, **result, "seconds": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['date']}  {report['machine']}", f"images: {report['images']}", ""]
    for name, result in report["models"].items():
        lines.append(f"== {name}")
        if "cross_machine" in result:
            cross = result["cross_machine"]
            lines.append(f"  bitstreams encoded on {cross['encoded_on']} ({cross['encoded_date']})")
            for key, row in cross["decoded"].items():
                lines.append(f"  {key:40s} {row['identical_latents']}/{row['bitstreams']} identical latents")
            continue
        d = result["decodability"]
        lines.append(f"  decodability: {d['identical_latents']}/{d['bitstreams_decoded']} decodes gave the "
                     f"encoder's exact latents ({100 * d['identical_latents'] / d['bitstreams_decoded']:.1f} %); "
                     f"{d['images_with_identical_bitstreams_across_encode_configs']}/{d['images']} images got "
                     "byte-identical bitstreams from every encode configuration")
        for key, row in d["pairs"].items():
            lines.append(f"    {key:58s} {row['identical_latents']:4d}/{row['bitstreams']}")
        r = result["rate"]
        lines += [
            "  rate (bpp):",
            f"    CompressAI float compress() strings       {r['compressai_bpp']:.4f}",
            f"    same float parameters, ncpipe rANS        {r['float_params_ncpipe_coder_bpp']:.4f}  "
            f"({100 * r['coder_difference']:+.2f} % coder)",
            f"    ncpipe coded streams (integer h_s)        {r['ncpipe_coded_bpp']:.4f}  "
            f"({100 * r['integer_h_s_cost']:+.2f} % integer h_s; "
            f"{100 * r['coded_vs_compressai']:+.2f} % vs CompressAI)",
            f"    ncpipe container (header, lengths, CRCs)  {r['ncpipe_container_bpp']:.4f}",
            f"    ncpipe total                              {r['ncpipe_bpp']:.4f}  "
            f"({100 * r['total_vs_compressai']:+.2f} % vs CompressAI)",
            "  CompressAI float path under perturbation (images affected / images):",
        ]
        for label, c in result["float_path_perturbations"].items():
            lines.append(
                f"    {label:52s} index changed {c['images_index_changed']}/{c['images']}, "
                f"decode desynced {c['images_desynced']}/{c['images']}, "
                f"ŷ differs {c['images_latents_differ']}/{c['images']} "
                f"({c['index_changes']} index / {c['mean_changes']} mean changes in {c['elements']} elements)"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
