"""The one typed model name: every place that builds or reads `tomoe@0.5` or `atp-medical+kd@0.6` uses it.

Scheme (one spelling per model, so a name is also a directory name and a metrics key):

    <method>[-<domain>][+<recovery>][@<budget>]

    dense                 the prepared, uncarved model: no domain, no recovery, no budget
    tomoe@0.5             method + budget (the KEPT fraction of attention+MLP weights, in (0, 1])
    atp-medical@0.6       domain-tuned methods (atp, twostage, lora) always name their domain
    lora-medical@1.0      LoRA on the dense model: budget 1.0
    static+kd@0.5         a carved model recovered by distillation from the dense teacher
    atp-medical+kd@0.6    domain, then recovery, then budget

Budgets are written canonically: rounded to BUDGET_DECIMALS decimals, trailing zeros dropped, at least one
digit after the point (0.5, 0.125, 1.0). Two budgets that round to the same text name the same model, so
params.py refuses them as duplicates; `parse` accepts only the canonical text (`tomoe@0.50` is refused with
the spelling to use), so one model never has two names.

Standard library only: GPU benchmark hosts import this without pydantic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BUDGET_DECIMALS = 4  # a budget step finer than 1e-4 of the weights is below what training can hit
# A model named @p must measure p active within this: the name is a promise to whoever loads the model.
NAME_TOLERANCE = 0.02

DENSE = "dense"
# method -> what it is; the domain-tuned ones train on one domain's text, which their names carry
METHODS = {
    DENSE: "the prepared model, uncarved",
    "tomoe": "dynamic structural pruning into a top-1 mixture of experts",
    "static": "static structured pruning from calibration statistics",
    "atp": "LoRA on a domain jointly with learned structured pruning",
    "twostage": "static pruning, then LoRA on a domain",
    "lora": "LoRA on a domain, no pruning",
}
DOMAIN_METHODS = frozenset({"atp", "twostage", "lora"})
RECOVERIES = {"kd": "distillation from the dense teacher"}

_DOMAIN = re.compile(r"[a-z0-9_]+")
_BUDGET = re.compile(r"[0-9]+\.[0-9]+")
_PARTS = re.compile(r"(?P<method>[^-+@]*)(?:-(?P<domain>[^+@]*))?(?:\+(?P<recovery>[^@]*))?(?:@(?P<budget>.*))?")
SCHEME = "<method>[-<domain>][+<recovery>][@<kept>], e.g. dense, tomoe@0.5, atp-medical@0.6, atp-medical+kd@0.6"


def format_budget(budget: float) -> str:
    """The canonical text of a kept fraction: 0.5 -> '0.5', 1 -> '1.0', 0.5000001 -> '0.5'."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget {budget!r} is not a number; give the kept fraction in (0, 1], e.g. 0.5")
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget {budget!r} is outside (0, 1]; a budget is the KEPT fraction, e.g. 0.5 keeps half")
    text = f"{budget:.{BUDGET_DECIMALS}f}".rstrip("0")
    text = text + "0" if text.endswith(".") else text
    rounded = float(text)
    # both ends are names of their own: 0.0 keeps nothing, 1.0 is an unpruned model
    if rounded == 0.0 or (rounded == 1.0 and budget != 1.0):
        raise ValueError(
            f"budget {budget!r} rounds to {text} at {BUDGET_DECIMALS} decimals, which names a different model; "
            f"give a budget that keeps its value at {BUDGET_DECIMALS} decimals"
        )
    return text


def check_domain(domain: str) -> str:
    """A domain as it may appear in a model name (data.domains keys used by atp.domains go through this)."""
    if not isinstance(domain, str) or not _DOMAIN.fullmatch(domain):
        raise ValueError(
            f"domain {domain!r} cannot be part of a model name: use lowercase letters, digits and _ only "
            "(no '-', '+', '@' or spaces)"
        )
    return domain


