"""Data: problem sets (`problems`), SFT/PPM data extracted from search trees (`extract`), and
the embedded synthetic world used for tests and demos."""
