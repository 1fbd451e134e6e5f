"""Width pruning of the MLP: some intermediate channels of a layer removed, the projection reading them refitted."""
