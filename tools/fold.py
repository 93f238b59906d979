"""Fold a compressed (mmsparse) checkpoint into a plain mmdet checkpoint + config, or verify one.

Fold (writes ``DIR/<name>.pth`` and ``DIR/<name>.py``, atomically, after verifying every pattern)::

    python tools/fold.py CONFIG CHECKPOINT --out-dir DIR [--name NAME] [--compressed] \
        [--cfg-options k=v ...]

Report a training checkpoint's layers (pattern or bit widths, share of zeros) without folding::

    python tools/fold.py CONFIG CHECKPOINT --report

Verify any checkpoint without writing (patterns from its fold meta, or given)::

    python tools/fold.py --verify CHECKPOINT
    python tools/fold.py --verify CHECKPOINT --pattern 1:16 --layers 'backbone\\.layer.*conv\\d'
    python tools/fold.py --verify CHECKPOINT --patterns-json layers.json   # {"layer": "2:4", ...}

Exit status: 0 on success, 1 when a layer breaks its declared pattern (the message names the layer and
block) or a tensor holds NaN/inf (named, with the count; folding then writes nothing), 2 on usage
errors.
"""
import argparse
import json
import re
import sys

from mmengine.config import DictAction


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Fold or verify an mmsparse checkpoint')
    parser.add_argument('config', nargs='?', help='mmsparse config the checkpoint was trained with')
    parser.add_argument('checkpoint', nargs='?', help='compressed checkpoint to fold')
    parser.add_argument('--out-dir', help='write the folded checkpoint and plain config here')
    parser.add_argument('--name', help='stem of the written files (default: <checkpoint>_folded)')
    parser.add_argument('--compressed', action='store_true',
                        help='also write <name>.safetensors in the N:M storage format and print sizes')
    parser.add_argument('--report', action='store_true',
                        help='print the per-layer report of CONFIG + CHECKPOINT, write nothing')
    parser.add_argument('--verify', metavar='CHECKPOINT', help='verify this checkpoint, write nothing')
    parser.add_argument('--pattern', help='with --verify: N:M pattern for the layers in --layers')
    parser.add_argument('--layers', default=r'.*',
                        help='with --pattern: regex of layer names (default: every 2-D/4-D weight '
                        'whose input dimension is divisible by M)')
    parser.add_argument('--patterns-json', help='with --verify: json file {layer: "N:M"}')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value pairs')
    args = parser.parse_args(argv)
    if args.verify is None and (args.config is None or args.checkpoint is None):
        parser.error('give CONFIG and CHECKPOINT to fold, or --verify CHECKPOINT')
    if args.verify is None and args.out_dir is None and not args.report:
        parser.error('--out-dir is required to fold (use --verify to check without writing)')
    return args


def _patterns_from_args(args, state) -> dict:
    if args.patterns_json:
        with open(args.patterns_json) as f:
            return json.load(f)
    if args.pattern is None:
        return None
    from mmsparse.core import NMPattern
    m = NMPattern.parse(args.pattern).m
    regex = re.compile(args.layers)
    patterns = {}
    for key, value in state.items():
        if (key.endswith('.weight') and value.dim() in (2, 4) and value.shape[1] % m == 0
                and regex.fullmatch(key[:-len('.weight')])):
            patterns[key[:-len('.weight')]] = args.pattern
    return patterns


def main(argv=None) -> int:
    args = parse_args(argv)
    import mmsparse  # noqa: F401  registers mmsparse's layers and its safe checkpoint loader
    from mmsparse.core import format_report
    from mmsparse.export import PatternViolationError, fold_checkpoint, verify_checkpoint

    if args.verify is not None:
        from mmengine.runner.checkpoint import CheckpointLoader
        patterns = None
        if args.pattern or args.patterns_json:
            ckpt = CheckpointLoader.load_checkpoint(args.verify, map_location='cpu')
            patterns = _patterns_from_args(args, ckpt.get('state_dict', ckpt))
        try:
            violations, report = verify_checkpoint(args.verify, patterns)
        except (ValueError, KeyError) as err:
            print(f'error: {err}', file=sys.stderr)
            return 2
        print(format_report(report))
        if violations:
            print(str(PatternViolationError(violations)), file=sys.stderr)
            return 1
        print(f'OK: {args.verify} satisfies its declared patterns and holds no NaN/inf')
        return 0

    if args.report:
        from mmsparse.core import model_report
        from mmsparse.export.fold import build_model, load_source_checkpoint
        model = build_model(args.config, args.cfg_options)
        try:
            load_source_checkpoint(model, args.checkpoint)
        except RuntimeError as err:
            print(f'error: {err}', file=sys.stderr)
            return 2
        print(format_report(model_report(model)))
        return 0

    try:
        result = fold_checkpoint(args.config, args.checkpoint, args.out_dir, args.cfg_options,
                                 out_name=args.name)
    except (PatternViolationError, FloatingPointError) as err:
        print(f'refused to fold {args.checkpoint}: {err}', file=sys.stderr)
        return 1
    print(format_report(result.report))
    print(f'folded checkpoint: {result.checkpoint}\nplain config:      {result.config}')
    if args.compressed:
        import torch
        from mmsparse.export.compressed import save_compressed, storage_sizes
        state = torch.load(result.checkpoint, map_location='cpu', weights_only=True)
        path = result.checkpoint[:-len('.pth')] + '.safetensors'
        save_compressed(path, state['state_dict'], result.specs, state['meta'])
        print(storage_sizes(state['state_dict'], result.specs).format())
        print(f'compressed checkpoint (N:M values + indices, BSR blocks, integer codes): {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
