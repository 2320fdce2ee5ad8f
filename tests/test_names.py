"""One model name type: every name the pipeline writes parses back to itself, and a bad name says how to write it."""

import pytest

from llmcarve.names import BUDGET_DECIMALS, ModelName, format_budget

EXAMPLES = {
    "dense": ModelName("dense"),
    "tomoe@0.5": ModelName("tomoe", budget=0.5),
    "static@0.7": ModelName("static", budget=0.7),
    "atp-medical@0.6": ModelName("atp", domain="medical", budget=0.6),
    "twostage-legal@0.6": ModelName("twostage", domain="legal", budget=0.6),
    "lora-medical@1.0": ModelName("lora", domain="medical", budget=1.0),
    "static+kd@0.5": ModelName("static", recovery="kd", budget=0.5),
    "tomoe+kd@0.5": ModelName("tomoe", recovery="kd", budget=0.5),
    "atp-medical+kd@0.6": ModelName("atp", domain="medical", recovery="kd", budget=0.6),
    "atp-icd_10@0.125": ModelName("atp", domain="icd_10", budget=0.125),
}


@pytest.mark.parametrize("text", EXAMPLES)
def test_parse_and_format_are_inverse(text):
    name = ModelName.parse(text)
    assert name == EXAMPLES[text]
    assert str(name) == name.format() == text


def test_series_and_kept():
    assert ModelName.parse("atp-medical+kd@0.6").series == "atp-medical+kd"
    assert ModelName.parse("tomoe@0.5").series == "tomoe"
    assert ModelName.parse("dense").series == "dense"
    assert ModelName.parse("dense").kept == 1.0
    assert ModelName.parse("static@0.7").kept == 0.7


def test_budgets_are_canonical_so_near_equal_budgets_name_one_model():
    assert format_budget(0.5) == format_budget(0.5000001) == "0.5"
    assert format_budget(1) == "1.0"
    assert format_budget(0.125) == "0.125"
    assert ModelName("tomoe", budget=0.5000001) == ModelName("tomoe", budget=0.5)
    assert str(ModelName("tomoe", budget=0.5000001)) == "tomoe@0.5"


def test_every_budget_step_has_its_own_name_that_parses_back():
    budgets = [step / 10**BUDGET_DECIMALS for step in range(1, 10**BUDGET_DECIMALS + 1)]
    names = [str(ModelName("static", budget=budget)) for budget in budgets]
    assert len(set(names)) == len(budgets)
    assert all(ModelName.parse(name).budget == budget for name, budget in zip(names, budgets))


BAD_NAMES = [
    # (text, words the message must contain besides the text itself)
    ("", ["not a model name", "<method>"]),
    ("Tomoe@0.5", ["unknown method 'Tomoe'", "tomoe"]),
    ("tomoe", ["need a budget", "tomoe@0.5"]),
    ("tomoe@0.50", ["not written canonically", "write tomoe@0.5"]),
    ("tomoe@1", ["not a decimal number"]),
    ("tomoe@0.5 ", ["not a decimal number"]),
    ("tomoe@1.5", ["outside (0, 1]"]),
    ("tomoe@0.00001", ["rounds to 0.0"]),
    ("tomoe@0.99999", ["rounds to 1.0"]),
    ("dense@1.0", ["takes no budget", "write 'dense'"]),
    ("atp@0.6", ["tuned on a domain", "atp-medical@0.6"]),
    ("tomoe-medical@0.5", ["take no domain", "'medical'"]),
    ("atp-Medical@0.6", ["'Medical'", "lowercase letters, digits and _"]),
    ("atp-medical-qa@0.6", ["'medical-qa'", "no '-'"]),
    ("tomoe+ft@0.5", ["unknown recovery 'ft'", "kd"]),
    ("dense+kd", ["nothing to recover"]),
]


@pytest.mark.parametrize("text,words", BAD_NAMES, ids=[text or "empty" for text, _ in BAD_NAMES])
def test_bad_name_is_refused_saying_what_to_write(text, words):
    with pytest.raises(ValueError) as error:
        ModelName.parse(text)
    message = str(error.value)
    for word in [repr(text), *words]:
        assert word in message, f"{word!r} missing from: {message}"


def test_bad_parts_are_refused_when_built_too():
    with pytest.raises(ValueError, match="need a budget"):
        ModelName("static")
    with pytest.raises(ValueError, match="not a number"):
        ModelName("static", budget="0.5")
    with pytest.raises(ValueError, match="a model name is text"):
        ModelName.parse(0.5)


def test_a_name_is_refused_to_a_model_that_measures_another_budget():
    ModelName.parse("tomoe@0.5").check_measured(0.515)
    ModelName.parse("dense").check_measured(1.0)
    with pytest.raises(ValueError, match=r"tomoe@0\.5 measures 0\.644 active"):
        ModelName.parse("tomoe@0.5").check_measured(0.644)
    with pytest.raises(ValueError, match="measures 0.470 active"):
        ModelName.parse("static@0.5").check_measured(0.47)
