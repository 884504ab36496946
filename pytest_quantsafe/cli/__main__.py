"""``python -m pytest_quantsafe.cli``: the ``quantsafe`` command."""

from pytest_quantsafe.cli import run

run()
