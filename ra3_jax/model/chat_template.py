"""Chat templates: a tokenizer's Jinja chat template rendered into the prompt text of a conversation.

With jinja2 importable the template runs in jinja2's sandbox with the settings HF transformers uses
(``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``tojson``), so any template renders as
``apply_chat_template`` renders it. jinja2 is not a dependency of the package: without it, :func:`render_subset`
renders the small subset of Jinja that ChatML-style templates (SmolLM2, Qwen2, ...) are written in:
``{{ expr }}``, ``{% for x in expr %}``, ``{% if / elif / else %}``, ``{% set x = expr %}``, ``{# #}``, the
``-`` whitespace controls; expressions of literals, names, ``x['k']`` / ``x.k``, ``loop.first/last/index``,
``+``, ``==``, ``!=``, ``in``, ``and``, ``or``, ``not``, ``| trim`` and the string methods ``strip`` & co.
A template outside that subset is a :class:`ChatTemplateError` naming what it could not render.
"""

from __future__ import annotations

import ast
import functools
import json
import re

from ra3_jax.errors import RA3Error


class ChatTemplateError(RA3Error, ValueError):
    pass


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True, **context) -> str:
    """The conversation ``messages`` ({role, content} dicts) as the template writes it; ``context`` holds extra
    template variables (``bos_token``, ``eos_token``)."""
    try:
        import jinja2
    except ImportError:
        return render_subset(template, messages, add_generation_prompt=add_generation_prompt, **context)
    try:
        return _jinja_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"cannot render the chat template: {e}") from None


@functools.lru_cache(maxsize=8)
def _jinja_template(template: str):
    import jinja2.sandbox

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = tojson
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"cannot compile the chat template: {e}") from None


# ------------------------------------------------------------------------------- the subset, without jinja2
_TAG = re.compile(r"\{([{%#])(-?)(.*?)(-?)([}%#])\}", re.S)
_STRING = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", re.S)
_STR_METHODS = {"strip", "lstrip", "rstrip", "startswith", "endswith", "upper", "lower", "title"}
_CONSTANTS = {"true": True, "false": False, "none": None, "True": True, "False": False, "None": None}


class _Undefined:
    """A name the caller did not pass: falsy, renders as '' (Jinja's default)."""

    def __bool__(self):
        return False

    def __str__(self):
        return ""


def _lex(template: str) -> list[tuple[str, str]]:
    """[(kind, text)]: kind 'text', '{' (output), '%' (statement); comments dropped; whitespace control, trim_blocks
    and lstrip_blocks applied to the text around each tag."""
    out, pos, strip_next = [], 0, False
    for m in _TAG.finditer(template):
        kind, lminus, body, rminus, close = m.groups()
        if {"{": "}", "%": "%", "#": "#"}[kind] != close:
            raise ChatTemplateError(f"chat template: unbalanced tag {m.group(0)[:40]!r}")
        text = template[pos : m.start()]
        text = text.lstrip() if strip_next else text
        if lminus:
            text = text.rstrip()
        elif kind in "%#":  # lstrip_blocks: a block tag alone on its line takes the line's indent with it
            head = text.rstrip(" \t")
            if head.endswith("\n") or (not head and (pos == 0 or template[pos - 1] == "\n")):
                text = head
        out.append(("text", text))
        if kind != "#":
            out.append((kind, body.strip()))
        pos, strip_next = m.end(), bool(rminus)
        if kind in "%#" and not rminus and template.startswith("\n", pos):  # trim_blocks
            pos += 1
    tail = template[pos:]
    out.append(("text", tail.lstrip() if strip_next else tail))
    return [t for t in out if t != ("text", "")]


