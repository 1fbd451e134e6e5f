"""Tie layers: the layers of a group share one weight per projection, each keeps its own relaxation."""
