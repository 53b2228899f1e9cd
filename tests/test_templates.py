import pytest

from sempa_train.core.templates import (
    PARAPHRASE_TEMPLATES,
    fill,
    preprocess_sentence,
    prompteol_prompt,
    resolve_template,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A man plays a guitar.", "A man plays a guitar."),
        ("A man  plays\ta guitar", "A man plays a guitar."),
        ("  Is he playing?  ", "Is he playing."),
        ('He said "hello"', "He said 'hello'"),
        ('He said "hello".', "He said 'hello'."),
        ("It's John's", "It's John's."),
        ("Ends with quote'", "Ends with quote'"),
        ("", "."),
    ],
)
def test_preprocess_sentence(raw: str, expected: str) -> None:
    assert preprocess_sentence(raw) == expected


def test_prompteol_prompt_is_the_paper_template() -> None:
    assert prompteol_prompt("a dog runs") == 'This sentence : "a dog runs." means in one word:"'


def test_resolve_named_and_custom_templates() -> None:
    assert resolve_template("P1") == ("P1", PARAPHRASE_TEMPLATES["P1"])
    assert fill(PARAPHRASE_TEMPLATES["P1"], "A cat sleeps.") == (
        'Keep the same meaning of this sentence: "A cat sleeps.", while making some changes.'
    )
    assert resolve_template("Say {sentence} again") == ("custom", "Say {sentence} again")
    # a sentence containing braces is inserted verbatim
    assert fill("Say {sentence}", "x {y} z") == "Say x {y} z"


@pytest.mark.parametrize("bad", ["P9", "no placeholder", "{sentence} and {sentence}"])
def test_bad_template_is_rejected_with_its_text(bad: str) -> None:
    with pytest.raises(ValueError, match="exactly once"):
        resolve_template(bad)
