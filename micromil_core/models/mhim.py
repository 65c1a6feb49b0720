"""Placeholder: being written this session (issue 6)."""
