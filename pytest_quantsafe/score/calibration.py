"""Calibration profiles (YAML): RTSI weights, min-max ranges of |delta|, bands, provenance.

A profile is data, reviewed like code. ``load_calibration`` validates it and
refuses one without full provenance (docs/architecture.md "Calibration and failing closed"); every
error names the file, the key and, where YAML gives one, the line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from pytest_quantsafe.errors import PolicyError
from pytest_quantsafe.results import Bands, Calibration
from pytest_quantsafe.types import FEATURE_NAMES, PROTOCOL_ID

#: Keys every profile's provenance must carry.
REQUIRED_PROVENANCE: tuple[str, ...] = (
    "source_matrix_sha256",
    "n_rows",
    "n_models",
    "date",
    "tool_version",
    "is_recalibrated",
    "loocv_recall",
)

_TOP_KEYS = {"name", "protocol", "detector", "weights", "ranges", "bands", "provenance", "description"}
_WEIGHT_SUM_TOLERANCE = 1e-9


def _packaged_path(name: str) -> Path:
    base = resources.files("pytest_quantsafe") / "policies" / "calibration"
    return Path(str(base / f"{name}.yaml"))


def _resolve(ref: str | Path) -> Path:
    if isinstance(ref, Path) or "/" in str(ref) or str(ref).endswith((".yaml", ".yml")):
        return Path(ref)
    return _packaged_path(str(ref))


#: Limits of a reviewed YAML file (policy, calibration profile): far above any real one.
MAX_YAML_NODES = 20_000
MAX_YAML_DEPTH = 32


def load_yaml(text: str, source: str, what: str) -> tuple[Any, Any]:
    """Return (data, node tree) of a policy or profile; raise PolicyError for bad syntax, aliases or size.

    Anchors and aliases are refused while composing, before anything walks or
    expands the tree (an 882-byte alias bomb expands to gigabytes), and the node
    count and nesting depth are capped. The data is constructed from the checked
    node tree, so nothing parses the text twice.
    """
    import yaml

    class _Composer(yaml.SafeLoader):
        nodes = 0
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise PolicyError(f"{what} uses a YAML alias (*{event.anchor}); aliases and anchors are refused",
                                  where=f"{source} (line {event.start_mark.line + 1})",
                                  fix="write each value out in full (no &anchor / *alias)")
            event = self.peek_event()
            if getattr(event, "anchor", None):
                raise PolicyError(f"{what} defines a YAML anchor (&{event.anchor}); aliases and anchors are refused",
                                  where=f"{source} (line {event.start_mark.line + 1})",
                                  fix="write each value out in full (no &anchor / *alias)")
            self.nodes += 1
            if self.nodes > MAX_YAML_NODES or self.depth > MAX_YAML_DEPTH:
                raise PolicyError(f"{what} is too large or too deeply nested (over {MAX_YAML_NODES} nodes or "
                                  f"{MAX_YAML_DEPTH} levels)", where=f"{source} (line {event.start_mark.line + 1})",
                                  fix="a policy or calibration profile is a few dozen keys; check the file")
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    loader = _Composer(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        raise yaml_syntax_error(exc, source, what) from None
    except RecursionError:
        raise PolicyError(f"{what} is nested too deeply", where=source,
                          fix="a policy or calibration profile is a few dozen keys; check the file") from None
    finally:
        loader.dispose()
    return data, root


def _key_lines(root: Any) -> dict[str, int]:
    """Return the 1-based line of each key path ("provenance.date") in a composed YAML mapping."""
    import yaml

    lines: dict[str, int] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    sub = f"{path}.{key.value}" if path else str(key.value)
                    lines[sub] = key.start_mark.line + 1
                    walk(value, sub)

    walk(root, "")
    return lines


class _Where:
    """Builds ``where=`` strings naming the file, the key and its line."""

    def __init__(self, source: str, root: Any) -> None:
        self.source = source
        self.lines = _key_lines(root)

    def __call__(self, key: str) -> str:
        line = self.lines.get(key) or self.lines.get(key.split(".")[0])
        return f"{self.source}: key {key}" + (f" (line {line})" if line else "")


def _finite(value: Any, key: str, where: _Where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise PolicyError(f"{key} must be a finite number, got {value!r}", where=where(key),
                          fix="write a plain decimal number")
    return float(value)


def calibration_from_mapping(data: Any, source: str = "<calibration>", root: Any = None) -> Calibration:
    """Return a validated Calibration from parsed YAML data (``source`` names it in errors, ``root``
    is the composed node tree ``load_yaml`` returned, for line numbers)."""
    where = _Where(source, root)
    if not isinstance(data, Mapping):
        raise PolicyError("a calibration profile must be a YAML mapping", where=source,
                          fix="see pytest_quantsafe/policies/calibration/default.yaml for the layout")
    unknown = sorted(set(map(str, data)) - _TOP_KEYS)
    if unknown:
        raise PolicyError(f"unknown key {unknown[0]!r} in calibration profile", where=where(unknown[0]),
                          fix=f"allowed keys: {', '.join(sorted(_TOP_KEYS))}")
    for key in ("weights", "ranges", "provenance"):
        if key not in data:
            raise PolicyError(f"calibration profile lacks {key!r}", where=f"{source}: key {key}",
                              fix="a profile needs weights, ranges and provenance; "
                              "write one with `quantsafe calibrate`")
    protocol = str(data.get("protocol", PROTOCOL_ID))
    if protocol != PROTOCOL_ID:
        raise PolicyError(f"profile measured with protocol {protocol!r}, this tool measures {PROTOCOL_ID!r}",
                          where=where("protocol"), fix="recalibrate under this protocol")

    weights_raw, ranges_raw, prov = data["weights"], data["ranges"], data["provenance"]
    for key, block in (("weights", weights_raw), ("ranges", ranges_raw)):
        if not isinstance(block, Mapping) or set(map(str, block)) != set(FEATURE_NAMES):
            got = sorted(map(str, block)) if isinstance(block, Mapping) else block
            raise PolicyError(f"{key} must name exactly the four features, got {got}", where=where(key),
                              fix=f"use keys {', '.join(FEATURE_NAMES)}")
    weights = {f: _finite(weights_raw[f], f"weights.{f}", where) for f in FEATURE_NAMES}
    if any(w < 0 for w in weights.values()):
        raise PolicyError("weights must be >= 0", where=where("weights"), fix="weights are |r| normalized")
    if abs(sum(weights.values()) - 1.0) > _WEIGHT_SUM_TOLERANCE:
        raise PolicyError(f"weights sum to {sum(weights.values())!r}, not 1", where=where("weights"),
                          fix="normalize the weights so they sum to 1")
    ranges: dict[str, tuple[float, float]] = {}
    for f in FEATURE_NAMES:
        pair = ranges_raw[f]
        key = f"ranges.{f}"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise PolicyError(f"{key} must be [lo, hi]", where=where(key), fix="write two numbers: [lo, hi]")
        lo, hi = _finite(pair[0], key, where), _finite(pair[1], key, where)
        if lo < 0 or hi <= lo:
            raise PolicyError(f"{key} must satisfy 0 <= lo < hi, got [{lo}, {hi}]", where=where(key),
                              fix="ranges are min/max of |delta| over the calibration matrix")
        ranges[f] = (lo, hi)
    bands_raw = data.get("bands", {"moderate": 0.10, "high": 0.40})
    if not isinstance(bands_raw, Mapping) or set(map(str, bands_raw)) != {"moderate", "high"}:
        raise PolicyError("bands must have exactly 'moderate' and 'high'", where=where("bands"),
                          fix="e.g. bands: {moderate: 0.10, high: 0.40}")
    moderate = _finite(bands_raw["moderate"], "bands.moderate", where)
    high = _finite(bands_raw["high"], "bands.high", where)
    if not 0.0 < moderate < high <= 1.0:
        raise PolicyError(f"bands must satisfy 0 < moderate < high <= 1, got {moderate}, {high}",
                          where=where("bands"), fix="band cutoffs rise: LOW < moderate <= MODERATE < high")
    if not isinstance(prov, Mapping):
        raise PolicyError("provenance must be a mapping", where=where("provenance"),
                          fix=f"give {', '.join(REQUIRED_PROVENANCE)}")
    missing = [k for k in REQUIRED_PROVENANCE if prov.get(k) in (None, "")]
    if missing:
        raise PolicyError(f"calibration provenance lacks {missing[0]!r}; a profile without provenance is refused",
                          where=where("provenance"),
                          fix=f"provenance needs {', '.join(REQUIRED_PROVENANCE)} (`quantsafe calibrate` "
                          "writes them)")
    if not isinstance(prov["is_recalibrated"], bool):
        raise PolicyError("provenance.is_recalibrated must be true or false",
                          where=where("provenance.is_recalibrated"), fix="write true or false")
    _validate_schema(data, where)
    name = str(data.get("name") or Path(source).stem)
    return Calibration(
        name=name,
        weights=weights,
        ranges=ranges,
        bands=Bands(moderate=moderate, high=high),
        provenance=dict(prov),
        detector=str(data.get("detector", "pattern.v1")),
        protocol=protocol,
    )


def calibration_schema() -> dict[str, Any]:
    """Return the shipped JSON Schema of a calibration profile (``schemas/calibration.schema.json``)."""
    text = (resources.files("pytest_quantsafe") / "schemas" / "calibration.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def _validate_schema(data: Mapping[str, Any], where: _Where) -> None:
    # After the checks above (which give the domain-worded messages): what is left, the schema names.
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(calibration_schema()).iter_errors(data),
                    key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        err = errors[0]
        key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise PolicyError(f"{key}: {err.message}", where=where(key),
                          fix=f"see the calibration schema ({err.validator} rule) and "
                          "pytest_quantsafe/policies/calibration/default.yaml")


def yaml_syntax_error(exc: Exception, source: str, what: str) -> PolicyError:
    """Return the PolicyError for a YAML file that does not parse, naming the line when YAML knows it."""
    mark = getattr(exc, "problem_mark", None)
    line = f" (line {mark.line + 1})" if mark is not None else ""
    return PolicyError(f"{what} is not valid YAML: {getattr(exc, 'problem', None) or exc}",
                       where=f"{source}{line}", fix="fix the YAML syntax")


def load_calibration(ref: str | Path = "default") -> Calibration:
    """Return the calibration named ``ref`` (a packaged profile name or a YAML path), validated."""
    path = _resolve(ref)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        packaged = sorted(p.stem for p in _packaged_path("default").parent.glob("*.yaml"))
        raise PolicyError(f"no calibration profile {str(ref)!r}", where=str(path),
                          fix=f"give a YAML path or a packaged name ({', '.join(packaged)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read calibration profile: {exc}", where=str(path),
                          fix="check the path and that it is UTF-8 YAML") from None
    data, root = load_yaml(text, str(path), "calibration profile")
    return calibration_from_mapping(data, source=str(path), root=root)


def dump_calibration(cal: Calibration) -> str:
    """Return the profile as YAML that ``load_calibration`` reads back to an equal Calibration."""
    import yaml

    data = {
        "name": cal.name,
        "protocol": cal.protocol,
        "detector": cal.detector,
        "weights": {f: float(cal.weights[f]) for f in FEATURE_NAMES},
        "ranges": {f: [float(cal.ranges[f][0]), float(cal.ranges[f][1])] for f in FEATURE_NAMES},
        "bands": {"moderate": cal.bands.moderate, "high": cal.bands.high},
        "provenance": dict(cal.provenance),
    }
    header = ("# quantsafe RTSI calibration profile (protocol quantsafe.refusal-features.v1).\n"
              "# weights = |Pearson r| of each feature's delta with the refusal-rate delta, normalized;\n"
              "# ranges = [min, max] of |delta| over the calibration matrix.\n")
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)
