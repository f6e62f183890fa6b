"""The demo's data: digit arithmetic written as token sequences, generated in code.

A problem ``a OP b`` with ``digits``-digit operands is written as
``"123+456="`` followed by the answer with a fixed width of ``digits + 1``
digits, **least significant digit first** (``579`` is written ``"9750"``).
Writing the answer reversed lets a small transformer produce each digit after
the digits its carry (or borrow) depends on, a standard choice in studies of
arithmetic in transformers; :func:`decode_answer` turns it back into a number.
Subtraction problems have ``a >= b``, so every answer is non-negative.
About 1 in 16 operand pairs (chosen by a hash) is held out: training batches
never contain them and accuracy is measured on them only.

>>> tok = Tokenizer()
>>> tok.decode(tok.encode("12+34=6400"))
'12+34=6400'
>>> decode_answer("6400")
46
"""

from __future__ import annotations

import dataclasses

import numpy as np

#: Vocabulary: ten digits, the two operators and "=". Index 0 is the digit 0.
VOCAB = "0123456789+-="
OPS = {"add": "+", "sub": "-"}


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """One token per character of :data:`VOCAB`.

    >>> Tokenizer().encode("7+")
    [7, 10]
    """

    vocab: str = VOCAB

    @property
    def size(self) -> int:
        """The number of tokens."""
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; raises ``ValueError`` on a character outside the vocabulary."""
        bad = sorted(set(text) - set(self.vocab))
        if bad:
            raise ValueError(f"text {text!r} holds characters {bad} outside the vocabulary {self.vocab!r}.")
        return [self.vocab.index(c) for c in text]

    def decode(self, ids) -> str:
        """The text of token ids."""
        return "".join(self.vocab[int(i)] for i in ids)


@dataclasses.dataclass(frozen=True)
class Task:
    """An arithmetic task: ``op`` (``"add"`` or ``"sub"``) on ``digits``-digit numbers.

    >>> Task("add", digits=3).prompt_len, Task("add", digits=3).answer_len, Task("add", digits=3).seq_len
    (8, 4, 12)
    """

    op: str
    digits: int = 3

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"Task(op={self.op!r}): expected one of {sorted(OPS)}.")
        if self.digits < 1:
            raise ValueError(f"Task(digits={self.digits!r}): expected a positive integer.")

    @property
    def prompt_len(self) -> int:
        """Tokens in ``"123+456="``."""
        return 2 * self.digits + 2

    @property
    def answer_len(self) -> int:
        """Answer digits (one more than the operands, for the carry)."""
        return self.digits + 1

    @property
    def seq_len(self) -> int:
        """Prompt plus answer."""
        return self.prompt_len + self.answer_len

    def text(self, a: int, b: int) -> str:
        """The full problem with its answer, e.g. ``"012+034=6400"``.

        >>> Task("sub", digits=2).text(50, 7)
        '50-07=340'
        """
        c = a + b if self.op == "add" else a - b
        d = self.digits
        return f"{a:0{d}d}{OPS[self.op]}{b:0{d}d}=" + f"{c:0{d + 1}d}"[::-1]

    def operands(self, rng: np.random.Generator, n: int, *, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """``n`` random operand pairs from ``split`` (``"train"`` or ``"test"``; ``a >= b`` for subtraction).

        >>> a, b = Task("sub").operands(np.random.default_rng(0), 100, split="test")
        >>> bool(np.all(a >= b)), bool(np.all(is_held_out(a, b)))
        (True, True)
        """
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}: expected 'train' or 'test'.")
        hi = 10**self.digits
        a_out, b_out, have = [], [], 0
        while have < n:
            a = rng.integers(0, hi, 2 * n + 64)
            b = rng.integers(0, hi, 2 * n + 64)
            if self.op == "sub":
                a, b = np.maximum(a, b), np.minimum(a, b)
            keep = is_held_out(a, b) == (split == "test")
            a_out.append(a[keep])
            b_out.append(b[keep])
            have += int(keep.sum())
        return np.concatenate(a_out)[:n], np.concatenate(b_out)[:n]

    def batch(self, rng: np.random.Generator, n: int, *, split: str = "train") -> np.ndarray:
        """``n`` random problems from ``split`` as an ``(n, seq_len)`` int32 token array.

        >>> Task("add", digits=2).batch(np.random.default_rng(0), 4).shape
        (4, 9)
        """
        tok = Tokenizer()
        a, b = self.operands(rng, n, split=split)
        return np.array([tok.encode(self.text(int(x), int(y))) for x, y in zip(a, b, strict=True)], np.int32)


def is_held_out(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether the pair ``(a, b)`` belongs to the test split (about 1 in 16, by a multiplicative hash).

    >>> is_held_out(np.array([0, 1, 2]), np.array([0, 0, 0])).dtype
    dtype('bool')
    """
    h = (np.asarray(a, np.uint64) * np.uint64(2654435761) + np.asarray(b, np.uint64) * np.uint64(40503)) % np.uint64(
        2**32
    )
    return (h >> np.uint64(28)) == 0


def decode_answer(text: str) -> int:
    """The number an answer written least-significant digit first stands for.

    >>> decode_answer("9750")
    579
    """
    return int(text[::-1])
