"""Terminal tables: ``kfor1.table.format_table``, used by the patch report, the run summary,
``kfor1 eval`` and the demo."""

from kfor1.table import format_table


def test_columns_align_names_left_and_numbers_right():
    text = format_table(("task", "accuracy", "examples"),
                        [("digits", "98.06%", 360), ("colours", "100.00%", 18)])
    assert text.splitlines() == [
        "task     accuracy  examples",
        "-------  --------  --------",
        "digits     98.06%       360",
        "colours   100.00%        18",
    ]


def test_left_aligned_columns_and_indent():
    text = format_table(("patch", "written to"), [("logits", "runs/a"), ("scale_bias", "b")],
                        left=2, indent="  ")
    assert text.splitlines() == [
        "  patch       written to",
        "  ----------  ----------",
        "  logits      runs/a",
        "  scale_bias  b",
    ]


def test_a_header_alone_is_a_table_without_rows():
    assert format_table(("a", "bb"), []) == "a  bb\n-  --"
