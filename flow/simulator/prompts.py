"""What a prompt says its reply should look like: the JSON keys it names and the options it lists.

Read the way a person skims an instruction, with a few patterns:

- a JSON template: `{"label": "positive|negative", "score": 0.9}`, or `{label: ..., score: ...}`;
- a phrase naming keys: `with the keys "answer" (one short sentence) and "confidence" (low,
  medium or high)`, `with keys label and score`, `fields: title, year`;
- a list of options: `positive, negative or neutral`, `one of: a, b, c`, `"yes" or "no"`,
  `yes|no`, `either spam or ham`, `answer yes or no`; beside a key, also `yes/no` and `x or y`.

The options that belong to no key are the options for the answer itself. A prompt that says
none of these reads as an empty `PromptShape`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ITEM = r"""(?:"[^"\n]{1,40}"|'[^'\n]{1,40}'|`[^`\n]{1,40}`|[\w-]+)"""
OPTION_LISTS = [
    re.compile(rf"\bone of\b\s*:?\s*[\[(]?\s*({ITEM}(?:\s*(?:,|\bor\b|\|)\s*{ITEM})+)", re.I),
    re.compile(rf"\bone of\b[^:\n]{{0,40}}:\s*[\[(]?\s*({ITEM}(?:\s*(?:,|\bor\b|\|)\s*{ITEM})+)",
               re.I),
    re.compile(r"""((?:"[^"\n]{1,40}"|'[^'\n]{1,40}')"""
               r"""(?:\s*(?:,\s*(?:or\s+)?|\bor\b|\|)\s*(?:"[^"\n]{1,40}"|'[^'\n]{1,40}'))+)"""),
    re.compile(r"(?<![\w-])([\w-]+(?:\s*\|\s*[\w-]+)+)"),
    re.compile(r"\b([\w-]+(?:, [\w-]+)+,? or [\w-]+)\b"),
    re.compile(r"\beither ([\w-]+ or [\w-]+)\b", re.I),
    re.compile(r"\b(?:answer|reply|respond|say)(?: only)?(?: with)?:? ([\w-]+ or [\w-]+)\b", re.I),
]
# beside a key, where nothing else is meant: `(yes/no)`, `(true or false)`
HINT_OPTION_LISTS = [re.compile(r"(?<![\w/-])([\w-]+(?:/[\w-]+)+)(?![\w/-])"),
                     re.compile(r"\b([\w-]+,? or [\w-]+)\b")]
ITEM_TEXT = re.compile(ITEM)
SEPARATORS = {"or", "and"}
MAX_OPTIONS = 20

TEMPLATE = re.compile(r"\{[^{}]*\}")
QUOTED_KEY = re.compile(r"""(?:^|[{,\n])\s*(?:"([A-Za-z_][\w-]*)"|'([A-Za-z_][\w-]*)')\s*:""")
BARE_KEY = re.compile(r"(?:^|[{,\n])\s*([A-Za-z_]\w*)\s*:")
KEY_PHRASE = re.compile(
    r"\b(?:keys?|fields?|properties|attributes)\b(?:\s+(?:named|called|are))?\s*:?\s*", re.I)
KEY_ITEM = re.compile(r"""\s*(,\s*and\b|,|;|\band\b)?\s*"""
                      r"""(?:["'`]([A-Za-z_][\w-]*)["'`]|([A-Za-z_]\w*))(\s*\([^()]*\))?""")
NOT_KEYS = {"a", "an", "the", "and", "or", "are", "is", "as", "in", "of", "to", "for", "with",
            "where", "which", "that", "each", "only", "no", "not", "then", "from", "like"}

RANGE = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:-|–|to|and)\s*(-?\d+(?:\.\d+)?)")
NAME_KINDS = [(re.compile(r"^(?:is|has|should|can)_"), "boolean"),
              (re.compile(r"confidence|score|probability|likelihood"), "number"),
              (re.compile(r"count|^num_|^n_|number_of|^age$|year|rating|rank"), "integer"),
              (re.compile(r"^(?:tags|keywords|topics|entities|items|labels|categories)$"), "list")]
HINT_KINDS = [(re.compile(r"\b(?:true|false|bool|boolean)\b", re.I), "boolean"),
              (re.compile(r"^\s*-?\d+\s*$|\b(?:int|integer|whole number|count)\b", re.I),
               "integer"),
              (re.compile(r"^\s*-?\d+\.\d+\s*$|\b(?:number|float|decimal|probability)\b", re.I),
               "number"),
              (re.compile(r"^\s*\[|\b(?:list|array)\b", re.I), "list")]


