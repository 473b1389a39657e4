"""Shared by the kvstore-cli tests."""
from __future__ import annotations


def one_error_line(err: str, name: str) -> str:
    """The one stderr line kvstore-cli prints for a typed error ``name``."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"kvstore-cli: {name}: "), err
    return lines[0]
