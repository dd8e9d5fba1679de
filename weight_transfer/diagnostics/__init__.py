"""Telling two models apart: logit, layer and gradient parity, the doctor, training parity,
the NumPy reference from the maths."""