@dataclass(frozen=True)
class KeyHint:
    """A key a prompt names, and what it says of its value: a kind, options, a range."""

    name: str
    kind: str = "string"  # string, number, integer, boolean or list
    options: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class PromptShape:
    """What a prompt asks for: JSON keys, in the order it names them, and options for the answer."""

    keys: tuple[KeyHint, ...] = ()
    options: tuple[str, ...] = ()


def read_prompt(text: str) -> PromptShape:
    """The keys and options `text` names; options beside a key belong to that key alone."""
    keys, span = _template_keys(text)
    if not keys:
        keys, span = _phrase_keys(text)
    rest = text[:span[0]] + " " + text[span[1]:] if keys else text
    return PromptShape(tuple(keys), listed_options(rest))


def listed_options(text: str, beside_a_key: bool = False) -> tuple[str, ...]:
    """The first list of options in `text` (`a, b or c`, `one of: a, b`, `a|b`), else ()."""
    patterns = OPTION_LISTS + (HINT_OPTION_LISTS if beside_a_key else [])
    found = [match for pattern in patterns if (match := pattern.search(text))]
    for match in sorted(found, key=lambda m: m.start()):
        options = [item.strip("\"'`") for item in ITEM_TEXT.findall(match.group(1))
                   if item.lower() not in SEPARATORS]
        options = list(dict.fromkeys(option for option in options if option.strip()))
        if 2 <= len(options) <= MAX_OPTIONS:
            return tuple(options)
    return ()


def _template_keys(text: str) -> tuple[list[KeyHint], tuple[int, int]]:
    """The keys of the first `{...}` in `text` that has any, and where that template is."""
    for template in TEMPLATE.finditer(text):
        body = template.group(0)
        matches = list(QUOTED_KEY.finditer(body)) or list(BARE_KEY.finditer(body))
        if not matches:
            continue
        keys = []
        for index, match in enumerate(matches):
            name = next(group for group in match.groups() if group)
            end = matches[index + 1].start() if index + 1 < len(matches) else len(body) - 1
            keys.append(_hint(name, body[match.end():end].strip().rstrip(",")))
        return _distinct(keys), template.span()
    return [], (0, 0)


def _phrase_keys(text: str) -> tuple[list[KeyHint], tuple[int, int]]:
    """The keys a phrase such as `with keys label and score` names, and where the phrase is."""
    for phrase in KEY_PHRASE.finditer(text):
        keys: list[KeyHint] = []
        position, quoted_any = phrase.end(), False
        while match := KEY_ITEM.match(text, position):
            separator, quoted, bare, hint = match.groups()
            if (keys and separator is None) or (bare is not None and bare.lower() in NOT_KEYS):
                break
            keys.append(_hint(quoted or bare, (hint or "").strip().strip("()")))
            position, quoted_any = match.end(), quoted_any or quoted is not None
            if separator is not None and "and" in separator:
                break  # `a, b and c`: the list ends with the item after `and`
        # one bare word after `key` is as likely prose (`the key point`) as a key
        if len(keys) >= 2 or (keys and (quoted_any or phrase.group(0).strip().endswith(
                ("named", "called", ":")))):
            return _distinct(keys), (phrase.start(), position)
    return [], (0, 0)


def _hint(name: str, text: str) -> KeyHint:
    """What the words beside a key (`(low, medium or high)`, `0.9`, `"a|b"`) say of its value."""
    options = listed_options(text, beside_a_key=True)
    if options and {option.lower() for option in options} == {"true", "false"}:
        return KeyHint(name, "boolean")
    if options:
        return KeyHint(name, "string", options)
    span = RANGE.search(text)
    low, high = (float(span.group(1)), float(span.group(2))) if span else (None, None)
    kind = next((kind for pattern, kind in HINT_KINDS if pattern.search(text)), None)
    if kind is None and span is not None:
        whole = "." not in span.group(0) and (low, high) != (0, 1)
        kind = "integer" if whole else "number"
    if kind is None:
        kind = next((kind for pattern, kind in NAME_KINDS if pattern.search(name.lower())),
                    "string")
    return KeyHint(name, kind, (), low, high)


def _distinct(keys: list[KeyHint]) -> list[KeyHint]:
    """The first hint for each key name."""
    first: dict[str, KeyHint] = {}
    for key in keys:
        first.setdefault(key.name, key)
    return list(first.values())
