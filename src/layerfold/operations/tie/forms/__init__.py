"""Relaxation forms of tied layers other than the private LoRA that ``TiedLinear`` holds (``lora``), one file
each: the form (``base.Form``: its tensors, fit, size rule and description) and its options dataclass. A form is
registered by one line here; a tie's ``relax`` field (per plan, or per projection kind) picks one, its
``form_options`` hold every form's options by name, and the plan, the CLI (``--relax`` and each option's flag)
and the planner's rank search read them from this registry."""

from __future__ import annotations

from dataclasses import field, fields, make_dataclass
from typing import Any

from .base import Form
from .kronecker import Kronecker
from .mos import Mos
from .svfit import SvFit
from .vera import Vera

FORMS: dict[str, type[Form]] = {form.name: form for form in (Vera, SvFit, Mos, Kronecker)}
FORM_CHOICES = ("lora", *FORMS)  # lora: TiedLinear's own factors (the base form's size rule)
LORA_SUMMARY = "private factors"
# Every form's options in one dataclass: a group of ``layerfold fold``'s options and of the tie methods'.
FormOptions = make_dataclass(
    "FormOptions",
    [(f.name, int, field(default=f.default, metadata=f.metadata)) for form in FORMS.values() for f in fields(form.Options)],
    kw_only=True,
)
FormOptions.__doc__ = "The relaxation forms' options (0: each form's default)."
FORM_OPTION_NAMES = tuple(f.name for f in fields(FormOptions))


def form_of(op, name: str) -> Form:
    """The form called ``name`` with a tie operation's ``form_options``; ``lora`` is the base form (its size rule
    only: TiedLinear holds a LoRA itself)."""
    return Form() if name == "lora" else FORMS[name].of(op.form_options)


def forms_help() -> str:
    """``--relax``'s help: each form and what it is."""
    return "The tie relaxations' form: " + "; ".join(
        [f"lora ({LORA_SUMMARY})"] + [f"{name} ({form.summary})" for name, form in FORMS.items()]
    ) + "."


def check_form_options(options: dict[str, Any], where: str) -> None:
    from ....core.errors import LayerfoldError

    for name, value in options.items():
        if name not in FORM_OPTION_NAMES:
            raise LayerfoldError(f"{where}.{name}: unknown option of the relaxation forms ({', '.join(FORM_OPTION_NAMES)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LayerfoldError(f"{where}.{name}: must be a non-negative integer, got {value!r}")


__all__ = ["FORMS", "FORM_CHOICES", "FORM_OPTION_NAMES", "Form", "FormOptions", "check_form_options", "form_of",
           "forms_help"]
