"""Lightning callbacks (NeMo's trainer and a plain Lightning trainer alike)."""
