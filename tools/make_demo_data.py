"""Generate the synthetic COCO demo dataset (skipped when an identical one already exists)."""
import argparse
import json
import time

from mmsparse.datasets import make_demo_coco


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Generate the synthetic COCO shapes dataset')
    parser.add_argument('--out', default='data/demo_coco', help='output directory')
    parser.add_argument('--num-train', type=int, default=300, help='number of training images')
    parser.add_argument('--num-val', type=int, default=60, help='number of validation images')
    parser.add_argument('--img-size', type=int, default=320, help='nominal image side in pixels')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    summary = make_demo_coco(args.out, num_train=args.num_train, num_val=args.num_val, img_size=args.img_size,
                             seed=args.seed)
    print(json.dumps(summary, indent=2))
    print(f'{"generated" if summary["generated"] else "up to date"} in {time.perf_counter() - start:.1f} s')


if __name__ == '__main__':
    main()
