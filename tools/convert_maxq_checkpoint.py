"""Convert a MaxQ reference-code ResNet checkpoint to mmdet ResNet keys (for init_cfg / load_from)."""
import argparse

import torch

from mmsparse.compat import safe_load_from_local
from mmsparse.maxq.convert import convert_maxq_reference
from mmsparse.utils import atomic_write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('src', help='reference checkpoint (state dict, or a dict with "state_dict")')
    parser.add_argument('dst', help='output checkpoint for mmdet ResNet (backbone keys)')
    parser.add_argument('--keep-masks', action='store_true',
                        help='keep masks as convK.mask buffers instead of folding them into weights')
    args = parser.parse_args()
    ckpt = safe_load_from_local(args.src, 'cpu')
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else ckpt
    converted = convert_maxq_reference(state, fold=not args.keep_masks)
    atomic_write(args.dst, lambda tmp: torch.save(dict(state_dict=converted), tmp))
    print(f'wrote {len(converted)} tensors to {args.dst}')


if __name__ == '__main__':
    main()
