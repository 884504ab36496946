"""Sub-commands of the ``quantsafe`` CLI, one module each (see ``cli.py``)."""
