"""What every part of the spec package shares: the error type, path helpers, the error formatter."""

from __future__ import annotations

from typing import Union

from pydantic import ValidationError

from lamflow.model.errors import LamflowError
from lamflow.model.nn.config import DESCRIPTOR_TAGS
from lamflow.model.schema import error_lines


class SpecError(LamflowError):
    """The pipeline YAML is wrong: one line per problem, `pipe.yaml: stages.test.systems[1]: ...`."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


Paths = Union[str, list[str]]


def as_list(p: Paths | None) -> list[str]:
    if p is None:
        return []
    return [p] if isinstance(p, str) else list(p)


def is_s3(p: str) -> bool:
    return p.startswith("s3://")


def format_errors(source: str, err: ValidationError, prefix: str = "") -> list[str]:
    """pydantic errors -> one line each, with the YAML path (`stages.test.systems[1]`): the model
    layer's formatter (lamflow.model.schema.error_lines) with the descriptor tags left out."""
    return error_lines(source, err, prefix, tags=DESCRIPTOR_TAGS, pipeline=True)



def spec_source(spec) -> str:
    """The pipeline file a spec came from (its error messages start with it)."""
    return getattr(spec, "_source", "pipeline")
