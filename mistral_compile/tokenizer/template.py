"""Chat templates (Jinja) rendered the way transformers renders them, in jinja2's sandbox."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from mistral_compile.errors import MistralCompileError


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Sequence[str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.cache
def _compile(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): the body as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(source)


class ChatTemplate:
    """A Jinja chat template; ``render`` passes what transformers' apply_chat_template passes."""

    def __init__(self, source: str, origin: str) -> None:
        import jinja2

        self.source, self.origin = source, origin
        try:
            self._template = _compile(source)
        except jinja2.TemplateSyntaxError as err:
            raise MistralCompileError(f"{origin}: field 'chat_template': does not parse (line "
                                      f"{err.lineno}: {err.message})") from None

    def render(self, messages: list[dict], special_tokens: dict[str, str],
               tools: Sequence[dict] | None = None, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        import jinja2

        try:
            return self._template.render(messages=messages, tools=list(tools) if tools else None,
                                         documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**special_tokens, **extra})
        except jinja2.TemplateError as err:
            raise MistralCompileError(f"{self.origin}: field 'chat_template': the template "
                                      f"raised: {err}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
            raise MistralCompileError(f"{self.origin}: field 'chat_template': the template "
                                      f"failed ({type(err).__name__}: {err})") from None
