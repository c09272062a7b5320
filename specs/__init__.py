"""Shipped adapter specs (package data): one YAML file per variant and schema.json."""