def _parse(tokens: list[tuple[str, str]], i: int = 0, ends: tuple = ()) -> tuple[list, int, str]:
    """Nodes up to the first statement in ``ends``: ('text', s) | ('out', expr) | ('set', name, expr) |
    ('for', name, expr, body) | ('if', [(cond, body), ...])."""
    nodes = []
    while i < len(tokens):
        kind, body = tokens[i]
        word = body.split(None, 1)[0] if kind == "%" and body else ""
        if kind == "%" and word in ends:
            return nodes, i, body
        i += 1
        if kind == "text":
            nodes.append(("text", body))
        elif kind == "{":
            nodes.append(("out", _expr(body)))
        elif word == "set" and (m := re.fullmatch(r"set\s+(\w+)\s*=(.*)", body, re.S)):
            nodes.append(("set", m.group(1), _expr(m.group(2))))
        elif word == "for" and (m := re.fullmatch(r"for\s+(\w+)\s+in\s+(.*)", body, re.S)):
            inner, i, _ = _parse(tokens, i, ("endfor",))
            nodes.append(("for", m.group(1), _expr(m.group(2)), inner))
            i += 1
        elif word == "if":
            branches, cond = [], _expr(body[2:])
            while True:
                inner, i, stop = _parse(tokens, i, ("elif", "else", "endif"))
                branches.append((cond, inner))
                i += 1
                if stop.startswith("endif"):
                    break
                cond = _expr(stop[4:]) if stop.startswith("elif") else ast.Constant(True)
            nodes.append(("if", branches))
        else:
            raise ChatTemplateError(f"chat template: {{% {body[:40]} %}} is outside the subset rendered without jinja2")
    if ends:
        raise ChatTemplateError(f"chat template: missing {{% {ends[-1]} %}}")
    return nodes, i, ""


def _expr(src: str) -> ast.expr:
    """A Jinja expression as a Python AST (string literals may span lines in Jinja: their newlines escaped)."""
    src = _STRING.sub(lambda m: m.group(0).replace("\n", "\\n"), src.strip())
    try:
        return ast.parse(f"({src})", mode="eval").body
    except SyntaxError:
        raise ChatTemplateError(f"chat template: expression {src[:60]!r} is outside the subset rendered without jinja2") from None


def _eval(node: ast.expr, env: dict):
    match node:
        case ast.Constant(value=v):
            return v
        case ast.Name(id=name):
            return _CONSTANTS[name] if name in _CONSTANTS else env.get(name, _Undefined())
        case ast.Subscript(value=v, slice=k):
            obj, key = _eval(v, env), _eval(k, env)
            if isinstance(obj, dict):
                return obj.get(key, _Undefined())
            ok = isinstance(obj, (list, tuple, str)) and isinstance(key, int) and -len(obj) <= key < len(obj)
            return obj[key] if ok else _Undefined()
        case ast.Attribute(value=v, attr=a) if isinstance(obj := _eval(v, env), dict):
            return obj.get(a, _Undefined())
        case ast.BinOp(left=lhs, op=ast.Add(), right=rhs):
            return _eval(lhs, env) + _eval(rhs, env)
        case ast.BinOp(left=lhs, op=ast.BitOr(), right=ast.Name(id="trim")):
            return str(_eval(lhs, env)).strip()
        case ast.Compare(left=lhs, ops=[op], comparators=[rhs]) if type(op) in _COMPARE:
            return _COMPARE[type(op)](_eval(lhs, env), _eval(rhs, env))
        case ast.BoolOp(op=op, values=[*first, last]):
            for x in first:  # Python's and Jinja's: the first operand that decides, else the last
                if bool(y := _eval(x, env)) != isinstance(op, ast.And):
                    return y
            return _eval(last, env)
        case ast.UnaryOp(op=ast.Not(), operand=x):
            return not _eval(x, env)
        case ast.Call(func=ast.Attribute(value=v, attr=m), args=args, keywords=[]) if m in _STR_METHODS:
            return getattr(str(_eval(v, env)), m)(*(_eval(a, env) for a in args))
    raise ChatTemplateError(f"chat template: {ast.unparse(node)[:60]!r} is outside the subset rendered without jinja2")


_COMPARE = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}


def _run(nodes: list, env: dict, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            value = _eval(node[1], env)
            out.append(str(value))
        elif node[0] == "set":
            env[node[1]] = _eval(node[2], env)
        elif node[0] == "for":
            items = list(_eval(node[2], env) or [])
            for k, item in enumerate(items):
                loop = dict(index0=k, index=k + 1, first=k == 0, last=k == len(items) - 1, length=len(items))
                _run(node[3], {**env, node[1]: item, "loop": loop}, out)
        else:
            body = next((b for cond, b in node[1] if _eval(cond, env)), [])
            _run(body, env, out)


def render_subset(template: str, messages: list[dict], *, add_generation_prompt: bool = True, **context) -> str:
    """:func:`render_chat` without jinja2: the ChatML-style subset (see the module docstring)."""
    nodes, _, _ = _parse(_lex(template.removesuffix("\n")))  # Jinja drops one trailing newline
    out: list[str] = []
    _run(nodes, {"messages": messages, "add_generation_prompt": add_generation_prompt, **context}, out)
    return "".join(out)
