"""Width pruning of attention: some heads of a layer removed (whole key/value groups or query heads within them)."""
