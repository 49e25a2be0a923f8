"""midtune_shapes task hooks (lmms-eval loads utils.py by path; this file only makes it ship as package data)."""
