"""Training and evaluation of the default model bundle shipped in ``engine/default_bundle``.

Not part of the installed engine: these scripts run from the repository root (``python -m training.X``).
"""
