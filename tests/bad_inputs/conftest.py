"""Fixtures of the bad-input suite: a folder of pre-existing outputs that no bad input may change."""

from __future__ import annotations

from pathlib import Path

import pytest

GOOD_PROFILE = {"n_total": 40, "n_refusals": 30, "dominant_prefix_share": 0.9, "unique_prefix_rate": 0.1,
                "prefix_entropy_norm": 0.2, "mean_tokens_refusal": 12.0}


@pytest.fixture()
def outputs(tmp_path: Path) -> Path:
    """Return a folder holding earlier outputs (a record, a card, a profile): hashed before and after each case."""
    out = tmp_path / "out"
    (out / "earlier").mkdir(parents=True)
    (out / "earlier" / "record.json").write_text('{"earlier": true}\n')
    (out / "card.yaml").write_text("earlier: card\n")
    (out / "profile.yaml").write_text("# earlier profile\n")
    (out / "result.json").write_text("{}\n")
    return out


@pytest.fixture()
def cache_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the completion cache's HMAC key at a per-test file."""
    path = tmp_path / "cache.key"
    monkeypatch.setenv("QUANTSAFE_CACHE_KEY_FILE", str(path))
    return path
