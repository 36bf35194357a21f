"""Objectives: losses as pure functions of model outputs (no training, data or CLI)."""
