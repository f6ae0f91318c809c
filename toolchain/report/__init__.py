"""The build report: `html` renders report.json as one self-contained page (inline SVG, no scripts)."""
