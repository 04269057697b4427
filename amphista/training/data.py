"""Training data: read records in the common formats, render chats with the tokenizer's template, tokenize.

Accepted records (JSONL, one per line, or a JSON array; plain-text files are one document):
  ShareGPT  {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
  messages  {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}
  Alpaca    {"instruction": ..., "input": ..., "output": ...}   ("response" is read as "output")
  text      {"text": ...}
  tokens    {"input_ids": [...]}   (pre-tokenized for this target's tokenizer; trained like text)
Chat records train on assistant tokens only; text records on every token. Malformed records are
counted, reported with their line numbers and skipped.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

from ..errors import InputError

ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system",
}  # fmt: skip

# Vicuna-style, for tokenizers without a chat template (e.g. a base model). The assistant turn ends
# with EOS so that generation stops there.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}USER: {{ m['content'] }}\n"
    "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token or '' }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token may be a label: assistant tokens, or all of a text


@dataclass
class DataReport:
    path: str
    records: int = 0
    examples: int = 0
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    skipped: int = 0  # valid records with nothing to learn within seq_len

    def summary(self) -> str:
        text = f"{self.path}: {self.records} records -> {self.examples} examples"
        if self.skipped:
            text += f", {self.skipped} skipped (no label tokens within seq_len)"
        if self.malformed:
            where = ", ".join(f"line {n} ({why})" for n, why in self.malformed[:10])
            more = f" and {len(self.malformed) - 10} more" if len(self.malformed) > 10 else ""
            text += f", {len(self.malformed)} malformed: {where}{more}"
        return text


def chat_template(tokenizer) -> str:
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def read_text(path, what: str = "file", error=InputError) -> str:
    """The file decoded as UTF-8; bytes that are not UTF-8 raise `error` naming the line and byte offset."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise error(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        bad = " ".join(f"0x{b:02x}" for b in data[e.start : min(e.end, e.start + 4)])
        raise error(
            f"{what} {str(path)!r} is not UTF-8 text: byte {bad} at line {line} (byte offset {e.start}); "
            "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8"
        ) from None


def check_output(path, flag: str = "--out", folder: bool = True, example: str = "out.jsonl") -> None:
    """Raise InputError unless `path` can be written as a folder (or a file), before any long work.

    Permissions are probed by creating a temporary file, not by os.access: that also catches read-only
    file systems and holds for root. Nothing is left behind."""
    path = os.fspath(path)
    full = os.path.abspath(path)
    if folder and os.path.exists(full) and not os.path.isdir(full):
        raise InputError(f"{flag} {path!r} is an existing file, not a folder: pass a folder name (created if missing)")
    if not folder and os.path.isdir(full):
        raise InputError(f"{flag} {path!r} is a folder: pass a file name, e.g. {os.path.join(path, example)!r}")
    probe = full if os.path.isdir(full) else os.path.dirname(full)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise InputError(f"{flag} {path!r} cannot be created: {probe!r} is a file, not a folder")
    try:
        if not folder and os.path.exists(full):
            open(full, "ab").close()  # appending nothing changes neither the content nor the mtime
        else:
            fd, tmp = tempfile.mkstemp(dir=probe, prefix=".amphista-write-check-")
            os.close(fd)
            os.remove(tmp)
    except OSError as e:
        where = full if not folder and os.path.exists(full) else probe
        raise InputError(
            f"{flag} {path!r} is not writable ({e.strerror or e} in {where!r}): choose a place you can write to"
        ) from None


def read_records(path: str, what: str = "data file"):
    """Yield (line number, record) pairs. Undecodable JSONL lines come through as (line, JSONDecodeError)."""
    if not os.path.isfile(path):
        raise InputError(f"{what} {path!r} does not exist")
    text = read_text(path, what)
    if path.endswith((".jsonl", ".ndjson")):
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, e
    elif path.endswith(".json"):
        yield from _json_array(path, text)
    else:
        yield 1, {"text": text}


def _json_array(path: str, text: str):
    """Elements of a JSON array with the line each starts on, so errors can point at them."""
    decoder, pos, line = json.JSONDecoder(), 0, 1
    start = text.lstrip()
    if not start.startswith("["):
        try:
            yield 1, json.loads(text)  # a single record
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e}); use JSONL or a JSON array of records") from e
        return
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON at line {e.lineno} ({e.msg}); the rest cannot be read") from e
        yield line, record


