"""Models on disk: folded checkpoints written, checked, read and exported (``folded``, ``reading``), original models
and their side files (``originals``), folds in transformers' Auto classes (``auto_classes``), model cards
(``modelcard``), the output guard (``output_guard``) and PEFT adapters on folded projections (``adapters``)."""
