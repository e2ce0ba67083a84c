"""What each endpoint asks of a stage, beyond the keys' own types.

`chat` and `responses` render `messages`; `embeddings` renders one `input` text per item and
makes a vector, not text: no post step, no schema, no later stage reading its output.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from flow.config.models import PipelineConfig
from flow.endpoints.embeddings import DIMENSIONS
from flow.errors import ConfigError


def check_endpoints(config: PipelineConfig, file: Path) -> None:
    """A `ConfigError` (file, key, fix) for a stage its endpoint cannot run."""
    chain = config.chain
    for index, stage in enumerate(chain):
        key = "call" if config.stages is None else f"stages[{index}]"
        where = f"{file}: {key}"
        if stage.endpoint != "embeddings":
            if not stage.messages:
                raise ConfigError(f"{where}.messages: required key is missing (at least one "
                                  "message; `input:` is for call.endpoint: embeddings)")
            if stage.input is not None:
                raise ConfigError(f"{where}.input: only call.endpoint: embeddings takes "
                                  "`input:`; write the prompt as messages:")
            continue
        if stage.messages:
            raise ConfigError(f"{where}.messages: an embeddings stage embeds one text, "
                              f"{key}.input (e.g. input: \"{{{{ text }}}}\"); remove messages:")
        if stage.input is None:
            raise ConfigError(f"{where}.input: required key is missing for call.endpoint: "
                              "embeddings: the text to embed, e.g. input: \"{{ text }}\"")
        post = config.post if config.stages is None else stage.post
        if post:
            post_key = "post" if config.stages is None else f"{key}.post"
            raise ConfigError(f"{file}: {post_key}: post steps work on text, and an embeddings "
                              "stage makes a vector; remove post: (export writes the vectors)")
        if stage.output_schema is not None:
            raise ConfigError(f"{where}.schema: an embeddings stage makes a vector, not JSON; "
                              "remove schema:")
        _check_dimensions(stage.model, stage.params.get("dimensions"), f"{where}.params")
        _check_readers(config, index, file)


def _check_dimensions(model: str, dimensions: object, where: str) -> None:
    """`dimensions` a size the model can give (a refused request would be split to nothing:
    every input of it refused alike)."""
    if dimensions is None:
        return
    full = DIMENSIONS.get(model.rsplit("/", 1)[-1])
    if model.endswith("text-embedding-ada-002"):
        raise ConfigError(f"{where}.dimensions: {model} has 1,536 dimensions and takes no "
                          "dimensions param; remove it, or use a text-embedding-3 model")
    if type(dimensions) is not int or dimensions < 1 or (full and dimensions > full):
        most = f" up to {full:,} for {model}" if full else ""
        raise ConfigError(f"{where}.dimensions: expected a whole number of 1 or more{most}, "
                          f"got {dimensions!r}")


def _check_readers(config: PipelineConfig, index: int, file: Path) -> None:
    """No later stage renders from an embeddings stage's output: it is a vector."""
    chain = config.chain
    name = chain[index].name
    env = SandboxedEnvironment()
    for later, stage in enumerate(chain[index + 1:], start=index + 1):
        sources = [(f"messages[{n}].content", m.content) for n, m in enumerate(stage.messages)]
        sources += [(key, text) for key, text in (("input", stage.input), ("when", stage.when))
                    if text is not None]
        for key, source in sources:
            text = source if key != "when" or "{{" in source or "{%" in source \
                else "{{ " + source + " }}"
            if name in meta.find_undeclared_variables(env.parse(text)):
                raise ConfigError(
                    f"{file}: stages[{later}].{key}: reads '{name}', an embeddings stage, "
                    "whose output is a vector, not text; read the row's fields instead, or "
                    "export the vectors (flow export)")
