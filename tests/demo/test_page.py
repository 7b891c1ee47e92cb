"""The demo page builds (Gradio validates every component and event when the Blocks close) with its tabs in place."""

from demo.app import build_demo
from demo.settings import DemoSettings


def test_the_page_builds_with_its_tabs_and_controls(tmp_path):
    page = build_demo(DemoSettings(num_examples=2, examples_dir=tmp_path / "examples"))
    ids = {block.elem_id for block in page.blocks.values() if getattr(block, "elem_id", None)}
    assert {"chatbot", "version-summary", "version-chart", "version-table", "refresh-versions", "ask-both"} <= ids
    assert len(list((tmp_path / "examples").glob("*.png"))) == 2
