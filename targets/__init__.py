"""Targets: one module each, registered in ``base.BUILTIN`` by a single line."""
