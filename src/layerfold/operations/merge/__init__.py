"""LaCo merge: collapse layers into one before they are dropped."""
