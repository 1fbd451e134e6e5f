"""Drop blocks: take layers out of the stack."""