@dataclass(frozen=True)
class ModelName:
    """A model the pipeline produces. Equal names format to the same text and vice versa.

    Build one with keywords, ModelName("atp", domain="medical", budget=0.6), or ModelName.parse("atp-medical@0.6");
    str(name) is the canonical text. The budget is stored canonically rounded (see format_budget).
    """

    method: str
    domain: str | None = None
    recovery: str | None = None
    budget: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        self._check_domain()
        self._check_recovery()
        self._check_budget()

    def _check_domain(self) -> None:
        if self.method in DOMAIN_METHODS and self.domain is None:
            raise ValueError(f"{self.method} models are tuned on a domain: name it, e.g. {self.method}-medical@0.6")
        if self.method not in DOMAIN_METHODS and self.domain is not None:
            raise ValueError(
                f"{self.method} models take no domain (got {self.domain!r}); only {', '.join(sorted(DOMAIN_METHODS))} do"
            )
        if self.domain is not None:
            check_domain(self.domain)

    def _check_recovery(self) -> None:
        if self.recovery is None:
            return
        if self.recovery not in RECOVERIES:
            raise ValueError(f"unknown recovery {self.recovery!r}; known: {', '.join(RECOVERIES)}")
        if self.method == DENSE:
            raise ValueError("the dense model is the teacher; it has nothing to recover (drop the '+' part)")

    def _check_budget(self) -> None:
        if self.method == DENSE:
            if self.budget is not None:
                raise ValueError(f"the dense model takes no budget (got {self.budget!r}); write '{DENSE}'")
            return
        if self.budget is None:
            raise ValueError(f"{self.method} models need a budget, the kept fraction: e.g. {self._stem()}@0.5")
        object.__setattr__(self, "budget", float(format_budget(self.budget)))  # canonical: equal names, equal text

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """The name written as `text`; ValueError saying what is wrong and how to write it otherwise."""
        if not isinstance(text, str):
            raise ValueError(f"a model name is text, got {type(text).__name__} {text!r}")
        parts = _PARTS.fullmatch(text)
        if parts is None or not parts["method"]:
            raise ValueError(f"{text!r} is not a model name; write {SCHEME}")
        budget = parts["budget"]
        if budget is not None and not _BUDGET.fullmatch(budget):
            raise ValueError(f"{text!r}: budget {budget!r} is not a decimal number like 0.5 or 1.0")
        try:
            name = cls(parts["method"], parts["domain"], parts["recovery"], None if budget is None else float(budget))
        except ValueError as error:
            raise ValueError(f"{text!r}: {error}") from None
        if str(name) != text:
            raise ValueError(f"{text!r} is not written canonically; write {name}")
        return name

    def _stem(self) -> str:
        """method[-domain]: the name without recovery and budget."""
        return self.method if self.domain is None else f"{self.method}-{self.domain}"

    @property
    def series(self) -> str:
        """The name without its budget (`atp-medical+kd@0.6` -> `atp-medical+kd`): one line of a plot, one
        registered model whose versions are the budgets."""
        return self._stem() if self.recovery is None else f"{self._stem()}+{self.recovery}"

    @property
    def kept(self) -> float:
        """The kept fraction the name states; 1.0 for the dense model."""
        return 1.0 if self.budget is None else self.budget

    def check_measured(self, active_ratio: float, tolerance: float = NAME_TOLERANCE) -> None:
        """Refuse to give this name to a model that measures `active_ratio`, unless it is within `tolerance`
        of the kept fraction the name states (a learned budget such as ToMoE's can stop short of it)."""
        if abs(active_ratio - self.kept) > tolerance:
            from llmcarve.errors import UserInputError  # here, not at the top: this module stays standard-library only

            raise UserInputError(
                f"{self} measures {active_ratio:.3f} active, more than {tolerance} from the {self.kept} its name states; "
                f"train longer or with a stronger budget penalty until it reaches the budget"
            )

    def format(self) -> str:
        return self.series if self.budget is None else f"{self.series}@{format_budget(self.budget)}"

    def __str__(self) -> str:
        return self.format()
