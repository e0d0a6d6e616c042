"""Rank planning: pure functions of what the node offers and what the user asked for."""
