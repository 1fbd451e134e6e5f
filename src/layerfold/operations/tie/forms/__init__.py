"""Relaxation forms of tied layers other than the private LoRA that ``TiedLinear`` holds (``lora``), one file
each; a form is registered here by name and in ``spec.FORM_CHOICES`` with its size rules (``spec.check_form``:
plans are checked below this layer), and a tie's ``relax`` field (per plan, or per projection kind) picks one.
See ``base.Form`` for what a form is."""

from __future__ import annotations

from .base import Form
from .mos import Mos
from .svfit import SvFit
from .vera import Vera

FORMS: dict[str, type[Form]] = {form.name: form for form in (Vera, SvFit, Mos)}


def make_form(name: str, *, private: int = 0) -> Form:
    """The form called ``name`` with the tie's settings (``private``: MoS's private rank)."""
    return Mos(private) if name == "mos" else FORMS[name]()


__all__ = ["FORMS", "Form", "make_form"]
