"""Qwen3Guard middleware core."""
