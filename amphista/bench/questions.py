"""Question files in the MT-Bench / Spec-Bench JSONL schema, and the prompt each turn is answered from.

One question per line: {"question_id": 81, "category": "writing", "turns": ["...", "..."], "reference": [...]}.
Turn i is answered with the conversation so far (earlier turns and the method's own earlier answers):
through the target's chat template when it has one, else as plain text that the target continues.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import InputError

# Between an answer and the next turn when there is no chat template: a paragraph break reads as
# "the story goes on" to a plain language model.
PLAIN_TURN_SEPARATOR = "\n"


@dataclass
class Question:
    question_id: int | str
    category: str
    turns: list[str]
    reference: list[str] | None = None
    extra: dict = field(default_factory=dict)


# Question sets shipped in the package, by the name `--questions` accepts (origins and licenses in
# amphista/assets/questions/README.md).
BUNDLED_QUESTIONS = {
    "mt_bench": ("questions", "mt_bench.jsonl"),
    "stories": ("prompts", "stories.jsonl"),
}


def bundled_questions_path(name: str) -> Path:
    """The file of a bundled question set: "mt_bench" (MT-Bench, 80 two-turn questions) or "stories"."""
    if name not in BUNDLED_QUESTIONS:
        raise InputError(f"no bundled question set {name!r}: choose one of {', '.join(BUNDLED_QUESTIONS)}")
    return Path(str(resources.files("amphista").joinpath("assets", *BUNDLED_QUESTIONS[name])))


def default_questions_path() -> Path:
    """The story openings shipped for the bundled model."""
    return bundled_questions_path("stories")


def questions_path(source: str | Path) -> Path:
    """A bundled set's name or a file path -> the file (an existing file wins over a name)."""
    text = str(source)
    if text in BUNDLED_QUESTIONS and not Path(text).is_file():
        return bundled_questions_path(text)
    return Path(source)


def parse_question(obj, where: str) -> Question:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object with question_id, category and turns")
    if "question_id" not in obj:
        raise InputError(f"{where}: no 'question_id' (MT-Bench schema: question_id, category, turns)")
    qid = obj["question_id"]
    if not isinstance(qid, (int, str)) or isinstance(qid, bool):
        raise InputError(f"{where}: question_id must be an integer or a string, got {qid!r}")
    category = obj.get("category", "general")
    if not isinstance(category, str) or not category:
        raise InputError(f"{where}: category must be a non-empty string, got {category!r}")
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise InputError(f"{where}: 'turns' must be a non-empty list of non-empty strings, got {turns!r}")
    reference = obj.get("reference")
    extra = {k: v for k, v in obj.items() if k not in ("question_id", "category", "turns", "reference")}
    return Question(qid, category, list(turns), reference, extra)


def load_questions(
    source=None, categories=None, limit: int | None = None, per_category: int | None = None
) -> list[Question]:
    """Questions from a JSONL file, a bundled set's name ("mt_bench", "stories"; None: the story openings)
    or a list of dicts/Questions, filtered to `categories` (a list or "a,b"), in file order, the first
    `per_category` of each category, at most `limit` of them."""
    if source is None:
        source = default_questions_path()
    if isinstance(source, (str, Path)):
        questions = _read_jsonl(questions_path(source))
    else:
        questions = [
            q if isinstance(q, Question) else parse_question(q, f"question #{i}")
            for i, q in enumerate(source)
        ]
        if not questions:
            raise InputError("the question list is empty: pass at least one question")
    seen: set = set()
    for q in questions:
        if q.question_id in seen:
            raise InputError(f"question_id {q.question_id!r} appears twice: question ids must be unique")
        seen.add(q.question_id)
    if categories:
        wanted = (
            [c.strip() for c in categories.split(",")] if isinstance(categories, str) else list(categories)
        )
        wanted = [c for c in wanted if c]
        known = sorted({q.category for q in questions})
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise InputError(
                f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}: "
                f"the questions have {', '.join(known)}"
            )
        questions = [q for q in questions if q.category in wanted]
    if per_category is not None:
        if per_category < 1:
            raise InputError(f"the questions per category must be at least 1, got {per_category}")
        taken: dict[str, int] = {}
        kept = []
        for q in questions:
            taken[q.category] = taken.get(q.category, 0) + 1
            if taken[q.category] <= per_category:
                kept.append(q)
        questions = kept
    if limit is not None:
        if limit < 1:
            raise InputError(f"the question limit must be at least 1, got {limit}")
        questions = questions[:limit]
    return questions


def _read_jsonl(path: Path) -> list[Question]:
    if not path.is_file():
        raise InputError(
            f"question file {str(path)!r} does not exist: pass a JSONL file in the MT-Bench schema or a "
            f"bundled set ({', '.join(BUNDLED_QUESTIONS)})"
        )
    from ..training.data import read_text

    lines = read_text(path, "question file").splitlines()
    questions = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{path}:{n}: not valid JSON ({e.msg}): each line must be one question object"
            ) from e
        questions.append(parse_question(obj, f"{path}:{n}"))
    if not questions:
        raise InputError(f"question file {str(path)!r} holds no questions")
    return questions


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def turn_prompt(tokenizer, turns: list[str], answers: list[str]) -> list[int]:
    """Token ids of the prompt for turn len(answers): turns[0..i] interleaved with the earlier answers."""
    i = len(answers)
    if has_chat_template(tokenizer):
        messages = []
        for k in range(i + 1):
            messages.append({"role": "user", "content": turns[k]})
            if k < i:
                messages.append({"role": "assistant", "content": answers[k]})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template already holds BOS and friends; adding them again would change the prompt.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = turns[0]
    for k in range(i):
        text += answers[k] + PLAIN_TURN_SEPARATOR + turns[k + 1]
    return list(tokenizer(text)["input_ids"])


def answer_text(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text of an answer. Without a chat template it is a continuation, so it is cut from the decoded
    whole: decoding the new tokens alone would drop the space between the prompt and the answer."""
    if has_chat_template(tokenizer):
        return tokenizer.decode(new, skip_special_tokens=True).strip()
    head = tokenizer.decode(prompt, skip_special_tokens=True)
    whole = tokenizer.decode(prompt + new, skip_special_tokens=True)
    if whole.startswith(head):
        return whole[len(head) :]
    return tokenizer.decode(new, skip_special_tokens=True)
