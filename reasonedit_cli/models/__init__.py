"""Bundled models (see docs/demo_vlm.md)."""
