"""Evaluation of vision-language chat models: ShapesWorld hallucination metrics (POPE, CHAIR, attribute accuracy)
and an MMHal-Bench runner with an LLM judge, behind one small `ChatModel` protocol."""
