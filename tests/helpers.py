"""Small helpers shared by several test files."""
import re

_CAPTION = re.compile(r"a (\S+) (\S+) on a (\S+) background")


def parse_caption(text: str) -> tuple[str, str, str]:
    """(color, shape, background) of a shapes caption; ValueError if `text` is off-grammar."""
    match = _CAPTION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"caption {text!r} does not match 'a {{color}} {{shape}} on a {{background}} background'.")
    return match.group(1), match.group(2), match.group(3)
