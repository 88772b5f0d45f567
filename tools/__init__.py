"""Scripts run from a checkout (`python tools/NAME.py`); a package only so tests can import their functions."""
