"""Thin-pool semantics on top of persistent-data: reading, checking, dumping, exporting."""
