"""A3Tune's stage 1: SAM weak masks (sam.py), their geometry (geometry.py), BiomedCLIP selection."""
