"""Training records of three formats, read into conversations (lists of ``Exchange``).

* ``alpaca``: ``{"instruction", "input", "output"}``, one exchange per record, texts as they are
  (exactly today's samples).
* ``messages`` (OpenAI): ``{"messages": [{"role": "system" | "user" | "assistant", "content"}, ...]}``;
  ``content`` is a string or a list of text parts (``{"type": "text", "text": ...}``, joined).
* ``sharegpt``: ``{"conversations": [{"from": "system" | "human" | "gpt", "value"}, ...]}``, with an
  optional top-level ``"system"`` string.

A file is one format: ``auto`` reads it from the first record (``instruction``, ``messages`` or
``conversations``). A user turn is read as the chat template reads it
(``openalpaca.prompts.split_user_content``): ``INSTRUCTION ### Input: CONTEXT``, both parts
stripped, so the training prompt is the one a chat client's message is rendered to. An answer is
kept as it is. Roles must alternate user, assistant, ... starting with the user and ending with an
answer; no turn may be empty. A system message (first turn only) has no slot in the recipe's
layouts: ``system_message: refuse`` stops with an error, ``prepend`` puts it before the first
instruction, separated by a blank line (a client must then do the same, since the chat template
refuses system messages). Every problem is one line naming the file, the record and the turn,
raised before any tokenisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openalpaca.prompts import INPUT_MARK, Exchange, split_user_content, user_content
from openalpaca.records import DataError, check_record, read_located, type_name

DATA_FORMATS = ("auto", "alpaca", "messages", "sharegpt")
SYSTEM_MESSAGES = ("refuse", "prepend")
ALPACA_FIELDS = ("instruction", "input", "output")
FORMAT_KEY = {"alpaca": "instruction", "messages": "messages", "sharegpt": "conversations"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
SYSTEM_SEPARATOR = "\n\n"  # between a prepended system message and the first instruction

Conversation = tuple[Exchange, ...]


def detect_format(record: Any, where: str) -> str:
    """The format of a file, from its first record."""
    if isinstance(record, dict):
        for name, key in FORMAT_KEY.items():
            if key in record:
                return name
    raise DataError(f"{where}: cannot tell the data format: expected a field 'instruction' (alpaca), 'messages' "
                    f"(OpenAI messages) or 'conversations' (ShareGPT); or set data_format")


def _text(content: Any, where: str, field: str) -> str:
    """A message's text: a string, or a list of text parts joined (as the chat template joins them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise DataError(f"{where}: '{field}' must be a string or a list of text parts ({{'type': 'text', 'text': ...}}), "
                    f"got {type_name(content)}")


def _turn_list(record: Any, where: str, key: str) -> list:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type_name(record)}")
    if key not in record:
        raise DataError(f"{where}: missing field '{key}'")
    turns = record[key]
    if not isinstance(turns, list):
        raise DataError(f"{where}: field '{key}' must be a list of turns, got {type_name(turns)}")
    if not turns:
        raise DataError(f"{where}: field '{key}' is empty")
    return turns


def _messages_turns(record: Any, where: str) -> list[tuple[str, str, str]]:
    """``(where, role, text)`` of each OpenAI message."""
    out = []
    for n, message in enumerate(_turn_list(record, where, "messages"), start=1):
        at = f"{where}: turn {n}"
        if not isinstance(message, dict):
            raise DataError(f"{at}: expected a {{role, content}} object, got {type_name(message)}")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{at}: 'role' must be one of system, user, assistant, got {role!r}")
        if "content" not in message:
            raise DataError(f"{at}: missing field 'content'")
        out.append((at, role, _text(message["content"], at, "content")))
    return out


def _sharegpt_turns(record: Any, where: str) -> list[tuple[str, str, str]]:
    """``(where, role, text)`` of each ShareGPT turn, roles as OpenAI's; a top-level ``system`` first."""
    turns = _turn_list(record, where, "conversations")
    out = []
    system = record.get("system")
    if system is not None and system != "":
        if not isinstance(system, str):
            raise DataError(f"{where}: field 'system' must be a string, got {type_name(system)}")
        out.append((f"{where}: field 'system'", "system", system))
    for n, turn in enumerate(turns, start=1):
        at = f"{where}: turn {n}"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: expected a {{from, value}} object, got {type_name(turn)}")
        if turn.get("from") not in SHAREGPT_ROLES:
            raise DataError(f"{at}: 'from' must be one of {', '.join(SHAREGPT_ROLES)}, got {turn.get('from')!r}")
        if "value" not in turn:
            raise DataError(f"{at}: missing field 'value'")
        if not isinstance(turn["value"], str):
            raise DataError(f"{at}: 'value' must be a string, got {type_name(turn['value'])}")
        out.append((at, SHAREGPT_ROLES[turn["from"]], turn["value"]))
    return out


