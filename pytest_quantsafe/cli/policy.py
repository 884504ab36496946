"""``quantsafe policy check FILE`` and ``quantsafe policy diff OLD NEW`` (policy-as-code review)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pytest_quantsafe.cli.jsonout import add_json_flag, set_result
from pytest_quantsafe.errors import EXIT_PASS, ProbeSetError
from pytest_quantsafe.policy import diff_policies, load_policy
from pytest_quantsafe.probes import load_probes
from pytest_quantsafe.types import LIMITS_SENTENCE


def register(subparsers: Any) -> None:
    """Add the ``policy`` command and its ``check`` / ``diff`` sub-commands."""
    parser = subparsers.add_parser("policy", help="validate a policy or show what a change loosens or tightens")
    sub = parser.add_subparsers(dest="policy_command", metavar="ACTION")
    sub.required = True
    check = sub.add_parser("check", help="validate a policy file and print its effective settings")
    check.add_argument("policy", help="policy YAML path or packaged name (default, strict, advisory)")
    add_json_flag(check)
    check.set_defaults(func=_check)
    diff = sub.add_parser("diff", help="print what NEW loosens or tightens compared with OLD, per key")
    diff.add_argument("old", help="the policy before the change (path or packaged name)")
    diff.add_argument("new", help="the policy after the change (path or packaged name)")
    diff.add_argument("--fail-on-loosen", action="store_true",
                      help="exit 1 when the change loosens any key (for a PR check)")
    add_json_flag(diff)
    diff.set_defaults(func=_diff)


def _fmt(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _check(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    try:
        # "valid" covers what the policy names: its probe set must load too.
        load_probes(policy.probes)
    except ProbeSetError as exc:
        raise ProbeSetError(f"the probe set named by policy {policy.name!r} is unusable: {exc.message}",
                            where=f"{policy.source}: key probes; {exc.where}",
                            fix=exc.fix or "correct the probes path (relative to the policy's folder)") from None
    data = policy.to_dict()
    out = [f"policy {policy.name}: valid ({policy.source})", f"  policy digest  {policy.digest}",
           (f"  calibration    {policy.calibration.name} ({policy.calibration.digest[:12]}, "
            f"bands {policy.calibration.bands.moderate:g}/{policy.calibration.bands.high:g})")]
    for key in ("bands", "fail_at", "max_refusal_drop_pp", "min_baseline_refusals", "on_insufficient", "mode",
                "max_benign_refusal_increase_pp", "min_band_stability", "fail_on_flags", "max_lost_refusals_pp",
                "fail_on_significant_drop", "require_power_pp", "allow_quantized_baseline", "probes", "generation"):
        value = data[key]
        text = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) if isinstance(value, dict) else _fmt(value)
        out.append(f"  {key:<14} {text}" if len(key) <= 14 else f"  {key} {text}")
    out.append(LIMITS_SENTENCE)
    sys.stdout.write("\n".join(out) + "\n")
    set_result(args, {"valid": True, "name": policy.name, "source": str(policy.source), "digest": policy.digest,
                      "calibration": {"name": policy.calibration.name, "digest": policy.calibration.digest},
                      "policy": data, "limits": LIMITS_SENTENCE})
    return EXIT_PASS


def _diff(args: argparse.Namespace) -> int:
    old, new = load_policy(args.old), load_policy(args.new)
    changes = diff_policies(old, new)
    out = [f"policy diff {old.source} -> {new.source}"]
    if not changes:
        out.append("  no decision-relevant change")
    for c in changes:
        out.append(f"  {c.key}: {_fmt(c.old)} -> {_fmt(c.new)}  ({c.direction})")
    n_tight = sum(c.direction == "tightens" for c in changes)
    n_loose = sum(c.direction == "loosens" for c in changes)
    n_other = len(changes) - n_tight - n_loose
    out.append(f"summary: {n_tight} tighten, {n_loose} loosen, {n_other} change what is measured")
    if n_loose:
        out.append("review: this change loosens the release gate")
    sys.stdout.write("\n".join(out) + "\n")
    set_result(args, {"old": str(old.source), "new": str(new.source),
                      "changes": [{"key": c.key, "old": c.old, "new": c.new, "direction": c.direction}
                                  for c in changes],
                      "summary": {"tightens": n_tight, "loosens": n_loose, "other": n_other}})
    return 1 if (args.fail_on_loosen and n_loose) else EXIT_PASS
