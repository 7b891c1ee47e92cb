"""Offline stages: ShapesWorld, the tiny LLaVA, training recipes and evaluation."""
