"""A griffe extension for the API reference: gradood's docstrings are plain text (formulas in
Unicode, shapes such as [B, K], aligned tables), so each is shown as written, preformatted,
rather than parsed as Markdown, which would turn `[k]` into a link and `*` into emphasis."""

from __future__ import annotations

import griffe


class PlainDocstrings(griffe.Extension):
    def on_object(self, *, obj, **kwargs) -> None:
        docstring = obj.docstring
        if docstring is not None and docstring.value and not docstring.value.startswith("```"):
            docstring.value = "```text\n" + docstring.value + "\n```"
