"""``skd shard``: image folder, CIFAR binary archive or TinyImageNet → WebDataset shards, or
index shards made elsewhere."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from skd.data.cifar_archive import is_cifar_binary_folder, list_cifar_binary
from skd.data.shard_writer import DEFAULT_MAX_PER_SHARD, SplitListing, list_image_folder_splits, write_splits
from skd.data.tinyimagenet import is_tinyimagenet, list_tinyimagenet
from skd.errors import run_command

EPILOG = """\
inputs:
  IMAGE_FOLDER/CLASS/*.jpg                       -> OUT_DIR/data-000000.tar ...
  IMAGE_FOLDER/{train,val,test}/CLASS/*.jpg      -> OUT_DIR/train/train-000000.tar ...
  cifar-10-binary.tar.gz, cifar-100-binary.tar.gz (or the extracted folder)
                                                 -> OUT_DIR/{train,test}/ (PNG images)
  tiny-imagenet-200/ (wnids.txt, train/, val/val_annotations.txt)
                                                 -> OUT_DIR/{train,val}/
Class index = position of the class folder (wnid) in sorted order; CIFAR's label bytes (fine
labels for CIFAR-100). Each output directory gets dataset.json (counts, class names, shards) and
samples.npz (labels and byte offsets).

examples:
  skd shard ~/data/CUB_200_2011/split /data/cub --max-side 320 --quality 90 --workers 8
  skd shard cifar-100-binary.tar.gz /data/cifar100
  skd shard --index-only /data/imagenet-wds/train
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="skd shard", description="Write WebDataset tar shards + dataset.json from a folder of "
        "class subfolders, a CIFAR-10/100 binary archive or TinyImageNet's folder, or (--index-only) "
        "index shards made elsewhere.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", metavar="INPUT",
                   help="folder of class subfolders (or of train/val/test folders of them), a CIFAR "
                   "binary archive, or TinyImageNet's folder")
    p.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help="where the shards are written")
    p.add_argument("--index-only", metavar="SHARD_DIR",
                   help="write dataset.json and samples.npz for the *.tar shards in SHARD_DIR "
                   "(e.g. from webdataset.ShardWriter; labels in 'cls'); sample ids follow shard "
                   "name order and position in the shard")
    p.add_argument("--max-per-shard", type=int, default=DEFAULT_MAX_PER_SHARD, metavar="N",
                   help=f"samples per shard (default {DEFAULT_MAX_PER_SHARD})")
    p.add_argument("--max-side", type=int, metavar="PX",
                   help="shrink images whose longer side exceeds PX (aspect kept)")
    p.add_argument("--quality", type=int, metavar="Q", help="re-encode every image as JPEG at quality Q")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="W",
                   help="encoding processes (default: min(8, CPUs))")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the shuffle that mixes classes across shards (default 0)")
    p.add_argument("--keep-order", action="store_true",
                   help="write samples in sorted class/file order (CIFAR: archive order) instead "
                   "(class-sorted shards; the streaming loader then sees few classes per batch)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def list_input(path: str | Path) -> tuple[str, list[SplitListing]]:
    """What ``INPUT`` is (for the report) and its splits: a file is a CIFAR binary archive; a
    folder is an extracted CIFAR archive, TinyImageNet, or else an ImageFolder."""
    path = Path(path)
    if path.is_file() or is_cifar_binary_folder(path):
        listings = list_cifar_binary(path)
        return f"CIFAR-{len(listings[0].class_names)} binary archive", listings
    if is_tinyimagenet(path):
        return "TinyImageNet folder", list_tinyimagenet(path)
    return "image folder", list_image_folder_splits(path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = not args.no_progress
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.max_per_shard < 1:
        parser.error("--max-per-shard must be >= 1")

    def run() -> int:
        if args.index_only is not None:
            if args.input or args.out_dir:
                parser.error("--index-only SHARD_DIR takes no INPUT / OUT_DIR")
            from skd.data.sample_index import index_shards
            info = index_shards(args.index_only, workers=args.workers, progress=progress)
            print(f"indexed {info.num_samples} samples, {info.num_classes} classes in "
                  f"{len(info.shards)} shards: {args.index_only}/dataset.json")
            return 0
        if not args.input or not args.out_dir:
            parser.error("give INPUT and OUT_DIR, or --index-only SHARD_DIR")
        kind, listings = list_input(args.input)
        print(f"{args.input}: {kind}")
        report = write_splits(listings, args.out_dir, max_per_shard=args.max_per_shard,
                              max_side=args.max_side, quality=args.quality, workers=args.workers,
                              progress=progress, shuffle_seed=None if args.keep_order else args.seed,
                              name=Path(args.input).name)
        for split, info in report.splits.items():
            where = os.path.join(args.out_dir, split) if split else args.out_dir
            print(f"{split or 'data'}: {info.num_samples} samples, {info.num_classes} classes, "
                  f"{len(info.shards)} shards -> {where}")
        if report.stale:
            print(f"note: {len(report.stale)} other *.tar files in the output are not listed in dataset.json "
                  f"(left from an earlier run?), e.g. {report.stale[0]}")
        if report.ignored:
            print(f"ignored {report.ignored} files without an image extension")
        if report.skipped:
            print(f"skipped {len(report.skipped)} unreadable image files:")
            for path, reason in report.skipped:
                print(f"  {path}: {reason}")
        return 0

    return run_command("skd shard", run)


if __name__ == "__main__":
    sys.exit(main())
