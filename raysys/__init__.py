"""raysys."""
