"""``python -m pytest_quantsafe.zoo``: fetch or build the models of a set-up profile."""

from __future__ import annotations

import argparse
import logging
import sys

from pytest_quantsafe.errors import QuantSafeError
from pytest_quantsafe.zoo import (
    HF_QUANTS,
    MODELS,
    PROFILES,
    QUANT_FTYPES,
    VARIANT_PROFILES,
    build_variant,
    fetch,
)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``fetch`` or ``build`` a profile's models, or print one model's ``path``."""
    parser = argparse.ArgumentParser(prog="python -m pytest_quantsafe.zoo")
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch")
    f.add_argument("--profile", default="test", choices=sorted(PROFILES))
    b = sub.add_parser("build", help="build (or reuse) the quantization ladder of a profile, or one rung")
    b.add_argument("--profile", default="test", choices=sorted(VARIANT_PROFILES))
    b.add_argument("--source", help="one packaged model (name or qwen/smollm2) instead of the profile")
    b.add_argument("--quant", choices=sorted(QUANT_FTYPES) + sorted(HF_QUANTS),
                   help="the rung to build with --source (GPTQ-W4 / AWQ-W4: an HF checkpoint folder)")
    p = sub.add_parser("path")
    p.add_argument("name", choices=sorted(MODELS))
    args = parser.parse_args(argv)
    # long builds (the refuser fine-tune) report progress through logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        if args.cmd == "fetch":
            for name in PROFILES[args.profile]:
                print(f"{name}: {fetch(name)}", file=sys.stderr)
        elif args.cmd == "build":
            if bool(args.source) != bool(args.quant):
                parser.error("--source and --quant go together")
            rungs = ((args.source, args.quant),) if args.source else VARIANT_PROFILES[args.profile]
            for source, quant in rungs:
                print(f"{source} {quant}: {build_variant(source, quant)}", file=sys.stderr)
        else:
            print(fetch(args.name))
    except QuantSafeError as exc:
        print(exc.diagnostics(), file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
