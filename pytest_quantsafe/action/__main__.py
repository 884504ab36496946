"""``python -m pytest_quantsafe.action STEP``: the composite action's steps."""

from pytest_quantsafe.action import main

raise SystemExit(main())
