"""The word diff the demo shows after a correction, on hand-made cases."""

from demo.text_diff import changed_words, word_diff


def test_unchanged_text_has_no_labels():
    assert word_diff("There is one red star.", "There is one red star.") == [("There is one red star.", None)]


def test_a_replaced_word_is_removed_then_added():
    assert word_diff("There is one red star.", "There is one blue star.") == [
        ("There is one ", None),
        ("red ", "removed"),
        ("blue ", "added"),
        ("star.", None),
    ]


def test_a_deleted_sentence_and_an_added_one():
    answer = "There is a star. There is a moon."
    correction = "There is a star. It is small."
    assert word_diff(answer, correction) == [
        ("There is a star. ", None),
        ("There ", "removed"),
        ("It ", "added"),
        ("is ", None),
        ("a moon.", "removed"),
        ("small.", "added"),
    ]
    assert changed_words(answer, correction) == (["There", "a", "moon."], ["It", "small."])
    # The segments rebuild the correction when the removed ones are dropped.
    assert "".join(t for t, label in word_diff(answer, correction) if label != "removed") == correction
