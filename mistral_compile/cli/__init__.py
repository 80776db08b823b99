"""Command-line interface: argument parsing only; the work is done by library functions."""
