"""Training and calibration tools for DSpark drafters (plain PyTorch + HF targets)."""
