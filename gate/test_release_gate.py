"""The release gate: run with ``pytest gate/ --quantsafe-baseline BASE --quantsafe-candidate CAND``.

Plain pytest, no conftest: the quantsafe plugin provides the ``quant_safety``
fixture. Every test runs once per candidate (ids = artifact names); the
screening is done once per candidate and shared by all tests. The policy
(``--quantsafe-policy``, default ``default``) decides; copy this file and adapt.
External-screen manifests (``--quantsafe-manifest``) are screened the same way.
"""


def test_policy_passes(quant_safety):
    """The whole policy: band below fail_at, refusal drop, insufficient data, flags."""
    quant_safety.assert_passes()