def to_exchanges(turns: list[tuple[str, str, str]], where: str, system_message: str) -> Conversation:
    """Checked ``(where, role, text)`` turns as exchanges (see the module doc for the rules)."""
    system = ""
    if turns and turns[0][1] == "system":
        at, _, system = turns[0]
        if system_message != "prepend":
            raise DataError(f"{at}: a system message, which the prompt layout has no slot for; remove it, or set "
                            f"system_message: prepend to put it before the first instruction")
        if not system.strip():
            raise DataError(f"{at}: empty system message")
        if INPUT_MARK in system:
            raise DataError(f"{at}: the system message holds '{INPUT_MARK}', which would split the first user turn")
        turns = turns[1:]
    if not turns:
        raise DataError(f"{where}: no user turn")
    exchanges = []
    for n, (at, role, text) in enumerate(turns):
        expected = "user" if n % 2 == 0 else "assistant"
        if role != expected:
            detail = " (a system message may only come first)" if role == "system" else ""
            raise DataError(f"{at}: expected a{'n' if expected == 'assistant' else ''} {expected} turn, got "
                            f"{role}{detail}; roles must alternate user, assistant, ... starting with the user")
        if not text.strip():
            raise DataError(f"{at}: empty {role} turn")
        if role == "user":
            instruction, input = split_user_content(text)
            if not instruction:
                raise DataError(f"{at}: the user turn has no instruction before '{INPUT_MARK}'")
            if system and not exchanges:
                instruction = system.strip() + SYSTEM_SEPARATOR + instruction
            question = (instruction, input)
        else:
            exchanges.append(Exchange(*question, text))
    if len(turns) % 2:
        raise DataError(f"{turns[-1][0]}: the conversation ends with a user turn; the last turn must be the "
                        f"assistant's answer")
    return tuple(exchanges)


def _alpaca(record: Any, where: str, system_message: str) -> Conversation:
    record = check_record(record, where, ALPACA_FIELDS)
    return (Exchange(record["instruction"], record["input"], record["output"]),)


def _messages(record: Any, where: str, system_message: str) -> Conversation:
    return to_exchanges(_messages_turns(record, where), where, system_message)


def _sharegpt(record: Any, where: str, system_message: str) -> Conversation:
    return to_exchanges(_sharegpt_turns(record, where), where, system_message)


PARSERS = {"alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt}


def check_choices(data_format: str, system_message: str) -> None:
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
    if system_message not in SYSTEM_MESSAGES:
        raise ValueError(f"system_message must be one of {', '.join(SYSTEM_MESSAGES)}, got {system_message!r}")


def read_conversations(path: str | Path, data_format: str = "auto",
                       system_message: str = "refuse") -> tuple[str, list[Conversation]]:
    """``(the file's format, its records as conversations)``; every record is checked first.

    >>> import json, tempfile
    >>> turns = [("user", "Sort. ### Input: b a"), ("assistant", "a b"), ("user", "Upper case."), ("assistant", "A B")]
    >>> chat = {"messages": [{"role": role, "content": text} for role, text in turns]}
    >>> with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as f:
    ...     _ = f.write(json.dumps(chat) + "\\n"); f.flush()
    ...     read_conversations(f.name)
    ('messages', [(Exchange(instruction='Sort.', input='b a', output='a b'), \
Exchange(instruction='Upper case.', input='', output='A B'))])
    """
    return parse_conversations(read_located(path), data_format, system_message)


def parse_conversations(located: list[tuple[str, Any]], data_format: str = "auto",
                        system_message: str = "refuse") -> tuple[str, list[Conversation]]:
    """``read_conversations`` on a file's records as ``openalpaca.records.read_located`` returns them."""
    check_choices(data_format, system_message)
    fmt = detect_format(located[0][1], located[0][0]) if data_format == "auto" else data_format
    parse = PARSERS[fmt]
    return fmt, [parse(record, where, system_message) for where, record in located]


def as_messages(conversation: Conversation) -> dict[str, list[dict[str, str]]]:
    """A conversation as an OpenAI ``messages`` record, which reads back as the same conversation
    (user turns as ``INSTRUCTION ### Input: CONTEXT``): what a chat client sends for it."""
    messages = []
    for ex in conversation:
        messages.append({"role": "user", "content": user_content(ex.instruction, ex.input)})
        messages.append({"role": "assistant", "content": ex.output})
    return {"messages": messages}
