"""Helpers shared by all four packages (pipeline, filters, samplers, trainer); imports none of them."""
