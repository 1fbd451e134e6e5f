"""Low-rank factorisation: a projection becomes coefficients × basis, the basis shared by a group of layers."""
