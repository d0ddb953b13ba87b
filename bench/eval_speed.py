"""How fast ``clipforge eval`` embeds a benchmark: 10,000 synthetic 64 px images, the demo model, this CPU.

    .venv/bin/python bench/eval_speed.py                      # writes the images once to /tmp/clipforge-eval-bench
    .venv/bin/python bench/eval_speed.py --workers 1 --threads 1 --amp

The set is a CLIP_benchmark WebDataset directory (two shards, six shape classes); the model is
configs/models/tiny-rn-64.json with random weights (speed does not depend on them). It times the
whole zero-shot classification as a suite runs it (tar index, decoding in DataLoader workers,
embedding in batches, the text classifier, metrics), then decoding alone and the image tower
alone, and prints one JSON line. Other processes on the machine slow it down: the load average is
printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `clipforge eval` sets it (see clipforge.cli.main)

import torch  # noqa: E402 — after the OpenMP setting, which torch reads when it loads

from clipforge.data import synthetic  # noqa: E402
from clipforge.data.shards import write_tar  # noqa: E402
from clipforge.evaluation import OpenClipEncoder, benchmark_loader, load_benchmark, load_suite, run_suite  # noqa: E402
from clipforge.models import ModelConfig, build_model  # noqa: E402

TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}.", "a {c}.", "a picture of a {c}."]


def _samples(shard: int, per_shard: int, image_size: int):
    for index in range(shard * per_shard, (shard + 1) * per_shard):
        rng = synthetic.sample_rng(0, "shapes", index)
        scene = synthetic.sample_scene(rng, heldout="any", kind="group")
        image = synthetic.render(scene, rng, image_size)
        label = list(synthetic.SHAPES).index(scene.objects[0].shape)
        yield {"__key__": f"s{index:07d}", "jpg": synthetic.encode_jpeg(image), "cls": str(label)}


def _write_shard(root: Path, shard: int, per_shard: int, image_size: int) -> int:
    return write_tar(root / "test" / f"{shard}.tar", _samples(shard, per_shard, image_size))


def write_set(root: Path, num_images: int, image_size: int, num_shards: int = 2) -> None:
    if (root / "test" / "nshards.txt").is_file():
        return
    per_shard = num_images // num_shards
    with ProcessPoolExecutor(max_workers=min(num_shards, os.cpu_count() or 1)) as pool:
        list(
            pool.map(
                _write_shard,
                [root] * num_shards,
                range(num_shards),
                [per_shard] * num_shards,
                [image_size] * num_shards,
            )
        )
    (root / "classnames.txt").write_text("\n".join(synthetic.SHAPES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (root / "test" / "nshards.txt").write_text(f"{num_shards}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/clipforge-eval-bench", help="where the benchmark set is (written once)")
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images")
    parser.add_argument("--threads", type=int, help="torch threads in the main process (default: torch's)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = Path(args.data) / f"shapes-{args.num_images}-{args.image_size}px"
    start = time.perf_counter()
    write_set(root, args.num_images, args.image_size)
    written = time.perf_counter() - start
    suite_path = root / "suite.yaml"
    suite_path.write_text(
        f"name: speed\ndatasets:\n  - {{name: shapes, task: zeroshot_classification, path: {root}}}\n"
    )

    torch.manual_seed(0)
    built = build_model(ModelConfig(name="tiny-rn-64"))
    encoder = OpenClipEncoder(built.model.eval(), "cpu", torch.bfloat16 if args.amp else None)
    start = time.perf_counter()
    results = run_suite(
        encoder, built.tokenizer, built.eval_transform, load_suite(suite_path), args.batch_size, args.workers
    )
    total = time.perf_counter() - start

    benchmark = load_benchmark(root)
    start = time.perf_counter()
    for _ in benchmark_loader(benchmark, built.eval_transform, args.batch_size, args.workers):
        pass
    decode = time.perf_counter() - start
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    encoder.encode_image(images)  # warm-up
    start = time.perf_counter()
    num_batches = -(-args.num_images // args.batch_size)
    for _ in range(num_batches):
        encoder.encode_image(images)
    tower = time.perf_counter() - start

    print(
        json.dumps(
            {
                "images": results["shapes"]["num_samples"],
                "image_size": args.image_size,
                "seconds": round(total, 2),
                "images_per_s": round(results["shapes"]["num_samples"] / total, 1),
                "decode_only_s": round(decode, 2),
                "image_tower_only_s": round(tower, 2),
                "workers": args.workers,
                "torch_threads": torch.get_num_threads(),
                "amp": args.amp,
                "batch_size": args.batch_size,
                "cpus": os.cpu_count(),
                "load_average_1min": round(os.getloadavg()[0], 2),
                "set_written_s": round(written, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
