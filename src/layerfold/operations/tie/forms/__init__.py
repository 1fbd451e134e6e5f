"""Relaxation forms of tied layers other than the private LoRA that ``TiedLinear`` holds (``lora``), one file
each; a form is registered here by name and in ``spec.FORM_CHOICES`` with its size rules (``spec.check_form``:
plans are checked below this layer), and a tie's ``relax`` field (per plan, or per projection kind) picks one.
See ``base.Form`` for what a form is."""

from __future__ import annotations

from .base import Form
from .kronecker import Kronecker
from .mos import Mos
from .svfit import SvFit
from .vera import Vera

FORMS: dict[str, type[Form]] = {form.name: form for form in (Vera, SvFit, Mos, Kronecker)}


def form_of(op, name: str) -> Form:
    """The form called ``name`` with a tie operation's settings (``private``, ``mos_pool``, ``mos_shard``: MoS's
    private rank, pool and shard sizes; ``kron_factor``, ``kron_terms``: the size and number of Kronecker's shared
    slow matrices)."""
    if name == "mos":
        return Mos(op.private, op.mos_pool, op.mos_shard)
    if name == "kronecker":
        return Kronecker(op.kron_factor, op.kron_terms)
    return FORMS[name]()


__all__ = ["FORMS", "Form", "form_of"]
