"""Tool calling: the options (spec), the families' call formats (formats), the parser of answers (parse)."""
