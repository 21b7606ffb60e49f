"""``python -m strategies``: the table of registered strategies, as the README shows it."""

from strategies.registry import markdown_table

print(markdown_table())
