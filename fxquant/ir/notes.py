"""Typed notes: what a pass learns that the report should say, emitted by that pass.

A :class:`Note` is a ``str`` (its text, as the report prints it) that also carries its :class:`NoteKind`
and the pass that emitted it, so code filters notes by kind, never by their words.
"""

from __future__ import annotations

import enum
from typing import Iterable

__all__ = ["Note", "NoteKind", "Notes"]


class NoteKind(str, enum.Enum):
    TRAINING_MODE = "training_mode"            # the model was in training mode; captured in eval semantics
    CHECKPOINT = "checkpoint"                  # weights read from a checkpoint
    SMOOTHQUANT = "smoothquant"                # SmoothQuant applied
    STATIC_UNCALIBRATED = "static_uncalibrated"
    STATIC_CALIBRATED = "static_calibrated"
    WEIGHT_RANGE = "weight_range"              # 7-bit weights on a CPU without VNNI
    TIED_HEAD = "tied_head"                    # a Linear tied to an embedding runs from its own int8 copy
    FIXED_KWARGS = "fixed_kwargs"              # keyword arguments captured as constants
    ATTENTION_MASKS = "attention_masks"        # shape-only masks removed
    STATIC_SHAPES = "static_shapes"            # torch.export could not keep dims dynamic
    COMPUTE_DTYPE = "compute_dtype"            # QuantConfig.compute_dtype applied or not
    PLAN = "plan"                              # the plan overrode a method's own decision
    GENERATION = "generation"                  # prefill/decode methods with a KV cache; decode's weight-only Linears
    SCHEME = "scheme"                          # activation_scheme="auto": the scheme measured and chosen
    COMPILED = "compiled"                      # which form runs: torch.compile (Inductor) or eager, and the compile time


class Note(str):
    """One note: the text, plus ``kind`` (:class:`NoteKind`) and ``source`` (the emitting pass or step)."""

    kind: NoteKind
    source: str

    def __new__(cls, kind: NoteKind, text: str, source: str = "") -> "Note":
        note = super().__new__(cls, text)
        note.kind = NoteKind(kind)
        note.source = source
        return note

    def __reduce__(self):
        return (Note, (self.kind, str(self), self.source))

    def as_dict(self) -> dict:
        return {"kind": self.kind.value, "source": self.source, "text": str(self)}


class Notes(list):
    """The notes of one compile, in the order they were learned."""

    def add(self, kind: NoteKind, text: str, source: str = "") -> Note:
        note = Note(kind, text, source)
        self.append(note)
        return note

    def drop(self, kinds: Iterable[NoteKind]) -> None:
        kinds = set(kinds)
        self[:] = [n for n in self if getattr(n, "kind", None) not in kinds]

    def of(self, kind: NoteKind) -> list[Note]:
        return [n for n in self if getattr(n, "kind", None) is kind]
