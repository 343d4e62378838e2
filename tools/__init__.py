"""Command-line tools (scripts); a package so the experiment and tests can import their
functions."""