def normalize(record) -> list[dict] | str | list[int]:
    """A record -> a list of {"role", "content"} messages, a plain text, or token ids. Raises ValueError."""
    if isinstance(record, json.JSONDecodeError):
        raise ValueError(f"invalid JSON: {record.msg}")
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise ValueError("'conversations' is not a list")
        messages = [_message(t, "from", "value") for t in turns]
    elif "messages" in record:
        if not isinstance(record["messages"], list):
            raise ValueError("'messages' is not a list")
        messages = [_message(t, "role", "content") for t in record["messages"]]
    elif "instruction" in record:
        output = record.get("output", record.get("response"))
        prompt, extra = record["instruction"], record.get("input") or ""
        if not all(isinstance(x, str) for x in (prompt, extra, output)):
            raise ValueError("'instruction', 'input' and 'output' must be strings")
        messages = [{"role": "user", "content": prompt + ("\n\n" + extra if extra else "")}]
        messages.append({"role": "assistant", "content": output})
        if isinstance(record.get("system"), str) and record["system"]:
            messages.insert(0, {"role": "system", "content": record["system"]})
    elif "input_ids" in record:  # pre-tokenized: exact token sequences (no decode/encode round trip)
        ids = record["input_ids"]
        if not isinstance(ids, list) or not ids or not all(type(i) is int and i >= 0 for i in ids):
            raise ValueError("'input_ids' must be a non-empty list of token ids")
        return ids
    elif "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise ValueError("'text' is empty or not a string")
        return record["text"]
    else:
        raise ValueError("no 'conversations', 'messages', 'instruction' or 'text' field")
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise ValueError("no non-empty assistant turn")
    return messages


def _message(turn, role_key: str, content_key: str) -> dict:
    if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
        raise ValueError(f"a turn lacks '{role_key}' or '{content_key}'")
    role, content = ROLES.get(str(turn[role_key]).lower()), turn[content_key]
    if role is None:
        raise ValueError(f"unknown role {turn[role_key]!r}")
    if isinstance(content, list):  # OpenAI content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise ValueError(f"'{content_key}' is not a string")
    return {"role": role, "content": content}


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns.

    A turn's span runs from the end of the prompt rendered with the generation prompt to the end of the
    conversation rendered through that turn, so the template's own assistant markup stays unlabelled
    while the turn's end-of-turn tokens (what the drafter must predict to stop) are labelled."""
    template = chat_template(tokenizer)

    def render(msgs, gen=False) -> str:
        return tokenizer.apply_chat_template(
            msgs, chat_template=template, tokenize=False, add_generation_prompt=gen
        )

    full = render(messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            before, through = render(messages[:i], gen=True) if i else "", render(messages[: i + 1])
            start, end = len(before), len(through)
            ok = full.startswith(through) and through.startswith(before) and m["content"] in through[start:]
        except Exception:  # templates that refuse partial conversations (e.g. strict alternation)
            ok = False
        if not ok:  # fall back to locating the content itself
            start = full.find(m["content"], cursor)
            if start < 0:
                raise ValueError("the chat template dropped an assistant turn")
            end = start + len(m["content"])
        spans.append((start, end))
        cursor = end
    return full, spans


def tokenize_chat(tokenizer, messages: list[dict]) -> Example:
    text, spans = render_chat(tokenizer, messages)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        mask = [int(any(s < b and e > a for a, b in spans)) for s, e in offsets]
    except NotImplementedError:  # tokenizers without offsets: tokenize the pieces separately
        ids, mask, cuts = [], [], sorted({0, len(text), *[c for span in spans for c in span]})
        for a, b in zip(cuts, cuts[1:]):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [int(any(s <= a and b <= e for s, e in spans))] * len(piece)
    return Example(ids, mask)


def windows(ids: list[int], seq_len: int) -> list[Example]:
    """A long token sequence cut into seq_len windows, every token a label."""
    return [Example(ids[i : i + seq_len], [1] * len(ids[i : i + seq_len])) for i in range(0, len(ids), seq_len)]


def has_labels(ex: Example) -> bool:
    """Head 0 at position t predicts token t+2, so positions 0 and 1 are never labels."""
    return any(ex.loss_mask[2:])


def load_examples(paths: list[str], tokenizer, seq_len: int) -> tuple[list[Example], list[DataReport]]:
    """Read, render and tokenize every file. A file with no valid record is an error."""
    if tokenizer is None:
        raise InputError("the target has no tokenizer: save one in the target folder to train on text data")
    examples, reports = [], []
    for path in paths:
        report = DataReport(path)
        for line, record in read_records(path):
            report.records += 1
            try:
                item = normalize(record)
                if isinstance(item, str):
                    new = windows(tokenizer(item)["input_ids"], seq_len)
                elif isinstance(item[0], int):
                    if max(item) >= len(tokenizer):
                        raise ValueError(f"token id {max(item)} is outside the vocabulary of {len(tokenizer)}")
                    new = windows(item, seq_len)
                else:
                    ex = tokenize_chat(tokenizer, item)
                    new = [Example(ex.input_ids[:seq_len], ex.loss_mask[:seq_len])]
            except ValueError as e:
                report.malformed.append((line, str(e)))
                continue
            kept = [ex for ex in new if has_labels(ex)]
            report.skipped += len(kept) == 0
            report.examples += len(kept)
            examples += kept
        if report.records == len(report.malformed) or report.examples == 0:
            raise InputError(f"no usable record in {report.summary()}")
        reports.append(report)
    return examples, reports
