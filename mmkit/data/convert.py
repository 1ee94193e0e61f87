"""python -m mmkit.data.convert SRC --image-folder DIR --to webdataset|arrow OUT [--shard-size 1GB]

Convert a LLaVA JSON / JSONL dataset (records + an image folder) to WebDataset tar shards or to a Hugging Face
``datasets`` directory, images embedded, so that training indexes it without reading it into memory.

Every record is checked on the way by the rules training applies to LLaVA JSON (mmkit.data.records.check_record:
structure, roles, answers, <image> count, image files present and inside the image folder; with --template, its
exchange limit), and each image must decode; a bad record is skipped with training's warning and counted. The
summary of what was skipped is printed and written to OUT/conversion.json. OUT must not exist or be empty; it is
written atomically (a temporary sibling renamed into place at the end).

Output:
  webdataset  OUT/shard-000000.tar, ... (a shard is closed once its file reaches --shard-size, tar headers and
              padding counted: 1 KB at least per text-only record) + SHARD.tar.idx.npz, the index
              training reads samples by (mmkit.data.shards); member KEY.json = the record, KEY.N.EXT = image N
              as its original bytes.
  arrow       OUT = datasets.Dataset.save_to_disk (data-*.arrow files of at most --shard-size), columns id,
              image (datasets.Image, or a list of them when a record has several), conversations, and
              data_source when the source records have it: the LLaVA-OneVision layout.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from mmkit.data.records import (
    DataError,
    SkipCounter,
    _images_of,
    _iter_raw,
    _record_id,
    _reject,
    _template_obj,
    _word_count,
    check_record,
)
from mmkit.files import DirectoryNotEmpty, atomic_dir, check_writable_dir
from mmkit.processing.budget import RECIPE_KEYS, ImageLimitError, ImageLimits

__all__ = ["main", "convert", "parse_size"]

log = logging.getLogger("mmkit.data")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def parse_size(text: str) -> int:
    """``1GB`` / ``500MB`` / ``256MiB`` / ``1e9`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m[2].upper() not in _UNITS:
        raise ValueError(f"--shard-size: cannot read {text!r} (examples: 1GB, 500MB, 256MiB)")
    n = int(float(m[1]) * _UNITS[m[2].upper()])
    if n <= 0:
        raise ValueError(f"--shard-size: must be positive, got {text!r}")
    return n


def _valid_records(src: Path, image_folder: Path, template, skips: SkipCounter, max_warnings: int = 20):
    """``(record, [(image bytes, extension)])`` of every record that passes training's checks, in file order."""
    tpl = _template_obj(template)
    limits = ImageLimits.from_config(None, RECIPE_KEYS)
    warned = 0
    for where, label, rec, err in tqdm(_iter_raw(src), desc=f"converting {src.name}", unit=" records"):
        rid = _record_id(rec, label)
        problem = ("malformed_json", err) if err is not None else check_record(rec, image_folder, "<image>",
                                                                                True, tpl)
        images = []
        if problem is None:
            for p in _images_of(rec):
                full = image_folder / p
                data = full.read_bytes()
                try:
                    with Image.open(full) as im:  # the header only: the format
                        fmt = im.format
                    # decoded as training decodes it, data.image_limits' defaults checked from the header first
                    limits.open(data)
                except ImageLimitError as e:
                    problem = ("image_too_large", f"{full}: {e}")
                    break
                except Exception as e:  # any decoder error of a bad file, as training reports it
                    problem = ("corrupt_image", f"{full}: {type(e).__name__}: {e}")
                    break
                images.append((data, _FORMAT_EXT.get(fmt, Path(p).suffix.lstrip(".").lower() or "img")))
        if problem is not None:
            warned += 1
            _reject(where, rid, problem[0], problem[1], False, skips, warn=warned <= max_warnings)
            continue
        yield rec, images


def _normalized(rec: dict, k: int) -> dict:
    out = {"id": str(rec["id"]) if rec.get("id") is not None else f"#{k}",
           "conversations": [{"from": str(t.get("from", t.get("role"))), "value": t.get("value", t.get("content"))}
                             for t in rec["conversations"]]}
    if rec.get("image") is not None:
        out["image"] = rec["image"]
    if rec.get("data_source") is not None:
        out["data_source"] = str(rec["data_source"])
    return out


def _write_shards(records, out: Path, shard_size: int) -> int:
    import numpy as np  # only the shard writer needs it
    import webdataset as wds  # optional dependency (mmkit[data]), only for --to webdataset

    from mmkit.data.shards import scan_shard, write_index  # imports webdataset (optional)

    words, images, n = [], [], 0
    shard, sink, f = 0, None, None
    try:
        for rec, imgs in records:
            if sink is None:
                f = open(out / f"shard-{shard:06d}.tar", "wb")  # noqa: SIM115  (closed below, rotated by size)
                sink = wds.TarWriter(f)
            sample = {"__key__": f"{n:09d}", "json": json.dumps(_normalized(rec, n)).encode()}
            for j, (data, ext) in enumerate(imgs):
                sample[f"{j}.{ext}"] = data
            sink.write(sample)
            words.append(_word_count(rec["conversations"]))
            images.append(len(imgs))
            n += 1
            if sink.tarstream.offset >= shard_size:  # bytes written so far, tar headers and padding included
                sink.close()
                f.close()
                sink, shard = None, shard + 1
    finally:
        if sink is not None:
            sink.close()
            f.close()
    first = 0
    for shard in sorted(out.glob("*.tar")):
        offsets, entries = scan_shard(shard)
        last = first + len(offsets)
        write_index(shard, offsets, entries, np.asarray(words[first:last]), np.asarray(images[first:last]))
        first = last
    if first != n:
        raise RuntimeError(f"{out}: the shards hold {first} samples, {n} were written")
    return n


def _write_arrow(src: Path, image_folder: Path, template, skips: SkipCounter, out: Path, shard_size: int) -> int:
    import datasets  # optional dependency (mmkit[data]), heavy, only for --to arrow

    multi, sources, any_image = False, False, False  # a first pass over the records (no image read): the schema
    for _, _, rec, err in _iter_raw(src):
        if err is None and isinstance(rec, dict):
            n_images = len(_images_of(rec) or [])
            multi, any_image = multi or n_images > 1, any_image or n_images > 0
            sources = sources or rec.get("data_source") is not None
    image = datasets.Sequence(datasets.Image()) if multi else datasets.Image()
    feats = {"id": datasets.Value("string"), "image": image,
             "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}]}
    if sources:
        feats["data_source"] = datasets.Value("string")
    features = datasets.Features(feats)
    counter = {"n": 0}

    def rows():
        for rec, imgs in _valid_records(src, image_folder, template, skips):
            norm = _normalized(rec, counter["n"])
            paths = _images_of(rec)
            cells = [{"bytes": data, "path": p} for (data, _), p in zip(imgs, paths)]
            row = {"id": norm["id"], "conversations": norm["conversations"],
                   "image": cells if multi else (cells[0] if cells else None)}
            if sources:
                row["data_source"] = norm.get("data_source")
            counter["n"] += 1
            yield row

    with tempfile.TemporaryDirectory(prefix=".convert-cache-", dir=out.parent) as cache:
        # record batches of 100 rows (datasets' default with images) make a text-only table mostly batch
        # metadata, which every reader walks through when it maps the file; 10,000 rows when there is no image
        ds = datasets.Dataset.from_generator(rows, features=features, cache_dir=cache,
                                             writer_batch_size=None if any_image else 10_000)
        ds.save_to_disk(str(out), max_shard_size=shard_size)
        n = len(ds)
        del ds
    return n


def convert(src: str | Path, image_folder: str | Path | None, to: str, out: str | Path, shard_size: int = 10**9,
            template: str | None = None) -> dict:
    """Convert ``src`` into ``out`` (see the module docstring); returns the summary written to conversion.json."""
    src, out = Path(src), Path(out)
    folder = Path(image_folder) if image_folder is not None else src.parent
    if not src.is_file():
        raise DataError(str(src), None, "no_file")
    skips = SkipCounter()
    with atomic_dir(out) as tmp:
        if to == "webdataset":
            n = _write_shards(_valid_records(src, folder, template, skips), tmp, shard_size)
        elif to == "arrow":
            n = _write_arrow(src, folder, template, skips, tmp, shard_size)
        else:
            raise ValueError(f"--to: unknown output {to!r}; choices: webdataset, arrow")
        summary = {"source": str(src), "image_folder": str(folder), "to": to, "records_written": n,
                   "records_skipped": skips.total, "skipped": skips.to_dict(), "template": template}
        (tmp / "conversion.json").write_text(json.dumps(summary, indent=1))
    summary["text"] = skips.summary(str(src))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmkit.data.convert", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="LLaVA JSON (a list of records) or JSONL file")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--image-folder", help="what the records' image paths are relative to (default: SRC's directory)")
    p.add_argument("--to", required=True, choices=["webdataset", "arrow"], help="output kind")
    p.add_argument("--shard-size", default="1GB", help="largest shard / Arrow file (default 1GB; e.g. 500MB)")
    p.add_argument("--template", help="also check the template's exchange limit (e.g. plain: one exchange)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        size = parse_size(args.shard_size)
        check_writable_dir(args.out)  # before any work: never write into a folder that holds something
        summary = convert(args.src, args.image_folder, args.to, args.out, size, args.template)
    except (DirectoryNotEmpty, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary["text"])
    print(f"wrote {summary['records_written']} records to {args.out} ({args.to}); skipped "
          f"{summary['records_skipped']} (see {Path(args.out) / 'conversion.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
