"""ReID data: dataset readers (no torch), transforms, samplers."""
