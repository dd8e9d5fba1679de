"""The rules engine (declarative tables, named inverse transforms), the typed errors and
position resampling: NumPy only, no framework."""
