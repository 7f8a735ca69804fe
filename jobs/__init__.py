"""Ray job entry points (``python -m jobs.<step> --config X.yaml``) and the ``freezeray`` CLI."""
